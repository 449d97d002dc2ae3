"""Padded decode buckets (cbkernels.engine.cuda_graphs): on CPU the padded static-buffer path runs
eagerly (``capture=False``) and must give the tokens of the normal engine and of
``model.generate()``; with CUDA, a real capture + replay must match eager."""
import contextlib
import inspect
import warnings
from unittest import mock

import pytest
import torch
from transformers import GenerationConfig

from cbkernels import BatchConfig, Engine
from cbkernels.engine.cuda_graphs import BUCKET_STEP, DecodeGraphs, bucket_sizes, resolve_use_cuda_graph
from cbkernels.engine.model_runner import ModelRunner
from cbkernels.ops import use_triton
from cbkernels.testing import tiny_llama, tiny_sliding_qwen2, token_prompts

VOCAB = 96
# Awkward prompt lengths around blocks of 4, and per-request budgets so that requests finish
# at different steps and the decode batch shrinks through several buckets.
LENGTHS = (3, 9, 17, 5, 12, 1, 7)
MAX_NEW = (6, 11, 3, 9, 5, 8, 2)
BLOCK_SIZE = 4
MAX_BATCH = 8  # largest bucket in these tests: 5 requests pad to 8, 3 to 4


def _gen(max_new):
    return GenerationConfig(max_new_tokens=max_new, pad_token_id=0, eos_token_id=None)


def _llama(device="cpu", max_positions=256):
    torch.manual_seed(0)
    return tiny_llama(vocab=VOCAB, max_positions=max_positions, device=device)


@pytest.fixture(scope="module")
def llama():
    return _llama()


@pytest.fixture(scope="module")
def prompts():
    return token_prompts(LENGTHS, vocab=VOCAB)


def _reference(model, prompts, max_news):
    with torch.no_grad():
        return [model.generate(torch.tensor([p], device=model.device), generation_config=_gen(m))[0, len(p):].tolist()
                for p, m in zip(prompts, max_news)]


def _padded(engine, capture=False, max_batch=MAX_BATCH):
    engine.runner.graphs = DecodeGraphs(engine.runner, max_batch, capture=capture)
    return engine


def _run(engine, prompts, max_news):
    ids = [engine.add_request(p, _gen(m)) for p, m in zip(prompts, max_news)]
    while engine.scheduler.has_work():
        engine.step()
    return [engine.get_result(i).generated_tokens for i in ids]


# --------------------------------------------------------------------------- configuration
def test_bucket_sizes():
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert bucket_sizes(5) == [1, 2, 4, 5] and bucket_sizes(1) == [1] and bucket_sizes(20) == [1, 2, 4, 8, 16, 20]
    for top in (1, 3, 8, 9, 37, 64):
        sizes = bucket_sizes(top)
        for n in range(1, top + 1):
            bucket = next(b for b in sizes if b >= n)
            assert bucket - n < max(n, BUCKET_STEP)  # padding under 2x, and under 8 rows past 8


def test_use_cuda_graph_resolution(llama):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_use_cuda_graph(None, cpu, "torch") is False
    assert resolve_use_cuda_graph(None, cpu, "triton") is False
    assert resolve_use_cuda_graph(None, cuda, "triton") is True
    assert resolve_use_cuda_graph(None, cuda, "torch") is False
    assert resolve_use_cuda_graph(False, cuda, "triton") is False
    for device, backend in ((cpu, "torch"), (cpu, "triton"), (cuda, "torch")):
        with pytest.raises(ValueError, match="use_cuda_graph"):
            resolve_use_cuda_graph(True, device, backend)
    with pytest.raises(TypeError, match="use_cuda_graph"):
        BatchConfig(use_cuda_graph=1)
    engine = Engine(llama, BatchConfig(backend="torch"))
    with pytest.raises(ValueError, match="use_cuda_graph"):
        ModelRunner(llama, engine.cache, engine.attention, None, use_cuda_graph=True)
    assert ModelRunner(llama, engine.cache, engine.attention, None, use_cuda_graph=None).graphs is None
    with pytest.raises(ValueError, match="use_cuda_graph"):
        DecodeGraphs(engine.runner, MAX_BATCH, capture=True)


_WIRED = "use_cuda_graph" in inspect.getsource(Engine.__init__)


@pytest.mark.skipif(not _WIRED, reason="engine.py does not pass BatchConfig.use_cuda_graph to ModelRunner yet")
def test_engine_config_use_cuda_graph_on_cpu(llama):
    with pytest.raises(ValueError, match="use_cuda_graph"):
        Engine(llama, BatchConfig(backend="torch", use_cuda_graph=True))
    assert Engine(llama, BatchConfig(backend="torch")).runner.graphs is None
    assert Engine(llama, BatchConfig(backend="torch", use_cuda_graph=False)).runner.graphs is None


def test_which_steps_pad(llama, prompts):
    engine = _padded(Engine(llama, BatchConfig(backend="torch", block_size=BLOCK_SIZE)))
    graphs = engine.runner.graphs
    for p in prompts[:3]:
        engine.add_request(p, _gen(4))
    engine.step()  # the prefills
    reqs = list(engine.scheduler.running)
    assert graphs.bucket_for(reqs, [1, 1, 1]) == 4
    assert graphs.bucket_for(reqs[:1], [1]) == 1
    assert graphs.bucket_for(reqs, [1, 1, 2]) is None  # a prefill chunk: eager
    assert graphs.bucket_for(reqs * 3, [1] * 9) is None  # more than the largest bucket
    graphs.width = 1  # tables wider than the static block table: eager
    assert graphs.bucket_for(reqs, [1, 1, 1]) is None
    # Exactly at the edge: the newest token's position must fall in the last static column.
    longest = max(r.num_computed for r in reqs)
    graphs.width = longest // BLOCK_SIZE + 1
    assert graphs.bucket_for(reqs, [1, 1, 1]) == 4
    graphs.width = longest // BLOCK_SIZE  # one column short for the longest request's new token
    assert graphs.bucket_for(reqs, [1, 1, 1]) is None


# --------------------------------------------------------------------------- token identity
@pytest.mark.parametrize("count,bucket", [(3, 4), (5, 8)])
def test_padded_decode_matches_generate(llama, prompts, count, bucket):
    chosen, max_news = prompts[:count], MAX_NEW[:count]
    config = dict(backend="torch", block_size=BLOCK_SIZE)
    padded = _padded(Engine(llama, BatchConfig(**config)))
    got = _run(padded, chosen, max_news)
    assert got == _reference(llama, chosen, max_news)
    assert got == _run(Engine(llama, BatchConfig(**config)), chosen, max_news)
    stats = padded.runner.graph_stats()
    assert stats["cuda_graph_buckets"][bucket] >= 1  # the full batch padded to its bucket
    assert len(stats["cuda_graph_buckets"]) >= 2  # finishing requests moved it to smaller ones
    assert stats["eager_steps"] >= 1  # prefills stay eager
    assert padded.cache.get_num_free_blocks() == padded.cache.num_blocks


def test_padded_decode_with_preemption(llama, prompts):
    # 12 blocks of 4 cannot hold all seven requests at once: the newest get preempted.
    padded = _padded(Engine(llama, BatchConfig(backend="torch", block_size=BLOCK_SIZE, num_blocks=12,
                                               max_batch_tokens=16)))
    got = _run(padded, prompts, MAX_NEW)
    assert got == _reference(llama, prompts, MAX_NEW)
    assert padded.metrics()["preemptions"] > 0
    assert padded.runner.graph_stats()["cuda_graph_steps"] > 0
    assert padded.cache.get_num_free_blocks() == padded.cache.num_blocks


def test_padded_decode_sliding_window_groups(prompts):
    model = tiny_sliding_qwen2(vocab=VOCAB, window=6, max_positions=64)
    padded = _padded(Engine(model, BatchConfig(backend="torch", block_size=BLOCK_SIZE)))
    assert len(padded.cache.allocators) == 2
    got = _run(padded, prompts, MAX_NEW)
    assert got == _reference(model, prompts, MAX_NEW)
    assert padded.runner.graph_stats()["cuda_graph_steps"] > 0


def test_padded_decode_triton_interpreted_ignores_unowned_nan(llama, prompts):
    chosen, max_news = prompts[:3], (4, 2, 3)
    padded = _padded(Engine(llama, BatchConfig(backend="triton", block_size=BLOCK_SIZE, num_blocks=16)))
    padded.cache.kv.fill_(float("nan"))  # nothing is owned yet: no slot may be read before written
    got = _run(padded, chosen, max_news)
    assert got == _reference(llama, chosen, max_news)
    assert got == _run(Engine(llama, BatchConfig(backend="triton", block_size=BLOCK_SIZE, num_blocks=16)),
                       chosen, max_news)
    assert padded.runner.graph_stats()["cuda_graph_buckets"][4] >= 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padding_rows_write_nothing(llama, prompts, backend):
    engine = _padded(Engine(llama, BatchConfig(backend=backend, block_size=BLOCK_SIZE, num_blocks=16)))
    for p in prompts[:3]:
        engine.add_request(p, _gen(4))
    engine.step()  # prefills
    reqs = list(engine.scheduler.running)
    bs = BLOCK_SIZE
    expected = set()
    for r in reqs:
        table = engine.cache.allocators[0].block_table(r.request_id)
        pos = r.num_computed
        if pos // bs >= len(table):
            pytest.skip("the next token needs a new block: reserve() has not run yet")
        expected.add(table[pos // bs] * bs + pos % bs)
    before = engine.cache.kv.clone()
    engine.step()  # three decodes padded to 4
    assert engine.runner.graph_stats()["cuda_graph_buckets"] == {4: 1}
    flat = lambda kv: kv.flatten(2, 3).flatten(3)  # [layers, 2, slots, Hkv * D]
    changed = (flat(engine.cache.kv) != flat(before)).any(-1).any(1).any(0)  # [slots]
    assert set(torch.nonzero(changed).flatten().tolist()) == expected


# Tensor methods that copy device values to the host: a device-to-host sync on CUDA, and an
# error while a stream is capturing.
_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


def _prefilled_triton_engine(model, prompts, num_blocks):
    """A padded-bucket engine on the Triton path with ``prompts`` prefilled (skips without it)."""
    engine = _padded(Engine(model, BatchConfig(backend="triton", block_size=BLOCK_SIZE, num_blocks=num_blocks)))
    if not use_triton(engine.cache.kv):
        pytest.skip("CPU without TRITON_INTERPRET: the Triton launch path is not what runs")
    for p in prompts:
        engine.add_request(p, _gen(4))
    engine.step()  # prefills
    return engine


def test_padded_forward_reads_nothing_back_to_the_host(prompts):
    """The Python side of a captured step (transformers forward, attention function, op
    wrappers, launchers) must not read tensor values once value checks are off, as they are
    while a stream captures: every host read raises here."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = _prefilled_triton_engine(_llama(device), prompts[:3], num_blocks=16)
    graphs = engine.runner.graphs
    with torch.inference_mode():
        graphs._fill(list(engine.scheduler.running), 4)

    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name} read a value back to the host")
        return read

    with contextlib.ExitStack() as patches, torch.inference_mode():
        patches.enter_context(mock.patch("cbkernels.ops.checks.values_checkable", lambda *tensors: False))
        for name in _HOST_READS:
            patches.enter_context(mock.patch.object(torch.Tensor, name, refuse(name)))
        logits = graphs._forward(4)
    assert logits.shape == (1, 4, VOCAB) and bool(torch.isfinite(logits).all())


# --------------------------------------------------------------------------- real capture (GPU)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay_matches_eager(prompts):
    model = _llama("cuda")
    config = dict(backend="triton", block_size=BLOCK_SIZE, num_blocks=64)
    eager = Engine(model, BatchConfig(**config))
    eager.runner = ModelRunner(model, eager.cache, eager.attention, None, use_cuda_graph=False)
    graphed = Engine(model, BatchConfig(**config))
    graphed.runner = ModelRunner(model, graphed.cache, graphed.attention, None, use_cuda_graph=True,
                                 max_num_seqs=MAX_BATCH)
    assert graphed.runner.graphs is not None and graphed.runner.graphs.capture
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns and falls back
        for chosen, max_news in ((prompts[:5], MAX_NEW[:5]), (prompts, MAX_NEW)):  # second run: replays
            assert _run(graphed, chosen, max_news) == _run(eager, chosen, max_news)
    stats = graphed.runner.graph_stats()
    assert stats["cuda_graphs_captured"] >= 2 and stats["cuda_graph_steps"] > stats["cuda_graphs_captured"]
    assert graphed.cache.get_num_free_blocks() == graphed.cache.num_blocks


def test_buckets_cover_the_cuda_default_batch(llama):
    """With the CUDA default max_num_seqs (256), decode steps up to 256 requests have a bucket."""
    engine = _padded(Engine(llama, BatchConfig(backend="torch", num_blocks=512)), max_batch=256)
    assert engine.runner.graphs.buckets[-1] == 256
    assert engine.runner.graph_stats()["cuda_graph_largest_bucket"] == 256


def test_bucket_metadata_carries_the_split_workspace_before_any_capture(prompts):
    """A bucket's split-KV workspace is sized when its metadata is built, before the warm-up and
    the capture: the launches inside a capture get it from the metadata and allocate nothing."""
    from cbkernels.kernels.paged_attention_tiles import plan_launch

    # Static max_seqlen_k 1024 (1024 positions, 300 blocks of 4 cover them): decode buckets split the keys.
    engine = _prefilled_triton_engine(_llama(max_positions=1024), prompts[:2], num_blocks=300)
    graphs, workspace = engine.runner.graphs, engine.attention.workspace
    with torch.inference_mode():
        graphs._fill(list(engine.scheduler.running), 2)
    meta = graphs.static[2]
    launch = plan_launch(engine.cache.kv.device, engine.cache.kv.dtype, 2, 2, 4, 2, 16, 1, meta.max_seqlen_k)
    assert launch.num_splits > 1
    assert meta.workspace is not None and meta.workspace.numel() >= launch.workspace_numel(2, 4)
    buffers = len(workspace.buffers)
    with torch.inference_mode():
        logits = graphs._forward(2)
    assert len(workspace.buffers) == buffers and bool(torch.isfinite(logits).all())
