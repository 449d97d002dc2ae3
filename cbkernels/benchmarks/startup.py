"""Start-up of ``cbkernels generate``: wall time of a fresh process from launch to exit.

* ``help``: ``cbkernels --help`` (the import cost of the command line alone);
* ``cold``: an empty model cache, so the run includes the one-time GGUF conversion;
* ``warm``: later runs, loading the converted safetensors copy.
* ``warm-1-thread``: a warm run with ``OMP_NUM_THREADS=1``: on a busy 2-core machine two torch
  threads wait on each other, which stretches the generation, not the start-up.

Each row splits the wall time into ``generation_s`` (the engine run, from generate's --json
record) and ``startup_s`` (everything else: imports, model load or conversion, exit).

Each run is its own subprocess with the cache directory in a temporary directory (removed
afterwards), answering "What is the capital of France?" with 8 new tokens. The goal is a warm
run within 12 s on a 2-core CPU machine. The 1-minute load average before each run is recorded:
on a shared machine other processes' load stretches every wall time; ``cpu_s`` (the run's user +
system CPU seconds) is the work itself.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..model_cache import CACHE_ENV, ENTRIES
from .common import print_table, result_path, write_csv

PROMPT = "What is the capital of France?"
MAX_NEW_TOKENS = 8
GOAL_S = 12.0


def _cpu_s() -> float:
    """CPU seconds (user + system) of the finished child processes so far."""
    try:
        import resource
    except ImportError:  # not on Windows
        return float("nan")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(args: list[str], env: dict) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, CPU seconds, finished process) of one ``cbkernels`` run."""
    cpu, start = _cpu_s(), time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cbkernels", *args], capture_output=True, text=True,
                          env=env, timeout=1800)
    return time.perf_counter() - start, _cpu_s() - cpu, proc


def _cache_mb(cache: Path) -> float:
    root = cache / ENTRIES
    files = [f for f in root.rglob("*") if f.is_file()] if root.is_dir() else []
    return round(sum(f.stat().st_size for f in files) / 1e6, 1)


def _serve_health_row(env: dict, cache: Path) -> dict:
    """Seconds from starting ``cbkernels serve`` (warm cache) to its first ``/health`` 200."""
    from ..server.testing import ServerProcess, free_port

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    port = free_port()
    start = time.perf_counter()
    server = ServerProcess([sys.executable, "-m", "cbkernels", "serve", "--port", str(port)], port,
                           cache / "serve.log", env)
    problem = server.wait_ready(timeout_s=120)
    seconds = time.perf_counter() - start
    code = server.stop()
    if problem is not None:
        raise RuntimeError(f"cbkernels serve did not come up: {problem}")
    return {"run": "serve-health", "wall_s": round(seconds, 2), "generation_s": 0.0, "startup_s": round(seconds, 2),
            "cpu_s": "", "cache_mb": _cache_mb(cache), "answer": f"/health 200; SIGTERM exit {code}",
            "goal_s": GOAL_S, "cpus": os.cpu_count(), "load_avg_1m": round(load, 2), "prompt": "", "max_new_tokens": ""}


def run_startup(out_dir=None, warm_runs: int = 3, progress: bool = True) -> list[dict]:
    """Time ``--help``, one cold and ``warm_runs`` warm generate runs, and ``cbkernels serve``
    until ``/health`` answers; write the CSV."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="cbkernels-startup-") as cache:
        env = dict(os.environ, **{CACHE_ENV: cache})
        for name in ("TRITON_INTERPRET", "OMP_NUM_THREADS"):  # as a user runs it by default
            env.pop(name, None)
        record = Path(cache) / "run.json"  # generate's own record: its generation time
        generate = ["generate", PROMPT, "--max-new-tokens", str(MAX_NEW_TOKENS), "--quiet", "--json", str(record)]
        plan = ([("help", ["--help"])] + [("cold", generate)] + [("warm", generate)] * warm_runs
                + [("warm-1-thread", generate)])
        for i, (name, args) in enumerate(plan, start=1):
            if progress:
                print(f"[{i}/{len(plan)}] {name}: cbkernels {' '.join(args)}", file=sys.stderr, flush=True)
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
            run_env = dict(env, OMP_NUM_THREADS="1") if name == "warm-1-thread" else env
            seconds, cpu, proc = _timed(args, run_env)
            if proc.returncode != 0:
                raise RuntimeError(f"cbkernels {name} run failed ({proc.returncode}): {proc.stderr[-2000:]}")
            answer = proc.stdout.strip().splitlines()[0] if name != "help" and proc.stdout.strip() else ""
            generation = json.loads(record.read_text())["wall_s"] if name != "help" else 0.0
            rows.append({"run": name, "wall_s": round(seconds, 2), "generation_s": round(generation, 2),
                         "startup_s": round(seconds - generation, 2), "cpu_s": round(cpu, 2), "cache_mb": _cache_mb(Path(cache)),
                         "answer": answer[:60], "goal_s": GOAL_S if name.startswith("warm") else "",
                         "cpus": os.cpu_count(), "load_avg_1m": round(load, 2), "prompt": PROMPT if name != "help" else "",
                         "max_new_tokens": MAX_NEW_TOKENS if name != "help" else ""})
        rows.append(_serve_health_row(env, Path(cache)))
    print_table(rows, ["run", "wall_s", "startup_s", "generation_s", "cpu_s", "load_avg_1m", "answer"])
    warm = [r["wall_s"] for r in rows if r["run"] == "warm"]
    if warm:
        median = statistics.median(warm)
        print(f"warm median {median:.1f} s ({'within' if median <= GOAL_S else 'OVER'} the {GOAL_S:.0f} s goal), "
              f"cold {rows[1]['wall_s']:.1f} s")
    path = result_path("startup", "csv", out_dir)
    write_csv(path, rows)
    print(f"wrote {path}")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warm-runs", type=int, default=3)
    parser.add_argument("--out", help="directory for the CSV (default bench/results)")
    args = parser.parse_args(argv)
    run_startup(Path(args.out) if args.out else None, args.warm_runs)


if __name__ == "__main__":
    main()
