"""Response bodies of the OpenAI-compatible endpoints (plain dicts), and Server-Sent Events."""
from __future__ import annotations

import time
import uuid
from typing import Optional

from .errors import json_bytes

DONE = b"data: [DONE]\n\n"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def sse(obj) -> bytes:
    """One Server-Sent Event carrying ``obj`` as JSON."""
    return b"data: " + json_bytes(obj) + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _head(obj_id: str, kind: str, created: int, model: str) -> dict:
    return {"id": obj_id, "object": kind, "created": created, "model": model}


def chat_completion(obj_id: str, created: int, model: str, choices: list[tuple[str, str]], use: dict,
                    logprobs: Optional[list] = None) -> dict:
    """``choices``: (text, finish_reason) in index order; ``logprobs``: each choice's, or None."""
    logprobs = logprobs or [None] * len(choices)
    return {**_head(obj_id, "chat.completion", created, model), "choices": [
        {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp, "finish_reason": finish}
        for i, ((text, finish), lp) in enumerate(zip(choices, logprobs))], "usage": use}


def chat_chunk(obj_id: str, created: int, model: str, index: int, delta: dict, finish: Optional[str] = None,
               with_usage: bool = False, logprobs: Optional[dict] = None) -> dict:
    chunk = {**_head(obj_id, "chat.completion.chunk", created, model),
             "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def completion(obj_id: str, created: int, model: str, choices: list[tuple[str, str]], use: dict,
               logprobs: Optional[list] = None) -> dict:
    logprobs = logprobs or [None] * len(choices)
    return {**_head(obj_id, "text_completion", created, model), "choices": [
        {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}
        for i, ((text, finish), lp) in enumerate(zip(choices, logprobs))], "usage": use}


def completion_chunk(obj_id: str, created: int, model: str, index: int, text: str, finish: Optional[str] = None,
                     with_usage: bool = False, logprobs: Optional[dict] = None) -> dict:
    chunk = {**_head(obj_id, "text_completion", created, model),
             "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(obj_id: str, kind: str, created: int, model: str, use: dict) -> dict:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    return {**_head(obj_id, kind, created, model), "choices": [], "usage": use}


def model_list(names: list[str], created: int, max_model_len: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "cbkernels",
                                        "max_model_len": max_model_len} for name in names]}
