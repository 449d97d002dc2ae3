"""The engine on an fp8 KV cache: sizing by bytes, scales (checkpoint or computed), both backends."""
from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from cbkernels import BatchConfig, Engine
from cbkernels.attention.backend import FP8_SCALE_MARGIN
from cbkernels.engine.cache import kv_cache_dtype
from cbkernels.testing import tiny_llama, token_prompts

GREEDY = GenerationConfig(max_new_tokens=6, do_sample=False)
BUDGET = 256 * 1024


def _engine(model, **config):
    return Engine(model, BatchConfig(backend=config.pop("backend", "torch"), max_cache_bytes=BUDGET, **config))


@pytest.mark.parametrize("model_dtype, factor", [(torch.float32, 4), (torch.bfloat16, 2)], ids=["fp32", "bf16"])
def test_same_budget_holds_more_blocks(model_dtype, factor):
    model = tiny_llama().to(model_dtype)
    base = _engine(model)
    fp8 = _engine(model, kv_cache_dtype="fp8_e4m3")
    assert fp8.cache.kv.dtype == torch.float8_e4m3fn and fp8.cache.kv.element_size() == 1
    assert fp8.cache.size.block_bytes * factor == base.cache.size.block_bytes
    assert fp8.cache.num_blocks == factor * base.cache.num_blocks
    assert fp8.cache.compute_dtype == model_dtype


@pytest.mark.parametrize("name, dtype", [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_scales_are_computed_from_the_first_prefill(name, dtype):
    model = tiny_llama()
    engine = _engine(model, kv_cache_dtype=name, num_blocks=32, backend="torch")
    seen = {}

    def keep_first(module, args, kwargs, output):  # the k_proj output of each layer's first call
        seen.setdefault(id(module), output.detach().clone())

    hooks = [layer.self_attn.k_proj.register_forward_hook(keep_first, with_kwargs=True)
             for layer in model.model.layers]
    prompts = token_prompts([7, 12], vocab=96)
    outputs = engine.generate(prompts, GREEDY)
    for h in hooks:
        h.remove()
    scales = engine.attention.kv_scales
    assert scales.source == ["computed"] * len(model.model.layers)
    limit = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}[dtype]
    for i, layer in enumerate(model.model.layers):
        k = seen[id(layer.self_attn.k_proj)]  # [1, T, Hkv * D] before RoPE: a bound, not the value
        assert torch.all(scales.k[i] > 0)
        # RoPE rotates pairs of dims, so a head's amax after it is at most sqrt(2) x before.
        amax_pre = k.view(k.shape[0], k.shape[1], 2, -1).abs().amax(dim=(0, 1, 3))
        assert torch.all(scales.k[i] * limit / FP8_SCALE_MARGIN <= amax_pre * 2 ** 0.5 + 1e-6)
    before = (scales.k.clone(), scales.v.clone())
    engine.generate(token_prompts([30], vocab=96, seed=5), GREEDY)
    assert torch.equal(scales.k, before[0]) and torch.equal(scales.v, before[1]), "scales are fixed after the first prefill"
    assert all(len(o.generated_tokens) == 6 for o in outputs)


def test_checkpoint_scales_are_used():
    model = tiny_llama()
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.k_scale = torch.tensor(0.01 * (i + 1))
        layer.self_attn.v_scale = 0.02
    engine = _engine(model, kv_cache_dtype="fp8_e4m3", num_blocks=32)
    engine.generate(token_prompts([9], vocab=96), GREEDY)
    scales = engine.attention.kv_scales
    assert scales.source == ["checkpoint", "checkpoint"]
    assert torch.allclose(scales.k[1], torch.full((2,), 0.02)) and torch.allclose(scales.v, torch.full((2, 2), 0.02))
    # What the cache holds is the checkpoint's quantization: stored * scale is back near K.
    assert engine.cache.kv.dtype == torch.float8_e4m3fn and engine.cache.kv.float().abs().max() > 0


def test_checkpoint_scale_of_the_wrong_size_names_it():
    model = tiny_llama()
    for layer in model.model.layers:
        layer.self_attn.k_scale = torch.ones(3)
        layer.self_attn.v_scale = torch.ones(2)
    engine = _engine(model, kv_cache_dtype="fp8_e4m3", num_blocks=32)
    try:
        outputs = engine.generate(token_prompts([5], vocab=96), GREEDY)
    except ValueError as err:  # raised, or recorded on the request it failed
        message = str(err)
    else:
        message = str(outputs[0].error)
    assert "k_scale of layer 0 must be one number or one per KV head (2), got 3 values" in message


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_torch_and_triton_backends_agree_on_fp8(name):
    """Both backends quantize identically (bit-exact scatter) and attend over the same cache."""
    prompts = token_prompts([5, 17, 9], vocab=96, seed=3)
    runs = {}
    for backend in ("torch", "triton"):
        engine = _engine(tiny_llama(), kv_cache_dtype=name, num_blocks=32, block_size=8, backend=backend)
        runs[backend] = [o.generated_tokens for o in engine.generate(prompts, GREEDY)]
        runs[backend + "_scales"] = engine.attention.kv_scales.k.clone()
    assert runs["torch"] == runs["triton"]
    # Layer 0's K comes straight from the embeddings: the same scale bit for bit. Later layers'
    # K follows attention outputs computed in another order, so their amax moves by rounding.
    assert torch.equal(runs["torch_scales"][0], runs["triton_scales"][0])
    torch.testing.assert_close(runs["torch_scales"], runs["triton_scales"], rtol=1e-5, atol=0)


def test_config_field_is_checked():
    with pytest.raises(TypeError, match="kv_cache_dtype"):
        BatchConfig(kv_cache_dtype=8)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        BatchConfig(kv_cache_dtype="fp8")
    assert BatchConfig().kv_cache_dtype == "auto"


def test_fp8_refused_where_the_gate_builds_no_kernels(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match="kv_cache_dtype: float8_e4m3fn KV caches need compute capability >= 9.0"):
        kv_cache_dtype("fp8_e4m3", torch.bfloat16, torch.device("cuda"))
    with pytest.raises(ValueError, match="kv_cache_dtype: float8_e5m2 KV caches need compute capability >= 9.0"):
        kv_cache_dtype("fp8_e5m2", torch.bfloat16, torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with pytest.raises(ValueError, match="kv_cache_dtype: fp8 caches on CUDA need a float16 / bfloat16 model"):
        kv_cache_dtype("fp8_e5m2", torch.float32, torch.device("cuda"))
    assert kv_cache_dtype("fp8_e5m2", torch.bfloat16, torch.device("cuda")) == torch.float8_e5m2
    assert kv_cache_dtype("fp8_e4m3", torch.bfloat16, torch.device("cuda")) == torch.float8_e4m3fn
    assert kv_cache_dtype("auto", torch.bfloat16, torch.device("cuda")) == torch.bfloat16


def test_compare_counts_tokens_prefix_and_logprob_differences():
    from types import SimpleNamespace as Out

    from cbkernels.benchmarks.fp8 import compare

    base = [Out(generated_tokens=[1, 2, 3, 4], logprobs=[-0.1, -0.2, -0.3, -0.4]),
            Out(generated_tokens=[5, 6], logprobs=[-1.0, -2.0])]
    other = [Out(generated_tokens=[1, 2, 9, 4], logprobs=[-0.15, -0.2, -5.0, -0.4]),
             Out(generated_tokens=[5, 6, 7], logprobs=[-1.5, -2.0, -0.1])]
    got = compare(base, other)
    assert got["tokens"] == 7  # 4 + max(2, 3)
    assert got["identical"] == pytest.approx(5 / 7)  # positions 0, 1, 3 and 0, 1
    assert got["common_prefix"] == pytest.approx(4 / 7)  # 2 + 2 before the first difference
    assert got["dlogp_mean"] == pytest.approx((0.05 + 0.0 + 0.5 + 0.0) / 4)
    assert got["dlogp_max"] == pytest.approx(0.5)


def test_fp8_benchmark_runs_and_writes_its_table(tmp_path):
    from cbkernels.benchmarks.fp8 import COLUMNS, run_fp8

    prompts = token_prompts([6, 9], vocab=96, seed=2)
    rows = run_fp8(tiny_llama(), prompts, GenerationConfig(max_new_tokens=3, do_sample=False), out_dir=tmp_path,
                   formats=("fp8_e4m3",), backend="torch", num_blocks=64)
    assert [r["kv_cache_dtype"] for r in rows] == ["auto", "fp8_e4m3"]
    assert rows[0]["identical"] == 1.0 and rows[0]["tf_identical"] == 1.0
    for r in rows:
        assert set(COLUMNS) <= set(r) and r["tokens"] == 6
        assert 0.0 <= r["tf_identical"] <= 1.0 and r["tf_dlogp_max"] >= r["tf_dlogp_mean"] >= 0.0
    csv = list(tmp_path.glob("fp8-*.csv"))
    assert len(csv) == 1 and "tf_identical" in csv[0].read_text().splitlines()[0]
