"""32 concurrent streaming clients (asyncio, the official client), a quarter of them leaving
mid-stream: every other stream is complete and equals the engine's greedy output, the
leavers' requests are cancelled, and afterwards /metrics shows nothing running or waiting
and every cache block free. The server runs 16 sequences at once and queues 16 more."""
import asyncio
import time

import httpx
import pytest

from cbkernels.server.testing import QUESTIONS, chat_ids, engine_greedy, served_model

openai = pytest.importorskip("openai", reason="the server tests need the test extra (openai)")

MODEL = "smollm2-load"
CLIENTS, MAX_NEW, LEAVER_MAX_NEW = 32, 12, 200


@pytest.fixture(scope="module")
def served():
    with served_model(num_blocks=512, max_batch_tokens=512, max_num_seqs=16, model_name=MODEL, max_waiting=16) as srv:
        yield srv


def metric_values(url):
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_concurrent_streams_with_disconnects(served):
    tok, url = served.tokenizer, served.base_url
    expected = dict(zip(QUESTIONS, engine_greedy([chat_ids(tok, q) for q in QUESTIONS], MAX_NEW)))
    before = metric_values(url)

    async def one(i, client):
        question, leaver = QUESTIONS[i % len(QUESTIONS)], i % 4 == 3
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], temperature=0, stream=True,
            max_tokens=LEAVER_MAX_NEW if leaver else MAX_NEW, stream_options={"include_usage": True})
        text, usage, finish = "", None, None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
            if leaver and text:
                await stream.close()  # leave mid-stream
                return question, None, None, None
        return question, text, finish, usage

    async def run_all():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300) as client:
            return await asyncio.gather(*(one(i, client) for i in range(CLIENTS)))

    results = asyncio.run(run_all())
    finished = [r for r in results if r[1] is not None]
    assert len(finished) == CLIENTS - CLIENTS // 4
    for question, text, finish, usage in finished:
        ref = expected[question]
        assert text == tok.decode(ref, skip_special_tokens=True), question
        assert finish == ("stop" if ref[-1] == tok.eos_token_id else "length")
        assert usage.completion_tokens == len(ref) and usage.prompt_tokens == len(chat_ids(tok, question))

    def delta(after, name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    def idle(after):
        return (after[("cbkernels_requests_running", ())], after[("cbkernels_requests_waiting", ())],
                after[("cbkernels_server_sequences_in_flight", ())],
                delta(after, "cbkernels_http_requests_total", method="POST", path="/v1/chat/completions", status="200"))

    deadline = time.monotonic() + 15  # cancellation is immediate; the scrape may race the last step
    while idle(after := metric_values(url)) != (0, 0, 0, CLIENTS) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert idle(after) == (0, 0, 0, CLIENTS)
    assert after[("cbkernels_cache_free_blocks", ())] == after[("cbkernels_cache_blocks", ())] == 512
    assert served.engine.cache.get_num_free_blocks() == served.engine.cache.num_blocks
    assert delta(after, "cbkernels_requests_finished_total", reason="cancelled") == CLIENTS // 4  # every leaver
    assert delta(after, "cbkernels_time_to_first_token_seconds_count") == CLIENTS
