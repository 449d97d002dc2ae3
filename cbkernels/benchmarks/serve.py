"""``cbkernels bench serve``: the HTTP server under load, against the engine alone and
against ``transformers serve --continuous-batching``, in one run, loopback only.

Workload: the 16 chat prompts of ``workloads.BENCH_PROMPTS`` in a fixed cycle, greedy, at most
``max_tokens`` new tokens, streamed (Server-Sent Events, ``stream_options.include_usage``).
Phases: closed loops of 1, 4, 16 and 64 clients (each sends its next request when the last
one ends; a bounded number of requests per level, and none started after START_BUDGET_S),
then an open loop with Poisson arrivals.
The engine alone runs the same prompts through ``Engine`` directly (threads calling
``add_request`` / ``stream``) at the same concurrency: the ratio of the server's output
tokens/s to it is the server's overhead. Both servers run as separate processes, side by
side, with the same KV capacity (8,192 tokens), step budget (1,024 tokens) and torch threads
(transformers with sdpa, its fastest CPU attention in ``bench peers``); at each level the three
systems are measured back to back, so a change in the machine's load hits them alike.

Measured per request at the client (``cbkernels.server.loadgen``): TTFT, ITL, output tokens,
errors, 5xx, lost. Each row also
records the machine's 1-minute load average: on a shared machine, figures taken under load
are noisy, and the load says how much.
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..server.loadgen import START_BUDGET_S, Sample, http_closed, http_open, summarize
from ..server.testing import ServerProcess, free_port
from .common import device_name, print_table, pyplot, result_path, write_csv
from .workloads import BENCH_PROMPTS

LEVELS = (1, 4, 16, 64)
REQUESTS = {1: 8, 4: 16, 16: 48, 64: 128}  # per closed-loop level
POISSON = (3.0, 60)  # arrivals per second, requests
NUM_BLOCKS, BLOCK_SIZE = 512, 16  # cbkernels' cache; transformers gets 32 x 256: the same 8,192 tokens
MAX_NUM_SEQS, MAX_BATCH_TOKENS = 64, 1024  # cbkernels serve and the engine alone: one configuration
COLUMNS = ["system", "mode", "clients", "requests", "ok", "errors", "5xx", "lost", "wall_s", "req_per_s",
           "out_tok_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "loadavg_1m"]


# ---------------------------------------------------------------- the engine alone
def engine_closed(engine, prompts, gc, clients, total) -> dict:
    """The same closed loop through ``Engine`` directly: one thread per client."""
    order, lock, samples, began = iter(range(total)), threading.Lock(), [], time.perf_counter()

    def worker():
        while True:
            with lock:
                i = next(order, None)
            if i is None or time.perf_counter() - began > START_BUDGET_S:
                return
            sample, sent, last = Sample(), time.perf_counter(), None
            rid = engine.add_request(prompts[i % len(prompts)], gc)
            for _ in engine.stream(rid):
                now = time.perf_counter()
                if last is None:
                    sample.ttft_s = now - sent
                else:
                    sample.itl_s.append(now - last)
                last, sample.tokens = now, sample.tokens + 1
            out = engine.pop_result(rid)
            sample.ok, sample.error = out.error is None, out.error
            samples.append(sample)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize("engine alone", "closed", clients, samples, time.perf_counter() - began)


# ---------------------------------------------------------------- servers as processes
def _env(threads):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _server_argv(kind, model_dir, port, threads):
    if kind == "cbkernels":
        argv = [sys.executable, "-m", "cbkernels", "serve", "--model", str(model_dir), "--port", str(port),
                "--served-model-name", "bench", "--num-blocks", str(NUM_BLOCKS), "--block-size", str(BLOCK_SIZE),
                "--max-num-seqs", str(MAX_NUM_SEQS), "--max-batch-tokens", str(MAX_BATCH_TOKENS), "--max-queue", "256",
                "--log-level", "warning"]
        return argv + (["--threads", str(threads)] if threads else [])
    return [sys.executable, "-c", "from transformers.cli.transformers import main; main()", "serve", str(model_dir),
            "--continuous-batching", "--device", "cpu", "--dtype", "float32", "--port", str(port), "--host",
            "127.0.0.1", "--cb-block-size", "256", "--cb-num-blocks", str(NUM_BLOCKS * BLOCK_SIZE // 256),
            "--cb-max-batch-tokens", str(MAX_BATCH_TOKENS), "--attn-implementation", "sdpa", "--log-level", "warning"]


def start_server(kind, model_dir, threads, workdir) -> ServerProcess:
    port = free_port()
    return ServerProcess(_server_argv(kind, model_dir, port, threads), port, workdir / f"{kind}.log", _env(threads))


# ---------------------------------------------------------------- the run
def _model_dir(model):
    """A local safetensors directory of the model: the embedded GGUF (or a given one) converted
    once by the model cache, or a given directory as it is."""
    from ..model_cache import converted_gguf
    from ..models import DEFAULT_GGUF, default_model_dir

    if model is None:
        return converted_gguf(default_model_dir() / DEFAULT_GGUF)
    return converted_gguf(Path(model)) if str(model).endswith(".gguf") else Path(model)


def _plot(rows, path):
    plt = pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for n, system in enumerate(dict.fromkeys(r["system"] for r in rows)):
        pts = [r for r in rows if r["system"] == system and r["mode"] == "closed"]
        xs = [r["clients"] for r in pts]
        left.plot(xs, [r["out_tok_per_s"] for r in pts], marker="o", label=system, color=f"C{n}")
        if system != "engine alone":
            right.plot(xs, [r["ttft_p99_ms"] for r in pts], marker="o", label=system, color=f"C{n}")
    right.set_yscale("log")
    for ax, label in ((left, "output tokens/s"), (right, "p99 time to first token (ms, log)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"HTTP serving, SmolLM2-135M-Instruct, {device_name()}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _goals(rows) -> list[str]:
    def at(system, clients):
        return next((r for r in rows if r["system"] == system and r["clients"] == clients), None)

    ours, alone, peer = at("cbkernels serve", 16), at("engine alone", 16), at("transformers serve", 16)
    lines = []
    if ours and peer and peer["out_tok_per_s"] > 0:
        lines.append(f"16 clients: {ours['out_tok_per_s'] / peer['out_tok_per_s']:.2f}x transformers serve's output "
                     f"tokens/s (goal >= 1.3); p99 TTFT {ours['ttft_p99_ms']:.0f} ms vs {peer['ttft_p99_ms']:.0f} ms "
                     f"(goal: no worse)")
    if ours and alone and alone["out_tok_per_s"] > 0:
        lines.append(f"16 clients: server overhead {1 - ours['out_tok_per_s'] / alone['out_tok_per_s']:.1%} of the "
                     f"engine's own tokens/s (goal <= 10%)")
    big = at("cbkernels serve", 64)
    if big:
        lines.append(f"64 clients: {big['5xx']} responses 5xx, {big['lost']} lost, {big['errors']} errors of "
                     f"{big['requests']} requests (goal: no 5xx, none lost)")
    return lines


def run_serve_bench(model=None, *, out_dir=None, max_tokens: int = 32, quick: bool = False, threads=None,
                    peer: bool = True, progress: bool = True) -> list[dict]:
    """Both servers run side by side (idle ones take no CPU) and every level measures the
    three systems back to back, so a change in the machine's load hits them alike."""
    from transformers import GenerationConfig

    from ..models import load_for_device
    from ..engine import BatchConfig, Engine
    from .workloads import encode_prompts

    if threads:
        import torch

        torch.set_num_threads(threads)
    scale = 0.5 if quick else 1.0
    model_dir = _model_dir(model)
    rows, notes, targets = [], [], []
    with tempfile.TemporaryDirectory(prefix="cbkernels-bench-serve-") as tmp:
        servers = {kind: start_server(kind, model_dir, threads, Path(tmp))
                   for kind in (("cbkernels", "transformers") if peer else ("cbkernels",))}
        hf_model, tokenizer, _ = load_for_device(str(model_dir))
        prompts = encode_prompts(tokenizer, BENCH_PROMPTS)
        eos = tokenizer.eos_token_id
        gc = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=[eos], pad_token_id=eos)
        engine = Engine(hf_model, BatchConfig(num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, max_num_seqs=MAX_NUM_SEQS,
                                              max_batch_tokens=MAX_BATCH_TOKENS)).start()
        try:
            for kind, server in servers.items():
                why = server.wait_ready()
                if why is None:
                    name = "bench" if kind == "cbkernels" else str(model_dir)
                    targets.append((f"{kind} serve", server.url, name))
                    http_closed(f"{kind} serve", server.url, name, BENCH_PROMPTS, 4, 8, max_tokens)  # warm-up
                else:
                    notes.append(f"{kind} serve could not be measured: {why}")
            engine_closed(engine, prompts, gc, 4, 8)  # warm-up
            for clients in LEVELS:
                total = max(clients, int(REQUESTS[clients] * scale))
                for system, url, name in targets[:1] + [("engine alone", None, None)] + targets[1:]:
                    rows.append(engine_closed(engine, prompts, gc, clients, total) if url is None
                                else http_closed(system, url, name, BENCH_PROMPTS, clients, total, max_tokens))
                    if progress:
                        print(f"  {clients:>2} clients  {system:<18} {rows[-1]['out_tok_per_s']:6.1f} tok/s  "
                              f"{rows[-1]['errors']} errors", flush=True)
            rate, total = POISSON
            for system, url, name in targets:
                rows.append(http_open(system, url, name, BENCH_PROMPTS, rate, max(8, int(total * scale)), max_tokens))
        finally:
            engine.stop()
            for kind, server in servers.items():
                code = server.stop()
                if kind == "cbkernels" and code != 0:
                    notes.append(f"cbkernels serve exited with code {code} on SIGTERM")
    print_table(rows, COLUMNS)
    for line in _goals(rows) + notes:
        print(line)
    csv_path, png_path = result_path("serve", "csv", out_dir), result_path("serve", "png", out_dir)
    write_csv(csv_path, rows + [{"system": "note", "mode": n} for n in notes])
    _plot(rows, png_path)
    print(f"wrote {csv_path} and {png_path.name}")
    return rows
