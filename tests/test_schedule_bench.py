"""bench schedule's budget part: the fixed-budget frontier and the goal's verdict, the
chat-and-documents workload, and the runs advanced side by side on the step clock."""
import math

import pytest

from cbkernels.benchmarks import schedule_budget as sb
from cbkernels.benchmarks.schedule_runs import _config, _Run, run_group
from cbkernels.testing import tiny_llama


def _row(budget, tok_s, p99, target=None, repeat=0, workload="mixed"):
    return dict(part="budget", workload=workload, repeat=repeat, budget="adaptive" if target else budget,
                target_itl_ms=target, output_tok_s=tok_s, itl_p99_ms=p99)


def test_frontier_interpolates_between_the_bracketing_budgets():
    fixed = [(32, 100.0, 10.0), (64, 200.0, 20.0), (128, 300.0, 40.0)]
    assert sb.frontier_p99(fixed, 150.0) == pytest.approx(15.0)
    assert sb.frontier_p99(fixed, 250.0) == pytest.approx(30.0)
    assert sb.frontier_p99(fixed, 300.0) == pytest.approx(40.0)
    assert sb.frontier_p99(fixed, 50.0) == pytest.approx(10.0)  # every budget serves more: the best p99
    assert sb.frontier_p99(fixed, 301.0) is None  # no fixed budget reaches it


def test_frontier_takes_the_best_fixed_point_when_throughput_is_not_monotone():
    """Noise can give a larger budget less throughput: the frontier is the lowest p99 of any
    fixed point (or segment) at the throughput, the reading most favourable to fixed budgets."""
    fixed = [(32, 100.0, 10.0), (64, 220.0, 20.0), (128, 200.0, 40.0)]
    assert sb.frontier_p99(fixed, 210.0) == pytest.approx(10.0 + 10.0 * 110 / 120)  # 32-64, not 64-128 (30)
    assert sb.frontier_p99(fixed, 221.0) is None


def test_summary_counts_a_round_as_met_only_when_both_halves_hold():
    rows = [_row(32, 100.0, 10.0), _row(64, 200.0, 20.0), _row(128, 300.0, 40.0),
            _row(None, 250.0, 10.5, target=10.0),  # within 10%; the frontier at 250 tok/s: 30 ms
            _row(32, 100.0, 10.0, repeat=1), _row(64, 260.0, 11.0, repeat=1), _row(128, 300.0, 40.0, repeat=1),
            _row(None, 250.0, 10.4, target=10.0, repeat=1)]  # the 64 budget serves more at 11 ms
    summary = {r["setting"]: r for r in sb.summarize_budget(rows)}
    adaptive = summary["target_itl_ms=10.0"]
    assert adaptive["rounds"] == 2 and adaptive["rounds_within_10pct"] == 2 and adaptive["rounds_binding"] == 2
    assert adaptive["rounds_equal_missed"] == 1 and adaptive["rounds_goal_met"] == 1
    assert adaptive["rounds_band_missed"] == 1  # round 0: 64 (0.8x) is outside the 97% band, 128 misses
    assert adaptive["gain_over_best_meeting"] == pytest.approx((250 / 100 + 250 / 260) / 2)
    assert summary["max_batch_tokens=64"]["itl_p99_ms"] == pytest.approx(15.5)


def test_judge_counts_a_target_no_fixed_budget_reaches_as_missed():
    runs = [_row(32, 100.0, 9.0), _row(64, 110.0, 30.0)]
    verdict = sb.judge(runs, 10.0, _row(None, 150.0, 10.2, target=10.0))
    assert verdict["frontier_p99_ms"] is None and verdict["equal_missed"] and verdict["band_missed"]
    assert verdict["within"] and verdict["best_meeting_tok_s"] == 100.0
    assert verdict["binding"]  # the budget of the most throughput (64: 30 ms) misses 10 ms


def test_a_target_the_fullest_fixed_budget_meets_does_not_bind():
    runs = [_row(32, 100.0, 9.0), _row(64, 110.0, 10.5), _row(128, 108.0, 30.0)]
    assert not sb.judge(runs, 10.0, _row(None, 111.0, 10.2, target=10.0))["binding"]  # 64 serves most, in 10%
    assert sb.judge(runs, 9.0, _row(None, 111.0, 9.2, target=9.0))["binding"]


def test_chat_and_documents_workload():
    specs, times = sb.chat_and_documents(3, seed=1)
    assert len(specs) == len(times) and times == sorted(times)
    chats = [(s, t) for s, t in zip(specs, times) if s[2] == 1]
    docs = [(s, t) for s, t in zip(specs, times) if s[2] == 0]
    assert {t for _, t in chats} == {0.0, sb.BURST_EVERY, 2.0 * sb.BURST_EVERY}
    assert all(sb.CHAT_BURST[0] <= sum(1 for _, t in chats if t == k * sb.BURST_EVERY) <= sb.CHAT_BURST[1]
               for k in range(3))
    assert len(docs) == math.ceil(3 * sb.BURST_EVERY / sb.DOC_EVERY)
    assert all(sb.DOC_PROMPT[0] <= p <= sb.DOC_PROMPT[1] and sb.DOC_ANSWER[0] <= o <= sb.DOC_ANSWER[1]
               for (p, o, _), _ in docs)
    assert all(sb.CHAT_PROMPT[0] <= p <= sb.CHAT_PROMPT[1] and sb.CHAT_ANSWER[0] <= o <= sb.CHAT_ANSWER[1]
               for (p, o, _), _ in chats)
    assert sb.chat_and_documents(3, seed=1) == (specs, times)
    with pytest.raises(ValueError, match="workload"):
        sb.workload("bursty", 1, None, 64)


def test_runs_side_by_side_see_the_same_arrivals_and_keep_their_own_clocks():
    """run_group on the step clock: every setting serves the same requests in the same steps
    when their budgets do not bind; the busy clock counts only each run's own steps."""
    model = tiny_llama(vocab=64, max_positions=256)
    specs = [(12, 5, 0), (7, 9, 1), (20, 3, 0), (9, 6, 2)]
    times = [0.0, 0.0, 3.0, 40.0]
    sizes = dict(num_blocks=32, block_size=8, max_num_seqs=8)
    configs = [_config("greedy", {**sizes, "max_batch_tokens": b}) for b in (64, 128)]
    rows = run_group(model, specs, times, configs, 64, cap=16, clock="busy")
    assert [r["budget"] for r in rows] == [64, 128]
    assert rows[0]["steps"] == rows[1]["steps"] and rows[0]["requests"] == 4
    for r in rows:
        assert r["clock"] == "busy" and 0 < r["busy_s"] and 0 < r["cpu_s"]
        assert r["itl_p99_ms"] <= 1e3 * r["busy_s"]
    with pytest.raises(ValueError, match="clock"):
        _Run(model, specs, times, configs[0], 64, 16, clock="steps")
    with pytest.raises(ValueError, match="step clock"):
        run_group(model, specs, times, configs, 64, cap=16, clock="wall")
