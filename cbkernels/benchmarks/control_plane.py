"""The CPU cost of tensor parallelism's control plane per step (``engine/distributed.py``).

    torchrun --standalone --nproc-per-node 2 -m cbkernels.benchmarks.control_plane [--out DIR]

Two gloo ranks, a tiny random Llama loaded with ``DistributedConfig(tp_size=2)``:

1. **engine**: 256 requests run together (SPMD ``generate``); rank 0 records, per step, the
   control plane's seconds (the step message's broadcast plus the fault agreement) beside the
   step's wall time. The first step carries all 256 new requests; the others are decodes.
2. **messages**: the message alone, ranks aligned by a barrier before each repetition, for
   0 / 1 / 16 / 64 / 256 new requests of 128-token prompts: ``deliver`` (the follower's wait
   from the barrier until the journal is unpickled: rank 0 pickles it, both broadcasts, the
   follower unpickles; ``pickle`` alone is rank 0's share), ``replay`` (the follower adds the
   requests to its engine) and ``agree`` (the fault agreement's all-reduce).

Rows go to a table, bench/results/control_plane-<device>-<date>.csv and a PNG beside it.
"""
from __future__ import annotations

import argparse
import pickle
import statistics
import tempfile
import time
from pathlib import Path

import torch

NEW_REQUESTS = (0, 1, 16, 64, 256)
PROMPT_LEN = 128
RUNNING = 256
REPS = 30


def _engine(model, num_blocks: int):
    from ..engine import BatchConfig, Engine

    return Engine(model, BatchConfig(backend="torch", block_size=16, num_blocks=num_blocks, max_num_seqs=RUNNING,
                                     max_batch_tokens=RUNNING * 64))


def _engine_run(model, dist) -> list[dict]:
    from transformers import GenerationConfig

    from ..testing import token_prompts

    engine = _engine(model, RUNNING * 8)
    plane = engine._tp
    prompts = token_prompts([64] * RUNNING, vocab=model.config.vocab_size, seed=3)
    gc = GenerationConfig(max_new_tokens=16, eos_token_id=None, pad_token_id=0, do_sample=False)
    step, rows = engine.step, []

    def timed_step():
        before = plane.stats["send_s"] + plane.stats["agree_s"]
        start = time.perf_counter()
        made = step()
        rows.append({"step_ms": (time.perf_counter() - start) * 1e3,
                     "control_ms": (plane.stats["send_s"] + plane.stats["agree_s"] - before) * 1e3,
                     "running": len(engine.scheduler.running)})
        return made

    engine.step = timed_step
    engine.generate(prompts, gc)
    engine.stop()
    first, decodes = rows[0], rows[1:]
    mean = lambda key: statistics.mean(r[key] for r in decodes)  # noqa: E731
    return [{"part": "engine", "new_requests": RUNNING, "running": RUNNING, "control_ms": first["control_ms"],
             "step_ms": first["step_ms"], "share": first["control_ms"] / first["step_ms"]},
            {"part": "engine", "new_requests": 0, "running": RUNNING, "control_ms": mean("control_ms"),
             "step_ms": mean("step_ms"), "share": mean("control_ms") / mean("step_ms")}]


def _messages(model, dist) -> list[dict]:
    from ..engine import tp_follower
    from ..engine.distributed import EVENTS
    from ..engine.requests import SamplingParams
    from ..testing import token_prompts

    rows = []
    for k in NEW_REQUESTS:
        engine = _engine(model, RUNNING * 8)
        plane = engine._tp
        prompts = token_prompts([PROMPT_LEN] * max(k, 1), vocab=model.config.vocab_size, seed=k)[:k]
        times = {"pickle": [], "deliver": [], "replay": [], "agree": []}
        for rep in range(REPS):
            events = [("add", f"r{rep}-{i}", p, SamplingParams(max_new_tokens=16), 0, None)
                      for i, p in enumerate(prompts)]
            dist.barrier(group=plane.group)
            start = time.perf_counter()
            if plane.is_driver:
                pickle.dumps(events, protocol=pickle.HIGHEST_PROTOCOL)
                times["pickle"].append(time.perf_counter() - start)
                plane.journal = events
                plane._send(EVENTS)
            else:
                _command, received = plane.receive()
                times["deliver"].append(time.perf_counter() - start)
                start = time.perf_counter()
                with engine._changed:
                    tp_follower.apply(plane, received)
                times["replay"].append(time.perf_counter() - start)
                for rid in list(engine.requests):  # keep the engine empty between repetitions
                    engine.scheduler.cancel(engine.requests.pop(rid), 0.0)
            dist.barrier(group=plane.group)
            start = time.perf_counter()
            plane.agree(None)
            times["agree"].append(time.perf_counter() - start)
        engine.stop()
        gathered = [None, None]
        dist.all_gather_object(gathered, times, group=plane.group)
        merged = {key: [t for part in gathered for t in part[key]] for key in times}
        row = {"part": "messages", "new_requests": k, "running": "-",
               "payload_kib": len(pickle.dumps(events, protocol=pickle.HIGHEST_PROTOCOL)) / 1024 if k else 0.0}
        for key, values in merged.items():
            row[f"{key}_ms"] = statistics.median(values) * 1e3
        # The follower's critical path: rank 0 pickles and sends, it unpickles, replays, agrees.
        row["control_ms"] = row["deliver_ms"] + row["replay_ms"] + row["agree_ms"]
        rows.append(row)
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    from .common import pyplot

    plt = pyplot()
    if plt is None:
        return
    msgs = [r for r in rows if r["part"] == "messages"]
    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0.0] * len(msgs)
    for key in ("deliver_ms", "replay_ms", "agree_ms"):
        values = [r[key] for r in msgs]
        ax.bar(range(len(msgs)), values, bottom=bottom, label=key[:-3])
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(range(len(msgs)), [str(r["new_requests"]) for r in msgs])
    ax.set_xlabel(f"new requests in the step ({PROMPT_LEN}-token prompts)")
    ax.set_ylabel("ms per step (median)")
    ax.set_title("tensor-parallel control plane, 2 gloo ranks")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def main(argv=None) -> int:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    from ..testing import tiny_model
    from .common import report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="directory for CSV and PNG (default bench/results)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tiny_model("llama").save_pretrained(tmp)  # every rank writes the same weights
        model = AutoModelForCausalLM.from_pretrained(tmp, distributed_config=DistributedConfig(tp_size=2),
                                                     dtype=torch.float32).eval()
        rows = _engine_run(model, dist) + _messages(model, dist)
    if dist.get_rank() == 0:
        columns = ["part", "new_requests", "running", "payload_kib", "pickle_ms", "deliver_ms", "replay_ms",
                   "agree_ms", "control_ms", "step_ms", "share"]
        for row in rows:
            for c in columns:
                row.setdefault(c, "-")
        path = report("control_plane", rows, columns, Path(args.out) if args.out else None)
        _plot(rows, path.with_suffix(".png"))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
