"""The server's text pieces on their own: incremental decoding equals decoding the whole,
stop strings are found however the text is split, and request parsing."""
import pytest
from hypothesis import given, strategies as st

from cbkernels.server.errors import APIError
from cbkernels.server.protocol import parse_chat, parse_completion, parse_json
from cbkernels.server.text import ChoiceText, StopMatcher


def first_stop(text, stops):
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(hits)] if hits else text


@given(text=st.text(alphabet="abc xy\n", max_size=40), cuts=st.lists(st.integers(0, 40), max_size=12),
       stops=st.lists(st.text(alphabet="abcx", min_size=1, max_size=4), min_size=1, max_size=4))
def test_stop_matcher_finds_stops_across_any_split(text, cuts, stops):
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    matcher, out = StopMatcher(stops), ""
    for a, b in zip(bounds, bounds[1:]):
        out += matcher.push(text[a:b])
    out += matcher.flush()
    assert out == first_stop(text, stops)
    assert (matcher.stopped is not None) == any(s in text for s in stops)


@pytest.fixture(scope="module")
def tok():
    from cbkernels.models import cached_default_model

    return cached_default_model()[1]


@pytest.mark.parametrize("text", ["Hello world, héllo 日本語 😀 done.", "  leading spaces\n\n\ttabs", "a" * 50,
                                  "emoji 👩‍👩‍👧 family and ünïcödé"])
def test_incremental_decoding_equals_whole_decoding(tok, text):
    ids = list(tok(text)["input_ids"]) + [tok.eos_token_id]
    choice = ChoiceText(tok, [])
    pieces = [choice.push([i]) for i in ids] + [choice.finish()]
    assert "".join(pieces) == choice.text == tok.decode(ids, skip_special_tokens=True)
    assert choice.num_tokens == len(ids)
    assert all("\ufffd" not in p for p in pieces)  # never half a character


def test_stop_inside_a_multibyte_character_sequence(tok):
    ids = list(tok("I like 日本語 very much")["input_ids"])
    choice = ChoiceText(tok, ["本語 v"])
    text = "".join(choice.push([i]) for i in ids) + choice.finish()
    assert text == "I like 日" and choice.stopped and choice.num_tokens < len(ids)


def test_parsing_normalises_and_refuses_with_the_parameter_named():
    req = parse_chat({"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                                   {"type": "text", "text": "b"}]}],
                      "max_completion_tokens": 5, "stop": "x", "top_k": -1, "user": "u1", "logprobs": False})
    assert req.messages == [{"role": "system", "content": "ab"}]
    assert (req.options.max_tokens, req.options.stop, req.options.top_k, req.options.n) == (5, ["x"], 0, 1)
    assert parse_completion({"model": "m", "prompt": [[1, 2], "text"]}).prompts == [[1, 2], "text"]
    assert req.options.logprobs is None  # logprobs: false asks for nothing
    msgs = [{"role": "user", "content": "x"}]
    assert parse_chat({"model": "m", "messages": msgs, "logprobs": True}).options.logprobs == 0
    assert parse_chat({"model": "m", "messages": msgs, "logprobs": True, "top_logprobs": 20}).options.logprobs == 20
    assert parse_completion({"model": "m", "prompt": "x", "logprobs": 0}).options.logprobs == 0
    for body, param in [({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3,
                          "max_completion_tokens": 4}, "max_tokens"),
                        ({"model": "m", "messages": [{"role": "user", "content": "x", "name": "bob"}]},
                         "messages[0].name"),
                        ({"model": "", "prompt": "x"}, "model"),
                        ({"model": "m", "prompt": "x", "stream": True, "stream_options": {"extra": 1}},
                         "stream_options.extra")]:
        with pytest.raises(APIError) as info:
            (parse_chat if "messages" in body else parse_completion)(body)
        assert info.value.status == 400 and info.value.param == param and param in info.value.message
    with pytest.raises(APIError):
        parse_json(b"\xff\xfe")
