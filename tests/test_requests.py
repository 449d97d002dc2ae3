"""The request state machine: legal paths pass, everything else raises."""
import pytest

from cbkernels.requests import ALLOWED_TRANSITIONS, IllegalTransition, Request, RequestStatus as S, SamplingParams


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


def test_every_illegal_transition_raises():
    for src in S:
        for dst in S:
            if dst in ALLOWED_TRANSITIONS[src]:
                continue
            req = _req()
            req.status = src
            with pytest.raises(IllegalTransition):
                req.transition(dst)


def test_terminal_states_are_final():
    assert not ALLOWED_TRANSITIONS[S.FINISHED] and not ALLOWED_TRANSITIONS[S.FAILED]


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
