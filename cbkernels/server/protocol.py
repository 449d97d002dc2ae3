"""Request bodies of the OpenAI-compatible endpoints: parsed and checked by hand, so every
refusal is a 400 that names the offending parameter.

Policy: a parameter the server implements is checked for type and range; a parameter it
does not implement is accepted only at its default value (given anything else, the request
is refused and the message names it); a parameter nobody knows is refused unless null.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Optional, Union

from .errors import APIError, bad_request

MAX_N = 16  # choices per request
MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_STOP_CHARS = 256
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_MESSAGES = 1024
MAX_TOKENS_LIMIT = 1 << 31
CHAT_ROLES = ("system", "developer", "user", "assistant")


def _is(*defaults):
    return lambda v: v is None or any(v == d and type(v) is type(d) for d in defaults)


# Parameters of the OpenAI API this server does not implement, with what counts as "not used".
NOT_IMPLEMENTED = {
    "frequency_penalty": _is(0, 0.0), "presence_penalty": _is(0, 0.0), "logit_bias": _is({}),
    "tools": _is([]), "tool_choice": _is("none"), "functions": _is([]), "function_call": _is("none"),
    "parallel_tool_calls": _is(True), "response_format": _is({"type": "text"}),
    "service_tier": _is("auto", "default"), "store": _is(False), "modalities": _is(["text"]),
    "audio": _is(), "prediction": _is(), "reasoning_effort": _is(), "web_search_options": _is(),
    "verbosity": _is(), "echo": _is(False), "suffix": _is(""), "best_of": _is(1),
}
# Accepted and without effect on the output: caller bookkeeping and cache-routing hints.
INERT = {"user", "metadata", "safety_identifier", "prompt_cache_key"}
MAX_TOP_LOGPROBS = 20  # alternatives per token (chat top_logprobs, completions logprobs)


@dataclass
class SamplingOptions:
    max_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: Optional[int] = None  # None: no log-probabilities; k: each token's and its k most likely alternatives

    @property
    def greedy(self) -> bool:
        """Only the most likely token can be drawn: the output does not depend on any seed."""
        return self.temperature == 0.0 or self.top_p == 0.0 or self.top_k == 1


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]
    options: SamplingOptions


@dataclass
class CompletionRequest:
    model: str
    prompts: list[Union[str, list[int]]]
    options: SamplingOptions


def _type_name(value) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def _int(body: dict, name: str, lo: int, hi: int, default=None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{name} must be an integer, got {_type_name(value)}", name)
    if not lo <= value <= hi:
        raise bad_request(f"{name} must be between {lo} and {hi}, got {value}", name)
    return value


def _number(body: dict, name: str, lo: float, hi: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"{name} must be a finite number, got {_type_name(value)}", name)
    if not lo <= value <= hi:
        raise bad_request(f"{name} must be between {lo} and {hi}, got {value}", name)
    return float(value)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be a boolean, got {_type_name(value)}", name)
    return value


def _stop(value) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("stop must be a string or an array of strings", "stop")
    if len(stops) > MAX_STOP:
        raise bad_request(f"stop takes at most {MAX_STOP} strings, got {len(stops)}", "stop")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise bad_request(f"stop strings must be non-empty and at most {MAX_STOP_CHARS} characters", "stop")
    return list(dict.fromkeys(stops))


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {_type_name(body)}")
    return body


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required and must be a non-empty string", "model")
    return model


def _check_unsupported(body: dict, known: set) -> None:
    for name, value in body.items():
        if name in known or name in INERT:
            continue
        if name in NOT_IMPLEMENTED:
            if not NOT_IMPLEMENTED[name](value):
                raise bad_request(f"{name} is not supported by this server (only its default value is accepted)",
                                  name)
        elif value is not None:
            raise bad_request(f"unknown parameter: {name}", name)


SAMPLING_KEYS = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop", "stream",
                 "stream_options"}


def parse_options(body: dict, *, max_tokens_keys: tuple) -> SamplingOptions:
    opts = SamplingOptions()
    given = [k for k in max_tokens_keys if body.get(k) is not None]
    for key in given:
        value = _int(body, key, 1, MAX_TOKENS_LIMIT)
        if opts.max_tokens is not None and value != opts.max_tokens:
            raise bad_request(f"{key} and {given[0]} disagree ({value} != {opts.max_tokens}); give one", key)
        opts.max_tokens = value
    opts.temperature = _number(body, "temperature", 0.0, 2.0, 1.0)
    opts.top_p = _number(body, "top_p", 0.0, 1.0, 1.0)
    top_k = _int(body, "top_k", -1, MAX_TOKENS_LIMIT, 0)
    opts.top_k = max(top_k, 0)  # -1 and 0 both mean "no top-k filter"
    opts.n = _int(body, "n", 1, MAX_N, 1)
    opts.seed = _int(body, "seed", -(1 << 63), (1 << 64) - 1)
    opts.stop = _stop(body.get("stop"))
    opts.stream = _bool(body, "stream")
    stream_options = body.get("stream_options")
    if stream_options is not None:
        if not opts.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(stream_options, dict):
            raise bad_request(f"stream_options must be an object, got {_type_name(stream_options)}", "stream_options")
        for key, value in stream_options.items():
            if key != "include_usage" and value is not None:
                raise bad_request(f"unknown parameter: stream_options.{key}", f"stream_options.{key}")
        opts.include_usage = _bool(stream_options, "include_usage")
    return opts


def _message(i: int, msg) -> dict:
    where = f"messages[{i}]"
    if not isinstance(msg, dict):
        raise bad_request(f"{where} must be an object, got {_type_name(msg)}", where)
    for key, value in msg.items():
        if key not in ("role", "content") and value is not None:
            raise bad_request(f"{where}.{key} is not supported by this server", f"{where}.{key}")
    role = msg.get("role")
    if role not in CHAT_ROLES:
        raise bad_request(f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {role!r}", f"{where}.role")
    content = msg.get("content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad_request(f"{where}.content[{j}] must be a text part {{\"type\": \"text\", \"text\": ...}}",
                                  f"{where}.content[{j}]")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise bad_request(f"{where}.content must be a string or an array of text parts", f"{where}.content")
    return {"role": "system" if role == "developer" else role, "content": content}


def parse_chat(body: dict) -> ChatRequest:
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages is required and must be a non-empty array", "messages")
    if len(messages) > MAX_MESSAGES:
        raise bad_request(f"messages holds at most {MAX_MESSAGES} entries, got {len(messages)}", "messages")
    parsed = [_message(i, m) for i, m in enumerate(messages)]
    opts = parse_options(body, max_tokens_keys=("max_completion_tokens", "max_tokens"))
    top = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if _bool(body, "logprobs"):
        opts.logprobs = top or 0
    elif top:
        raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
    _check_unsupported(body, SAMPLING_KEYS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"})
    return ChatRequest(model, parsed, opts)


def _is_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value)


def parse_completion(body: dict) -> CompletionRequest:
    model = _model(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_ids(p) for p in prompt):
        prompts = list(prompt)
    else:
        raise bad_request("prompt is required: a string, an array of strings, an array of token ids, "
                          "or an array of such arrays", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise bad_request(f"prompt holds at most {MAX_PROMPTS} prompts, got {len(prompts)}", "prompt")
    opts = parse_options(body, max_tokens_keys=("max_tokens",))
    opts.logprobs = _int(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    _check_unsupported(body, SAMPLING_KEYS | {"prompt", "logprobs"})
    if opts.n * len(prompts) > MAX_N * 4:
        raise bad_request(f"n x prompts is at most {MAX_N * 4}, got {opts.n * len(prompts)}", "n")
    return CompletionRequest(model, prompts, opts)


def check_model(name: str, served: list[str]) -> None:
    if name not in served:
        raise APIError(404, f"the model {name!r} does not exist; this server serves {', '.join(served)}",
                       param="model", code="model_not_found")
