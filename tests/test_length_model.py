"""The length model against known distributions: quantiles within one bin plus sampling
error, the prior, conditioning on tokens already generated, bounded memory, drift."""
import math
import random

import pytest
from hypothesis import given, settings, strategies as st

from cbkernels.engine.length_model import BINS, HALF_LIFE, MIN_SAMPLES, LengthModel, bucket_of


def _true_quantile(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, math.ceil(q * len(s)) - 1)]


@settings(max_examples=40, deadline=None)
@given(lo=st.integers(1, 200), width=st.integers(0, 300), max_new=st.integers(64, 600),
       q=st.sampled_from([0.1, 0.5, 0.7, 0.9]), seed=st.integers(0, 10_000))
def test_quantile_of_uniform_lengths_within_bin_and_sampling_error(lo, width, max_new, q, seed):
    rng = random.Random(seed)
    hi = min(max_new, lo + width)
    lo = min(lo, hi)
    values = [rng.randint(lo, hi) for _ in range(800)]
    lm = LengthModel()
    for v in values:
        lm.record(40, max_new, v)
    got = lm.predict(40, max_new, 0, q)
    bin_w = (1 << bucket_of(max_new)) / BINS
    # DKW: with 800 samples the empirical CDF is within 0.06 of the true one (p > 0.99), so the
    # empirical quantile is bracketed by the true (q -+ 0.06)-quantiles; plus one bin of rounding.
    spread = (hi - lo) * 0.06 + bin_w + 1
    assert abs(got - _true_quantile(values, q)) <= spread


@settings(max_examples=25, deadline=None)
@given(mean=st.floats(3.0, 80.0), q=st.sampled_from([0.5, 0.9]), seed=st.integers(0, 10_000))
def test_quantile_of_geometric_lengths(mean, q, seed):
    rng = random.Random(seed)
    max_new = 512
    values = [min(max_new, 1 + int(rng.expovariate(1.0 / mean))) for _ in range(1000)]
    lm = LengthModel()
    for v in values:
        lm.record(10, max_new, v)
    got = lm.predict(10, max_new, 0, q)
    true_lo, true_hi = _true_quantile(values, max(0.01, q - 0.06)), _true_quantile(values, min(0.999, q + 0.06))
    bin_w = 1024 / BINS
    assert true_lo - bin_w - 1 <= got <= true_hi + bin_w + 1


def test_prior_until_enough_finished():
    lm = LengthModel()
    assert lm.predict(30, 200) == 200  # nothing known: the worst case
    for _ in range(MIN_SAMPLES - 1):
        lm.record(30, 200, 10)
    assert lm.predict(30, 200) == 200
    lm.record(30, 200, 10)
    assert lm.predict(30, 200) <= 10 + 256 / BINS


def test_knows_once_a_bucket_has_enough_finished():
    lm = LengthModel()
    assert not lm.knows(40, 300)
    for k in range(MIN_SAMPLES - 1):
        lm.record(40, 300, 100)
    assert not lm.knows(40, 300)
    lm.record(40, 300, 100)
    assert lm.knows(40, 300)
    assert lm.knows(1000, 300)  # the max_new_tokens bucket alone is enough (predict falls back to it)
    assert not lm.knows(40, 2000)


def test_conditioning_on_generated_tokens():
    lm = LengthModel()
    for i in range(400):
        lm.record(20, 300, 20 if i % 2 else 250)  # bimodal
    assert lm.predict(20, 300, 0, 0.25) < 40
    after = lm.predict(20, 300, 30, 0.25)  # past the short mode: only the long one is left
    assert 240 <= after <= 300
    for g in (0, 5, 100, 299, 300, 1000):
        p = lm.predict(20, 300, g, 0.5)
        assert min(300, g + 1) <= p <= 300


def test_prompt_buckets_tell_workloads_apart():
    lm = LengthModel()
    for _ in range(100):
        lm.record(20, 384, 16)  # chat
        lm.record(300, 384, 280)  # documents
    assert lm.predict(20, 384) < 40 and lm.predict(300, 384) > 250
    assert lm.prompt_quantile(0.25) < 32 <= 256 <= lm.prompt_quantile(0.9)


def test_memory_is_bounded_and_follows_drift():
    lm = LengthModel()
    rng = random.Random(0)
    for _ in range(20_000):
        lm.record(rng.randint(1, 4000), rng.randint(1, 4000), rng.randint(1, 100))
    assert lm.num_histograms() <= 2 * 13 * 13
    assert all(h.total < HALF_LIFE and len(h.counts) == BINS for h in (*lm._fine.values(), *lm._coarse.values()))
    for _ in range(2000):
        lm.record(50, 500, 20)
    for _ in range(3 * HALF_LIFE):
        lm.record(50, 500, 400)
    assert lm.predict(50, 500, 0, 0.5) > 350


def test_prediction_error_is_scored():
    lm = LengthModel()
    assert lm.mean_rel_error is None
    lm.record(5, 100, 10, predicted=15)
    lm.record(5, 100, 20, predicted=10)
    assert lm.mean_abs_error_tokens == pytest.approx(7.5)
    assert lm.mean_rel_error == pytest.approx((0.5 + 0.5) / 2)


@pytest.mark.parametrize("call, exc, name", [
    (lambda lm: lm.predict(0, 10), ValueError, "prompt_len"),
    (lambda lm: lm.predict(1, 10, -1), ValueError, "generated"),
    (lambda lm: lm.predict(1, 10, 0, 1.0), ValueError, "q"),
    (lambda lm: lm.predict(1, 10.0), TypeError, "max_new"),
    (lambda lm: lm.record(1, 10, 0), ValueError, "output_len"),
    (lambda lm: lm.record(True, 10, 1), TypeError, "prompt_len"),
])
def test_bad_arguments_raise_naming_them(call, exc, name):
    with pytest.raises(exc, match=name):
        call(LengthModel())
