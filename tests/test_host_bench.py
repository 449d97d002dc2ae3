"""`cbkernels bench host`: both measures run the engine for real and report every phase."""
import pytest

from cbkernels.benchmarks.host import FORWARDS, PHASES, measure


@pytest.mark.parametrize("forward", FORWARDS)
def test_host_measure_reports_every_phase_with_all_requests_running(forward):
    row = measure(8, steps=2, forward=forward)
    assert row["running"] == 8 and row["forward"] == forward
    for phase in PHASES:
        assert row[f"{phase}_ms"] >= 0.0
    assert row["host_ms"] >= row["schedule_ms"]


def test_host_measure_rejects_an_unknown_forward():
    with pytest.raises(ValueError, match="forward"):
        measure(8, steps=1, forward="gpu")
