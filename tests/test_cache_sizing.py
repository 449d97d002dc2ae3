"""Cache sizing like a serving engine on CUDA (checked here with fake device-memory
readings), the CPU budget rule, and the device-dependent defaults."""
import pytest
import torch

from cbkernels import BatchConfig, Engine
from cbkernels.engine.cache_sizing import (
    DEFAULT_MAX_NUM_SEQS, GIB, check_max_num_seqs, resolve_config, size_cache,
)
from cbkernels.testing import tiny_llama

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
BLOCK_BYTES = 2 * 1024 * 1024  # 2 MiB a block (every layer's K and V)


def fake_gpu(free_gib, total_gib):
    return lambda: (int(free_gib * GIB), int(total_gib * GIB))


def test_cuda_gives_the_cache_what_the_utilization_leaves():
    config = resolve_config(BatchConfig(), CUDA)
    assert config.gpu_memory_utilization == 0.9 and config.memory_fraction is None
    assert config.max_num_seqs == DEFAULT_MAX_NUM_SEQS["cuda"] == 256
    # An 80 GiB card with 16 GiB of weights loaded (64 free) and a 3 GiB activation peak:
    size = size_cache(config, block_bytes=BLOCK_BYTES, max_useful_blocks=10**9, device=CUDA,
                      mem_info=fake_gpu(64, 80), profile_peak_bytes=lambda: int(3 * GIB))
    expected = int(0.9 * 80 * GIB - 16 * GIB - 3 * GIB) // BLOCK_BYTES
    assert size.num_blocks == expected and size.bytes == expected * BLOCK_BYTES
    assert "gpu_memory_utilization 0.9" in size.how and "activation peak" in size.how
    assert size.tokens == expected * config.block_size


def test_cuda_sizing_is_capped_by_what_requests_can_use():
    config = resolve_config(BatchConfig(max_num_seqs=4), CUDA)
    size = size_cache(config, block_bytes=BLOCK_BYTES, max_useful_blocks=4 * 512, device=CUDA,
                      mem_info=fake_gpu(64, 80), profile_peak_bytes=lambda: 0)
    assert size.num_blocks == 4 * 512 and "capped" in size.how


def test_cuda_without_room_says_why():
    config = resolve_config(BatchConfig(gpu_memory_utilization=0.5), CUDA)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        size_cache(config, block_bytes=BLOCK_BYTES, max_useful_blocks=10**9, device=CUDA,
                   mem_info=fake_gpu(30, 80), profile_peak_bytes=lambda: int(1 * GIB))  # 40 - 50 - 1 < 0


def test_explicit_budget_on_cuda_and_the_cpu_rule():
    on_cuda = resolve_config(BatchConfig(memory_fraction=0.2), CUDA)
    assert on_cuda.gpu_memory_utilization is None and on_cuda.max_cache_bytes == 2 << 30
    on_cpu = resolve_config(BatchConfig(), CPU)
    assert (on_cpu.memory_fraction, on_cpu.max_cache_bytes, on_cpu.max_num_seqs) == (0.1, 2 << 30, 64)
    size = size_cache(resolve_config(BatchConfig(max_cache_bytes=10 * BLOCK_BYTES), CPU), block_bytes=BLOCK_BYTES,
                      max_useful_blocks=10**9, device=CPU)
    assert size.num_blocks == 10 and "max_cache_bytes" in size.how
    given = size_cache(resolve_config(BatchConfig(num_blocks=7), CUDA), block_bytes=BLOCK_BYTES,
                       max_useful_blocks=10**9, device=CUDA)
    assert given.num_blocks == 7 and given.how == "num_blocks given"


def test_settings_that_cannot_apply_are_refused():
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        resolve_config(BatchConfig(gpu_memory_utilization=0.8), CPU)
    with pytest.raises(ValueError, match="set one"):
        BatchConfig(gpu_memory_utilization=0.8, memory_fraction=0.1)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        BatchConfig(gpu_memory_utilization=1.5)
    assert check_max_num_seqs(None, 256, 100) == 100  # a default is capped to the cache
    with pytest.raises(ValueError, match="max_num_seqs 300"):
        check_max_num_seqs(300, 300, 100)


def test_engine_reports_its_cache_size_and_how_it_was_chosen():
    engine = Engine(tiny_llama(), BatchConfig(backend="torch", max_cache_bytes=64 * 1024))
    m = engine.metrics()
    per_block = 2 * 2 * 16 * 2 * 16 * 4  # layers, K+V, block, KV heads, head dim, fp32
    assert engine.cache.num_blocks == 64 * 1024 // per_block == m["cache_tokens"] // 16
    assert m["cache_gib"] == pytest.approx(engine.cache.num_blocks * per_block / GIB)
    # The default max_num_seqs (64 on CPU) is capped to the cache's 8 blocks.
    assert "max_cache_bytes 0.1 MiB" in m["cache_sizing"]
    assert m["max_num_seqs"] == engine.cache.num_blocks == 8
    with pytest.raises(ValueError, match="max_num_seqs"):
        Engine(tiny_llama(), BatchConfig(backend="torch", num_blocks=8, max_num_seqs=9))
