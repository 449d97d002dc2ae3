"""Host work per engine step against the number of running decode requests.

A tiny random Llama (2 layers, hidden 64) on the PyTorch path makes the model's forward small,
so what is measured is what the host does around it every step: scheduling, the step plan and
its metadata, sampling, and bookkeeping after the step. Each point: ``n`` requests with a
256-token context decode together; the median of the measured steps is reported, split by phase.
On a GPU the forward of a real model takes a few tens of milliseconds at batch 256, so host
time per step has to stay far below that.

Every point is measured twice in the same run:

* ``forward="model"``: the tiny model's forward runs on this CPU between steps. Its memory
  traffic (the decode rows' gathered histories) evicts the CPU caches, so the host work
  after it runs cold; and the argmax over the vocabulary is CPU work too.
* ``forward="none"``: the model's forward is replaced by a stand-in that returns zero logits
  of the right shape (every greedy row then samples token 0), so nothing but the engine's own
  host work runs between steps, as on a GPU, where the forward runs on the device. The argmax
  still runs on the CPU and still counts as host work here.

With a CUDA device (``device="cuda"``, the default when one is present) the same engine path
runs with the model on the GPU: the forward is timed up to ``torch.cuda.synchronize()``, so
``forward_ms`` is the device's time and ``host_ms`` what the host adds around it.
"""
from __future__ import annotations

import statistics
import time

from .common import device_name, pyplot, report

RUNNING = (16, 64, 256, 1024)
CONTEXT = 256  # prompt tokens of every request
MEASURED_STEPS = 40
GOAL_MS_AT_256 = 1.0
FORWARDS = ("model", "none")
PHASES = ("schedule", "prepare", "sample", "postprocess", "host", "forward")


def _synchronized_forward(runner):
    """``ModelRunner.forward`` timed until the device has finished it (CUDA)."""
    import torch

    forward = runner.forward

    def synced(meta, logits_to_keep):
        logits = forward(meta, logits_to_keep)
        start = time.perf_counter()
        torch.cuda.synchronize(runner.device)
        runner.timing["forward"] += time.perf_counter() - start
        return logits

    return synced


def _stand_in_forward(runner, vocab: int):
    """A replacement for ``ModelRunner.forward``: zero logits [1, rows, vocab], no model."""
    import torch

    def forward(meta, logits_to_keep):
        rows = meta.input_ids.shape[1] if isinstance(logits_to_keep, int) else logits_to_keep.shape[0]
        start = time.perf_counter()
        logits = torch.zeros(1, rows, vocab, device=runner.device)
        runner.timing["forward"] += time.perf_counter() - start
        return logits

    return forward


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def measure(n: int, steps: int = MEASURED_STEPS, forward: str = "model", device: str = "cpu") -> dict:
    import torch
    from transformers import GenerationConfig

    from ..engine import BatchConfig, Engine
    from ..testing import tiny_llama, token_prompts

    if forward not in FORWARDS:
        raise ValueError(f"forward must be one of {FORWARDS}, got {forward!r}")
    device = torch.device(device)
    torch.set_num_threads(1)
    # Requests prefilled early decode while later ones prefill: enough new tokens that every
    # request is still running through the measured steps.
    max_new = 2 * steps + 64
    model = tiny_llama(vocab=512, max_positions=CONTEXT + max_new + 16, device=device)
    block_size = 16
    blocks = n * (-(-(CONTEXT + max_new) // block_size) + 1)
    # The same engine path on every device: the PyTorch attention backend, steps run one after
    # the other (no asynchronous scheduling, no CUDA graphs), so a step splits cleanly into
    # the forward and the host's work around it.
    config = BatchConfig(backend="torch", num_blocks=blocks, block_size=block_size, max_num_seqs=n,
                         max_batch_tokens=max(n, 8192), prefix_caching=False, async_scheduling=False)
    engine = Engine(model, config)
    gc = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0)
    for prompt in token_prompts([CONTEXT] * n, vocab=512):
        engine.add_request(prompt, gc)
    while any(len(r.tokens) == r.prompt_len for r in engine.requests.values()):
        engine.step()  # prefills (and the first decode of early ones)
    if forward == "none":
        engine.runner.forward = _stand_in_forward(engine.runner, model.config.vocab_size)
    elif device.type == "cuda":
        engine.runner.forward = _synchronized_forward(engine.runner)
    engine.step()  # one decode step before measuring
    phases = {key: [] for key in PHASES}
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        total = time.perf_counter() - start
        t = engine.last_step_timing
        for key in phases:
            phases[key].append(t[key] if key != "host" else total - t["forward"] - t["device_wait"])
    running = len(engine.scheduler.running)
    return {"running": running, "forward": forward, "device": device.type,
            **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in phases.items()}}


def run_host(out_dir=None, running=RUNNING, device=None) -> list[dict]:
    from tqdm import tqdm

    device = device or default_device()
    points = [(n, f) for n in running for f in FORWARDS]  # both measures of a point back to back
    rows = [measure(n, forward=f, device=device) for n, f in tqdm(points, desc="host work", unit="point")]
    csv_path = report("host", rows, ["running", "forward", "device", "host_ms", "schedule_ms", "prepare_ms", "sample_ms",
                                     "postprocess_ms", "forward_ms"], out_dir)
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for forward, style in zip(FORWARDS, ("-", ":")):
            mine = [r for r in rows if r["forward"] == forward]
            xs = [r["running"] for r in mine]
            keys = ("host_ms", "schedule_ms", "prepare_ms", "sample_ms", "postprocess_ms") if forward == "model" else ("host_ms",)
            for key in keys:
                label = key.removesuffix("_ms") + (f" ({device} forward between steps)" if forward == "model" else
                                                   " (forward stand-in, as on a GPU)")
                ax.plot(xs, [r[key] for r in mine], marker="o", linestyle=style, label=label)
        ax.axhline(GOAL_MS_AT_256, color="grey", linestyle="--", label=f"goal at 256: {GOAL_MS_AT_256} ms")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("running decode requests")
        ax.set_ylabel("ms per step (median)")
        ax.set_title(f"host work per engine step ({device_name()})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        png = csv_path.with_suffix(".png")
        fig.savefig(png, dpi=120)
        print(f"wrote {png}")
    return rows
