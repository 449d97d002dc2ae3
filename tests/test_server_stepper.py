"""The server's serving thread (cbkernels.server.stepper) on a tiny random Llama, no HTTP:
every step's output leaves in one post, the tokens and log-probabilities are the engine's
own, cancelled requests free their blocks, and a stop hands out their cancelled outputs."""
import threading

import pytest

pytest.importorskip("fastapi", reason="the server needs the serve extra")

from transformers import GenerationConfig  # noqa: E402

from cbkernels import BatchConfig, Engine  # noqa: E402
from cbkernels.server.stepper import Stepper, Track  # noqa: E402
from cbkernels.testing import assert_pool_accounting, tiny_llama, token_prompts  # noqa: E402


class Sink:
    def __init__(self):
        self.posts = []

    def __call__(self, batch):
        self.posts.append(batch)


def _engine():
    model = tiny_llama()
    return Engine(model, BatchConfig(num_blocks=64, block_size=16, max_num_seqs=8, backend="torch"))


def _add(stepper, prompts, gc, kwargs):
    tracks = [Track(None, i, f"r{i}") for i in range(len(prompts))]
    settled = threading.Event()
    errors = []
    stepper.add(tracks, prompts, gc, kwargs, lambda e: (errors.append(e), settled.set()))
    assert settled.wait(30) and errors == [None]
    return tracks


def test_one_post_per_step_with_the_engines_tokens_and_logprobs():
    engine, sink = _engine(), Sink()
    prompts = token_prompts([5, 9, 3], vocab=96)
    gc = GenerationConfig(max_new_tokens=6, do_sample=False)
    expected = _engine().generate(prompts, gc, return_logprobs=True, top_logprobs=2)
    stepper = Stepper(engine, sink)
    stepper.start()
    try:
        _add(stepper, prompts, gc, {"return_logprobs": True, "top_logprobs": 2})
        deadline = threading.Event()
        while sum(ev.output is not None for batch in sink.posts for _, ev in batch) < 3:
            assert not deadline.wait(0.02) and engine.num_steps < 100
    finally:
        stepper.stop(30)
    token_posts = [batch for batch in sink.posts if any(ev.tokens for _, ev in batch)]
    assert len(token_posts) <= engine.num_steps  # never more than one post per step
    # a step's three requests left together
    assert max(sum(bool(ev.tokens) for _, ev in batch) for batch in token_posts) == 3
    for i, ref in enumerate(expected):
        events = [ev for batch in sink.posts for track, ev in batch if track.index == i]
        assert [t for ev in events for t in ev.tokens] == ref.generated_tokens
        assert [v for ev in events for v in ev.logprobs] == ref.logprobs
        assert [list(t) for ev in events for t in ev.top] == ref.top_logprobs
        assert events[-1].output.finish_reason == "length"
    assert engine.requests == {}  # every output was popped
    assert_pool_accounting(engine.cache)


def test_cancel_frees_blocks_and_stop_hands_out_cancelled_outputs():
    engine, sink = _engine(), Sink()
    prompts = token_prompts([7, 7], vocab=96)
    gc = GenerationConfig(max_new_tokens=40, do_sample=False)
    stepper = Stepper(engine, sink)
    stepper.start()
    try:
        _add(stepper, prompts, gc, {})
        stepper.cancel(["r0"])
    finally:
        stepper.stop(30)
    outputs = {track.rid: ev.output for batch in sink.posts for track, ev in batch if ev.output is not None}
    assert set(outputs) == {"r0", "r1"}
    assert {o.finish_reason for o in outputs.values()} == {"cancelled"}
    assert engine.cache.get_num_free_blocks() == engine.cache.num_blocks
    assert stepper.error is None
