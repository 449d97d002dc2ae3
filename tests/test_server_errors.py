"""Bad input and overload: every refusal has its status code and a well-formed OpenAI error
object, and the server answers the next request. A server of its own with small limits:
2 running + 1 waiting sequences, 64 cache blocks of 16 tokens (a 1,024-token context),
256 KiB bodies."""
import time

import httpx
import pytest

from cbkernels.server.testing import chat_ids, served_model

openai = pytest.importorskip("openai", reason="the server tests need the test extra (openai)")

MODEL = "smollm2-limits"
CONTEXT = 64 * 16
BODY_LIMIT = 256 << 10  # above CONTEXT x the longest token's characters, so a long text meets the context check first
CHAT, COMP = "/v1/chat/completions", "/v1/completions"
MSG = [{"role": "user", "content": "Say hi."}]


@pytest.fixture(scope="module")
def served():
    with served_model(num_blocks=64, max_batch_tokens=256, max_num_seqs=2, model_name=MODEL, max_waiting=1,
                      max_body_bytes=BODY_LIMIT) as srv:
        yield srv


def chat(**kw):
    return {"model": MODEL, "messages": MSG, "max_tokens": 2, **kw}


def comp(**kw):
    return {"model": MODEL, "prompt": "Hello", "max_tokens": 2, **kw}


BAD = [  # (name, path, body, status, param, code)
    ("malformed JSON", CHAT, b'{"model": ', 400, None, None),
    ("body not an object", CHAT, b"[1, 2]", 400, None, None),
    ("messages missing", CHAT, {"model": MODEL}, 400, "messages", None),
    ("messages a string", CHAT, {"model": MODEL, "messages": "hi"}, 400, "messages", None),
    ("unknown role", CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0].role", None),
    ("image part", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     400, "messages[0].content[0]", None),
    ("max_tokens a string", CHAT, chat(max_tokens="ten"), 400, "max_tokens", None),
    ("max_tokens zero", CHAT, chat(max_tokens=0), 400, "max_tokens", None),
    ("max_completion_tokens negative", CHAT, chat(max_tokens=None, max_completion_tokens=-3), 400,
     "max_completion_tokens", None),
    ("temperature too high", CHAT, chat(temperature=3.5), 400, "temperature", None),
    ("temperature a boolean", CHAT, chat(temperature=True), 400, "temperature", None),
    ("top_p negative", CHAT, chat(top_p=-0.1), 400, "top_p", None),
    ("top_k a float", CHAT, chat(top_k=2.5), 400, "top_k", None),
    ("n zero", CHAT, chat(n=0), 400, "n", None),
    ("n huge", CHAT, chat(n=1000), 400, "n", None),
    ("n over the server's capacity", CHAT, chat(n=4), 400, "n", None),  # 2 running + 1 waiting
    ("five stop strings", CHAT, chat(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    ("empty stop string", CHAT, chat(stop=[""]), 400, "stop", None),
    ("seed a float", CHAT, chat(seed=1.5), 400, "seed", None),
    ("stream_options without stream", CHAT, chat(stream_options={"include_usage": True}), 400, "stream_options", None),
    ("logprobs not a boolean", CHAT, chat(logprobs=2), 400, "logprobs", None),
    ("top_logprobs without logprobs", CHAT, chat(top_logprobs=2), 400, "top_logprobs", None),
    ("top_logprobs over 20", CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", None),
    ("top_logprobs negative", CHAT, chat(logprobs=True, top_logprobs=-1), 400, "top_logprobs", None),
    ("top_logprobs a float", CHAT, chat(logprobs=True, top_logprobs=1.5), 400, "top_logprobs", None),
    ("frequency_penalty", CHAT, chat(frequency_penalty=0.5), 400, "frequency_penalty", None),
    ("tools", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", None),
    ("response_format json", CHAT, chat(response_format={"type": "json_object"}), 400, "response_format", None),
    ("unknown parameter", CHAT, chat(frobnicate=1), 400, "frobnicate", None),
    ("unknown model", CHAT, chat(model="gpt-nope"), 404, "model", "model_not_found"),
    ("prompt missing", COMP, {"model": MODEL}, 400, "prompt", None),
    ("prompt a number", COMP, comp(prompt=42), 400, "prompt", None),
    ("token id outside the vocabulary", COMP, comp(prompt=[1, 10 ** 9]), 400, "prompt", None),
    ("completion logprobs over 20", COMP, comp(logprobs=21), 400, "logprobs", None),
    ("completion logprobs negative", COMP, comp(logprobs=-1), 400, "logprobs", None),
    ("completion logprobs a boolean", COMP, comp(logprobs=True), 400, "logprobs", None),
    ("echo", COMP, comp(echo=True), 400, "echo", None),
    ("prompt longer than the context", COMP, comp(prompt=[17] * (CONTEXT + 1)), 400, "prompt",
     "context_length_exceeded"),
    ("prompt + max_tokens over the context", COMP, comp(prompt=[17] * (CONTEXT - 10), max_tokens=20), 400,
     "max_tokens", "context_length_exceeded"),
    ("text over the context", COMP, comp(prompt="word " * 2000), 400, "prompt", "context_length_exceeded"),
    ("text far over the context", COMP, comp(prompt="word " * 30000), 400, "prompt", "context_length_exceeded"),
    ("body over the size limit", COMP, comp(prompt="x" * (BODY_LIMIT + 1)), 413, None, "request_too_large"),
]


def assert_error_object(resp, status, param=None, code=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
    assert (err["param"], err["code"]) == (param, code), err
    return err


def assert_still_serving(url):
    resp = httpx.post(url + COMP, json=comp(max_tokens=1, temperature=0), timeout=60)
    assert resp.status_code == 200 and resp.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("name,path,body,status,param,code", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_its_error_and_the_server_goes_on(served, name, path, body, status, param, code):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": {k: v for k, v in body.items() if v is not None}}
    resp = httpx.post(served.base_url + path, headers={"content-type": "application/json"}, timeout=60, **kwargs)
    err = assert_error_object(resp, status, param, code)
    if param:
        assert param.split("[")[0].split(".")[0] in err["message"]
    assert_still_serving(served.base_url)


def test_text_that_cannot_fit_is_refused_before_tokenising(served):
    """More characters than the context times the longest token's text: refused on its length
    alone (the message counts characters); a shorter text over the context is refused after
    tokenising (the message counts tokens)."""
    longest = max(len(t) for t in served.tokenizer.get_vocab())
    far = httpx.post(served.base_url + COMP, json=comp(prompt="a" * (CONTEXT * longest + 1)), timeout=60)
    near = httpx.post(served.base_url + COMP, json=comp(prompt="word " * 2000), timeout=60)
    assert "characters" in assert_error_object(far, 400, "prompt", "context_length_exceeded")["message"]
    assert "tokens; the prompt has" in assert_error_object(near, 400, "prompt", "context_length_exceeded")["message"]


def test_chunked_body_over_the_limit_and_wrong_method(served):
    def chunks():
        for _ in range(BODY_LIMIT // 1024 + 2):
            yield b" " * 1024

    resp = httpx.post(served.base_url + COMP, content=chunks(), timeout=60)  # no Content-Length: counted as read
    assert_error_object(resp, 413, None, "request_too_large")
    assert_error_object(httpx.get(served.base_url + CHAT), 405)
    assert_error_object(httpx.get(served.base_url + "/v1/nothing-here"), 404)
    assert_still_serving(served.base_url)


def test_openai_client_sees_the_error_fields(served):
    client = openai.OpenAI(base_url=served.base_url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2, logprobs=True, top_logprobs=21)
    assert info.value.param == "top_logprobs" and "between 0 and 20" in info.value.message
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-nope", messages=MSG, max_tokens=2)
    assert info.value.code == "model_not_found"


def test_a_failing_request_fails_alone(served):
    """A forward that raises (injected for one marker token) fails that request, whole (500)
    or streamed (an error event), frees its blocks, and the next request is served."""
    marker = 49000

    def fault(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and bool((ids == marker).any()):
            raise RuntimeError("injected fault")

    handle = served.model.register_forward_pre_hook(fault, with_kwargs=True)
    try:
        resp = httpx.post(served.base_url + COMP, json=comp(prompt=[marker, 5, 6]), timeout=60)
        err = assert_error_object(resp, 500, None, "generation_failed")
        assert "injected fault" in err["message"]
        client = openai.OpenAI(base_url=served.base_url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIError, match="injected fault"):
            for _ in client.completions.create(model=MODEL, prompt=[marker, 7], max_tokens=4, stream=True):
                pass
    finally:
        handle.remove()
    assert_still_serving(served.base_url)
    assert served.engine.cache.get_num_free_blocks() == served.engine.cache.num_blocks


def test_overload_is_429_with_retry_after(served):
    url, tok = served.base_url, served.tokenizer
    question = "Count from 1 to 500, separated by commas."  # greedy: over a hundred tokens, seconds of work
    body = chat(max_tokens=400, temperature=0, stream=True, messages=[{"role": "user", "content": question}])
    assert len(chat_ids(tok, question)) + 400 < CONTEXT
    with httpx.Client(base_url=url, timeout=60) as http:
        streams = [http.stream("POST", CHAT, json=body) for _ in range(3)]  # 2 running + 1 waiting: full
        responses = [s.__enter__() for s in streams]
        try:
            lines = [r.iter_lines() for r in responses]  # kept: a dropped iterator closes its response
            for r, it in zip(responses, lines):
                assert r.status_code == 200
                assert next(it).startswith("data: ")  # admitted: the first chunk came
            resp = httpx.post(url + CHAT, json=chat(), timeout=60)
            assert_error_object(resp, 429, None, "server_overloaded")
            assert int(resp.headers["retry-after"]) >= 1
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    deadline = time.monotonic() + 30
    while httpx.post(url + CHAT, json=chat(), timeout=60).status_code == 429:  # slots come back as streams end
        assert time.monotonic() < deadline, "admission slots were not given back"
        time.sleep(0.2)
    assert_still_serving(url)


def test_seed_on_a_tensor_parallel_server_is_a_400(served, monkeypatch):
    """A seeded request samples on a private engine, which a tensor-parallel server cannot
    build on rank 0 alone: refused naming seed (not a 500), and unseeded requests still run."""
    from cbkernels.engine.tp_layout import TPLayout

    monkeypatch.setattr(served.engine.cache, "tp", TPLayout(size=2, rank=0, q_heads=1, kv_heads=1))
    resp = httpx.post(served.base_url + CHAT, json=chat(seed=7, temperature=0.8), timeout=60)
    err = assert_error_object(resp, 400, "seed", None)
    assert "--tp 2" in err["message"]
    assert_still_serving(served.base_url)
