"""Tensor parallelism on this CPU: two gloo ranks under torchrun, tiny random Llama and Qwen2
loaded with ``DistributedConfig(tp_size=2)``, compared with each other, with the
single-process engine and with ``model.generate()``.

One torchrun launch runs every scenario (tests/tp_worker.py); the tests below read what
each rank recorded. The layout checks that need no second process run in this one.
"""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import GenerationConfig

from cbkernels import BatchConfig, Engine
from cbkernels.engine.distributed import SingleRank, attach
from cbkernels.engine.tp_layout import describe
from cbkernels.testing import reference_tokens, tiny_llama, tiny_model, token_prompts

HERE = Path(__file__).parent
LAUNCH_LIMIT_S = 60
VOCAB = 128
PROMPTS = token_prompts((5, 19, 33, 12, 27, 8), vocab=VOCAB)
PREFIX = token_prompts((24,), vocab=VOCAB, seed=5)[0]
WORKLOAD = PROMPTS + [PREFIX + p for p in PROMPTS[:3]]  # three prompts share 3 blocks of 8
# Chunked prefill (33 + 24 tokens > a budget of 24), prefix caching, and a cache of 14 blocks
# that must preempt.
CONFIG = dict(backend="torch", block_size=8, max_batch_tokens=24, num_blocks=14)
NEW_TOKENS = 12


def _worker():
    spec = importlib.util.spec_from_file_location("tp_worker", HERE / "tp_worker.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gen(max_new=NEW_TOKENS, stop_strings=None):
    return GenerationConfig(max_new_tokens=max_new, eos_token_id=None, pad_token_id=0, do_sample=False,
                            stop_strings=stop_strings)


def word_tokenizer():
    """A word-level tokenizer of the tiny models' 128 ids ("w0" ... "w126", and "abcdef", the
    probe transformers' stop-string matching encodes), decoding without spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"abcdef": VOCAB - 1}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    inner.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="w0", pad_token="w0")


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """Save the models, run every scenario in one ``torchrun --nproc-per-node 2`` launch."""
    root = tmp_path_factory.mktemp("tp")
    models = {"llama": tiny_model("llama"), "qwen2": tiny_model("qwen2")}
    for name, model in models.items():
        model.save_pretrained(root / name)
    word_tokenizer().save_pretrained(root / "llama")
    tiny_llama(vocab=VOCAB, hidden=96, heads=6, kv_heads=3).save_pretrained(root / "odd")
    gen = dict(prompts=WORKLOAD, max_new_tokens=NEW_TOKENS, config=CONFIG)
    triton = dict(gen, prompts=WORKLOAD[:3] + WORKLOAD[-1:], max_new_tokens=8, config=dict(CONFIG, backend="triton"))
    short = dict(prompts=PROMPTS[:4], max_new_tokens=6, config=CONFIG)
    scenarios = [
        dict(name="llama", kind="generate", model=str(root / "llama"), sample=True, **gen),
        dict(name="qwen2", kind="generate", model=str(root / "qwen2"), **gen),
        dict(name="llama_async", kind="generate", model=str(root / "llama"),
             **dict(gen, config=dict(CONFIG, async_scheduling=True))),
        dict(name="llama_triton", kind="generate", model=str(root / "llama"), **triton),
        dict(name="stop_strings", kind="generate", model=str(root / "llama"), stop_strings=["w3w3"], **gen),
        dict(name="adaptive", kind="generate", model=str(root / "llama"),
             **dict(gen, config=dict(CONFIG, target_itl_ms=2.0))),
        dict(name="serve", kind="serving_cancel", model=str(root / "llama"), prompts=PROMPTS[:3],
             max_new_tokens=NEW_TOKENS, config=CONFIG),
        dict(name="fault_attention", kind="fault", model=str(root / "llama"), where="attention", fault_step=3, **short),
        dict(name="fault_sampling", kind="fault", model=str(root / "llama"), where="sampling", fault_step=3, **short),
        dict(name="sizing", kind="sizing", model=str(root / "llama"), config=dict(backend="torch", block_size=8),
             cap_bytes=[1 << 20, 1 << 19]),
        dict(name="odd_heads", kind="bad_tp", model=str(root / "odd")),
    ]
    (root / "spec.json").write_text(json.dumps({"scenarios": scenarios}))
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(HERE / "tp_worker.py"), str(root / "spec.json"), str(root)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_LIMIT_S * 2)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]
    return {"models": models, "ranks": ranks, "scenarios": {s["name"]: s for s in scenarios}, "seconds": seconds}


def _single(model, scenario):
    """The same scenario on one process: outputs, every step's schedule, cache bytes."""
    engine = Engine(model, BatchConfig(**scenario["config"]))
    steps = _worker().record_steps(engine)
    outs = engine.generate(scenario["prompts"], _gen(scenario["max_new_tokens"]))
    return outs, steps, engine.cache.kv.numel() * engine.cache.kv.element_size()


def test_launch_fits_its_budget(launch):
    assert launch["seconds"] < LAUNCH_LIMIT_S, f"torchrun launch took {launch['seconds']:.1f} s"


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama_triton", "llama_async"])
def test_greedy_tokens_match_single_process_and_generate(launch, name):
    scenario = launch["scenarios"][name]
    model = launch["models"]["qwen2" if name == "qwen2" else "llama"]
    rank0, rank1 = (r[name] for r in launch["ranks"])
    single, single_steps, single_bytes = _single(model, scenario)
    expected = [o.generated_tokens for o in single]
    assert [o["tokens"] for o in rank0["outputs"]] == expected
    assert rank1["outputs"] == rank0["outputs"]  # SPMD generate: the same outputs on every rank
    assert expected == reference_tokens(model, scenario["prompts"], _gen(scenario["max_new_tokens"]))
    assert all(o["error"] is None for o in rank0["outputs"])
    # Every step's schedule (ids, token counts, preemptions) and free blocks: equal across ranks
    # and equal to the single process's.
    assert rank0["steps"] == rank1["steps"] == single_steps
    assert any(0 < n < len(p) for p in scenario["prompts"] for step in rank0["steps"] for n in step[2]), \
        "no chunked prefill"
    assert rank0["preemptions"] > 0 and rank0["prefix_hit_rate"] > 0
    assert rank0["backend"] == scenario["config"]["backend"]
    assert rank0["async_steps"] > 0 if scenario["config"].get("async_scheduling") else rank0["async_steps"] == 0
    # Each rank caches half the KV heads.
    assert rank0["cache_bytes"] == rank1["cache_bytes"] == rank0["size_bytes"] == single_bytes // 2
    assert rank0["free_after"] == rank1["free_after"] == rank0["num_blocks"]


def test_the_step_time_model_learns_rank_0s_times_on_every_rank(launch):
    """target_itl_ms sizes each step's budget from measured step times, which differ per rank:
    every rank feeds the model rank 0's, so the budgets and schedules still agree."""
    rank0, rank1 = (r["adaptive"] for r in launch["ranks"])
    assert rank0["steps"] == rank1["steps"] and rank0["outputs"] == rank1["outputs"]
    assert [o["tokens"] for o in rank0["outputs"]] == reference_tokens(launch["models"]["llama"], WORKLOAD, _gen())


def test_stop_strings_are_rebuilt_on_every_rank(launch):
    """Stop strings travel as strings; each rank builds the check with its own tokenizer."""
    scenario = launch["scenarios"]["stop_strings"]
    rank0, rank1 = (r["stop_strings"] for r in launch["ranks"])
    engine = Engine(launch["models"]["llama"], BatchConfig(**scenario["config"]), tokenizer=word_tokenizer())
    single = engine.generate(scenario["prompts"], _gen(stop_strings=scenario["stop_strings"]))
    assert rank0["outputs"] == rank1["outputs"] and rank0["steps"] == rank1["steps"]
    assert [o["tokens"] for o in rank0["outputs"]] == [o.generated_tokens for o in single]
    stopped = [o for o in rank0["outputs"] if o["finish_reason"] == "stop"]
    assert stopped and all(o["tokens"][-2:] == [3, 3] for o in stopped)


def test_sampling_is_agreed_across_ranks(launch):
    rank0, rank1 = (r["llama"]["sampled"] for r in launch["ranks"])
    assert rank0 == rank1
    greedy = [o["tokens"] for o in launch["ranks"][0]["llama"]["outputs"]]
    assert [o["tokens"] for o in rank0] != greedy  # it did sample


def test_cancel_while_serving_frees_blocks_on_both_ranks_in_the_same_step(launch):
    rank0, rank1 = (r["serve"] for r in launch["ranks"])
    victim = rank0["outputs"][0]
    assert victim["finish_reason"] == "cancelled" and 3 <= len(victim["tokens"]) < NEW_TOKENS
    assert [len(o["tokens"]) for o in rank0["outputs"][1:]] == [NEW_TOKENS] * 2
    assert rank0["steps"] == rank1["steps"]  # the free blocks each step starts with, included
    scheduled = [i for i, step in enumerate(rank0["steps"]) if victim["id"] in step[1]]
    after = rank0["steps"][scheduled[-1] + 1:]
    assert after and all(victim["id"] not in step[1] for step in after)
    assert rank0["free_after"] == rank1["free_after"] == rank0["num_blocks"]
    assert "rank 0 only" in rank1["refused"] and rank1["loop_error"] is None
    assert rank1["leftover"] == 0  # the follower forgets finished requests


@pytest.mark.parametrize("where", ["attention", "sampling"])
def test_a_fault_on_rank_1_fails_the_same_requests_on_both(launch, where):
    scenario = launch["scenarios"][f"fault_{where}"]
    rank0, rank1 = (r[f"fault_{where}"] for r in launch["ranks"])
    assert rank0["first"] == rank1["first"] and rank0["steps"] == rank1["steps"]
    failed = [o for o in rank0["first"] if o["error"] is not None]
    faulty_step = rank0["steps"][scenario["fault_step"] - 1]
    assert sorted(o["id"] for o in failed) == sorted(faulty_step[1])
    assert all(f"rank 1: RuntimeError: injected {where} fault" in o["error"] for o in failed)
    # The next call succeeds, token for token.
    expected = reference_tokens(launch["models"]["llama"], scenario["prompts"], _gen(scenario["max_new_tokens"]))
    assert [o["tokens"] for o in rank0["second"]] == expected and rank1["second"] == rank0["second"]
    assert rank0["free_after"] == rank1["free_after"] == rank0["num_blocks"]


def test_tp_size_not_dividing_the_heads_is_a_clear_error(launch):
    for rank in launch["ranks"]:
        message = rank["odd_heads"]["error"]
        assert message is not None and "tensor parallel size 2 does not divide" in message
        assert "3 key/value heads" in message


def test_auto_sized_caches_agree_on_the_smallest_block_count(launch):
    rank0, rank1 = (r["sizing"] for r in launch["ranks"])
    caps = launch["scenarios"]["sizing"]["cap_bytes"]
    assert rank0["num_blocks"] == rank1["num_blocks"] == caps[1] // rank1["block_bytes"]
    assert caps[0] // rank0["block_bytes"] > rank0["num_blocks"]  # rank 0 alone would have taken more
    assert "smallest of 2 tensor-parallel ranks" in rank0["how"]


# ------------------------------------------------------------------ one process
def test_layout_errors_name_the_numbers():
    model = tiny_model("llama")  # 4 query heads, 2 KV heads
    assert describe(model).size == 1 and describe(model).kv_heads == 2
    model._tp_size = 3
    model._tp_plan = {"model.layers.*.self_attn.q_proj": "colwise", "model.layers.*.self_attn.k_proj": "colwise",
                      "model.layers.*.self_attn.v_proj": "colwise"}
    with pytest.raises(ValueError, match=r"size 3 does not divide the model's 4 query heads"):
        describe(model)
    model._tp_plan = {}
    with pytest.raises(ValueError, match=r"no tensor-parallel plan"):
        Engine(model, BatchConfig(backend="torch", num_blocks=8))


def test_a_single_process_engine_has_no_control_plane():
    engine = Engine(tiny_model("llama"), BatchConfig(backend="torch", num_blocks=8))
    assert isinstance(attach(engine), SingleRank) and engine._tp.agree(None) is None
    assert engine.generator is None  # unseeded sampling keeps using torch's global generator


def test_with_graph_mixing_off_an_eager_forward_after_replays_waits_for_the_device():
    """NCCL_GRAPH_MIXING_SUPPORT=0 (GPU only): the runner waits once per switch from graph
    replays to an eager forward or a capture, never between replays."""
    from cbkernels.engine.tp_cuda import keep_graphs_and_eager_apart

    calls = []

    class Graphs:
        capture, graphs = True, {1: "captured"}

        def run(self, requests, bucket):
            calls.append(f"replay{bucket}" if bucket in self.graphs else f"capture{bucket}")
            self.graphs[bucket] = "captured"
            return "logits"

    class Runner:
        graphs = Graphs()

        def _eager(self, *args):
            calls.append("eager")

    runner = Runner()
    keep_graphs_and_eager_apart(runner, sync=lambda: calls.append("sync"))
    runner._eager()
    runner.graphs.run([], 1)
    runner.graphs.run([], 1)
    runner._eager()
    runner._eager()
    runner.graphs.run([], 1)
    runner.graphs.run([], 2)
    assert calls == ["eager", "replay1", "replay1", "sync", "eager", "eager", "replay1", "sync", "capture2"]


@pytest.mark.slow
def test_cli_generate_with_tp_2_streams_the_single_process_tokens(tmp_path):
    """``torchrun --nproc-per-node 2 -m cbkernels generate --tp 2`` (one prompt: rank 0 streams,
    rank 1 follows) prints the tokens of the single-process command."""
    from cbkernels.models import cached_default_model

    tok = cached_default_model()[1]
    model_dir = tmp_path / "model"
    tok.save_pretrained(model_dir)
    tiny_llama(vocab=len(tok), max_positions=512).save_pretrained(model_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET="0")
    args = ["-m", "cbkernels", "generate", "--model", str(model_dir), "--max-new-tokens", "12", "-q",
            "What is the capital of France?"]
    runs = {"one": [sys.executable, *args], "tp": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc-per-node", "2", *args, "--tp", "2"]}
    tokens = {}
    for name, cmd in runs.items():
        out = tmp_path / f"{name}.json"
        proc = subprocess.run(cmd + ["--json", str(out)], env=env, capture_output=True, text=True,
                              timeout=LAUNCH_LIMIT_S * 3)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        tokens[name] = [r["tokens"] for r in json.loads(out.read_text())["results"]]
    assert tokens["tp"] == tokens["one"] and len(tokens["one"][0]) == 12
