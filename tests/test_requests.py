"""The request state machine: legal paths pass, everything else raises."""
import pytest

from cbkernels.engine.requests import IllegalTransition, Request, RequestStatus as S, SamplingParams


def _req():
    return Request("r", 3, [1, 2, 3], SamplingParams(max_new_tokens=2, eos_token_ids=(9,)))


@pytest.mark.parametrize("path", [
    [S.PREFILLING, S.DECODING, S.DECODING, S.FINISHED],
    [S.PREFILLING_SPLIT, S.SPLIT_PENDING_REMAINDER, S.PREFILLING_SPLIT, S.SPLIT_PENDING_REMAINDER,
     S.PREFILLING_SPLIT, S.DECODING, S.FINISHED],
    [S.PREFILLING, S.DECODING, S.PENDING, S.PREFILLING_SPLIT, S.DECODING, S.FAILED],
    [S.PREFILLING_SPLIT, S.PENDING, S.PREFILLING, S.FINISHED],
])
def test_legal_paths(path):
    req = _req()
    for status in path:
        req.transition(status)
    assert req.is_done


# The state machine as specified, written out edge by edge independently of the code's table:
# prefill (whole or split) -> decode -> finished; preemption back to PENDING from every state
# that holds blocks; FINISHED (cancellation, a stop at the first token) and FAILED from every
# live state; DECODING -> DECODING for each further token; nothing leaves a terminal state.
LIVE = (S.PENDING, S.PREFILLING, S.PREFILLING_SPLIT, S.SPLIT_PENDING_REMAINDER, S.DECODING)
SPEC = {
    (S.PENDING, S.PREFILLING), (S.PENDING, S.PREFILLING_SPLIT),
    (S.PREFILLING, S.DECODING), (S.PREFILLING_SPLIT, S.DECODING),
    (S.PREFILLING_SPLIT, S.SPLIT_PENDING_REMAINDER), (S.SPLIT_PENDING_REMAINDER, S.PREFILLING_SPLIT),
    (S.DECODING, S.DECODING),
    *((src, S.PENDING) for src in LIVE if src is not S.PENDING),
    *((src, end) for src in LIVE for end in (S.FINISHED, S.FAILED)),
}


@pytest.mark.parametrize("src", list(S))
@pytest.mark.parametrize("dst", list(S))
def test_transitions_match_the_specification(src, dst):
    req = _req()
    req.status = src
    if (src, dst) in SPEC:
        req.transition(dst)
        assert req.status is dst
    else:
        with pytest.raises(IllegalTransition):
            req.transition(dst)
        assert req.status is src


def test_stop_reasons_and_output():
    req = _req()
    assert req.stop_reason() is None
    req.append_token(5, 1.0)
    assert req.stop_reason() is None
    req.append_token(9, 2.0)
    assert req.stop_reason() == "eos"
    out = req.to_output()
    assert out.generated_tokens == [5, 9] and out.itl_s == [1.0] and out.error is None
    req2 = _req()
    req2.append_token(1, 0.0)
    req2.append_token(2, 0.0)
    assert req2.stop_reason() == "length"


def test_fail_records_reason():
    req = _req()
    req.fail("too long")
    assert req.status is S.FAILED and req.to_output().error == "too long"
