"""CI-sized soak (bench/soak.py): a few hundred requests with random lengths, hostile
requests, cancellations and injected forward faults against a small cache, both schedulers,
prefix caching on. None lost or duplicated, every failure has a reason, no leaked block,
nobody overtaken under FIFO, tokens of re-run requests unchanged."""
import importlib.util
import pathlib

import pytest

SOAK_REQUESTS = 300  # ~1 s per scheduler on a laptop CPU
FAULT_RATE = 0.01  # higher than the bench default so a few hundred requests see faults


def _soak_module():
    path = pathlib.Path(__file__).parents[1] / "bench" / "soak.py"
    spec = importlib.util.spec_from_file_location("cbkernels_bench_soak", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("scheduler, async_scheduling", [("fifo", False), ("prefill_first", False), ("fifo", True)])
def test_soak_loses_nothing(scheduler, async_scheduling, tmp_path):
    soak = _soak_module()
    summary, rows = soak.run_soak(SOAK_REQUESTS, seed=11, scheduler=scheduler, fault_rate=FAULT_RATE, progress=False,
                                  async_scheduling=async_scheduling)
    assert summary["requests"] == len(rows) == SOAK_REQUESTS
    assert summary["lost"] == 0 and summary["duplicated"] == 0
    assert summary["finished"] + summary["failed"] == SOAK_REQUESTS
    assert summary["failures_without_reason"] == 0 and summary["hostile_not_failed"] == 0
    assert summary["leaked_blocks"] == 0 and summary["allocator_tables_left"] == 0
    assert summary["injected_faults"] >= 1 and any("injected soak fault" in r for r in summary["failures_by_reason"])
    assert summary["preemptions"] > 0 and summary["prefix_hit_rate"] > 0  # the small cache was under pressure
    assert summary["spot_checked"] > 0 and summary["spot_mismatches"] == 0
    if scheduler == "fifo":
        assert summary["max_overtaken"] == 0  # first come, first scheduled: nobody starves
    for row in rows:
        assert row["status"] in ("finished", "failed")
        assert (row["status"] == "failed") == bool(row["error"])
        assert row["generated"] <= max(row["max_new_tokens"], 0)
    stem = soak.write_results(summary, rows, tmp_path)
    assert stem.with_suffix(".json").exists() and stem.with_suffix(".csv").exists()
