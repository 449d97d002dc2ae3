"""Shared benchmark plumbing: timing, device naming, tables, CSV and PNG result files."""
from __future__ import annotations

import csv
import datetime as dt
import os
import platform
import statistics
import time
from pathlib import Path

import torch

# The repository's bench/results when run from a checkout; otherwise ./bench-results.
_REPO_RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
RESULTS_DIR = _REPO_RESULTS if _REPO_RESULTS.parent.is_dir() else Path("bench-results")
# Device-to-device copy ceiling of an H100 SXM (bytes read + written), a figure read on such a
# card outside this project, NOT yet measured by it: the "% of ceiling" columns are relative
# to it until bench/gpu_check.sh records a measured copy rate on the card it runs on.
H100_COPY_CEILING_GBPS = 3000.0


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()


def result_path(stem: str, suffix: str, out_dir: Path | None = None) -> Path:
    """bench/results/<stem>-<device>-<date>.<suffix>"""
    out_dir = Path(out_dir) if out_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir / f"{stem}-{slug(device_name())}-{dt.date.today().isoformat()}.{suffix}"


def time_ms(fn, *, warmup: int = 3, reps: int = 20) -> float:
    """Median milliseconds per call: do_bench on CUDA, wall clock on CPU."""
    if torch.cuda.is_available():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows as CSV (columns: every key in order of first appearance) plus the device, the
    versions and the time of the run on every row."""
    from cbkernels import __version__

    meta = {"device": device_name(), "torch": torch.__version__, "cbkernels": __version__,
            "date": dt.datetime.now().isoformat(timespec="seconds")}
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys + list(meta))
        writer.writeheader()
        for row in rows:
            writer.writerow(row | meta)


def _cell(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A right-aligned text table of ``columns`` (floats to 3 significant digits)."""
    cells = [[_cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


def report(stem: str, rows: list[dict], columns: list[str], out_dir=None) -> Path:
    """Print ``rows`` as a table and write them to bench/results/<stem>-<device>-<date>.csv;
    returns the CSV path (a plot goes beside it with ``.with_suffix(".png")``)."""
    print_table(rows, columns)
    path = result_path(stem, "csv", out_dir)
    write_csv(path, rows)
    print(f"wrote {path}")
    return path


def pyplot():
    """matplotlib's pyplot on the non-interactive backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'cbkernels[bench]'): no plot written")
        return None
    return plt
