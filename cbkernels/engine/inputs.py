"""Checks of what callers hand the engine and the cache: prompts, generation configs, counts.

What the engine raises for (misuse of the call, before anything is scheduled) and what it
turns into a FAILED request (a problem of one prompt; the others still run):

* ``TypeError``: a value of the wrong Python type (inputs not a list of token-id lists, a
  token id that is not an int, a generation_config that is not a GenerationConfig, a
  request_id that is not a str, a count that is not an int);
* ``ValueError``: a value of the right type out of range (temperature < 0, top_p outside
  (0, 1], a negative count, a banned or forced token id outside the vocabulary);
* FAILED: an empty prompt, a token id outside [0, vocab_size), prompt + max_new_tokens past
  max_position_embeddings or past what the cache can ever hold, max_new_tokens <= 0.
"""
from __future__ import annotations

import math

import torch


def _token_list(name: str, prompt) -> list[int]:
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1 or prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool:
            raise TypeError(f"{name} must be a 1-D integer tensor or a list of ints, got a {str(prompt.dtype).removeprefix('torch.')} "
                            f"tensor of shape {tuple(prompt.shape)}")
        return prompt.tolist()
    if isinstance(prompt, (str, bytes, bytearray)) or not isinstance(prompt, (list, tuple, range)):
        raise TypeError(f"{name} must be a list of token ids (ints), got {type(prompt).__name__}")
    tokens = []
    for j, t in enumerate(prompt):
        if isinstance(t, bool) or not hasattr(t, "__index__"):
            raise TypeError(f"{name}[{j}] must be an int token id, got {type(t).__name__} {t!r:.40}")
        tokens.append(int(t.__index__()))
    return tokens


def check_prompt(prompt, name: str = "prompt_ids") -> list[int]:
    """One prompt as a plain ``list[int]`` (TypeError naming ``name`` otherwise)."""
    return _token_list(name, prompt)


def check_inputs(inputs) -> list[list[int]]:
    """``Engine.generate``'s ``inputs``: a list (or tuple) of prompts, each a list of ints."""
    if isinstance(inputs, (str, bytes, torch.Tensor)) or not isinstance(inputs, (list, tuple)):
        raise TypeError(f"inputs must be a list of token-id lists, got {type(inputs).__name__}")
    return [_token_list(f"inputs[{i}]", p) for i, p in enumerate(inputs)]


def _is_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, int)


def _is_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float))


def _check_id_list(name: str, value, nested: bool = False) -> None:
    """None, or a list of int ids (``nested``: a list of non-empty lists of int ids)."""
    if value is None:
        return
    items = value if isinstance(value, (list, tuple)) else None
    if items is None:
        raise TypeError(f"generation_config.{name} must be a list of {'lists of ' if nested else ''}token ids, "
                        f"got {type(value).__name__}")
    for j, item in enumerate(items):
        inner = item if nested else [item]
        if nested and (not isinstance(item, (list, tuple)) or not item):
            raise TypeError(f"generation_config.{name}[{j}] must be a non-empty list of token ids, got {item!r:.40}")
        if not all(_is_int(t) for t in inner):
            raise TypeError(f"generation_config.{name}[{j}] must hold int token ids, got {item!r:.40}")


def check_generation_config(gc) -> None:
    """Type and range of the generation fields the engine reads (shared by every request)."""
    from transformers import GenerationConfig

    if not isinstance(gc, GenerationConfig):
        raise TypeError(f"generation_config must be a transformers.GenerationConfig or None, got {type(gc).__name__}")
    mnt = gc.max_new_tokens
    if mnt is not None and not _is_int(mnt):
        raise TypeError(f"generation_config.max_new_tokens must be an int, got {type(mnt).__name__}")
    for field_name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        v = getattr(gc, field_name)
        if v is not None and not _is_number(v):
            raise TypeError(f"generation_config.{field_name} must be a number, got {type(v).__name__}")
    if gc.temperature is not None and not (math.isfinite(gc.temperature) and gc.temperature >= 0):
        raise ValueError(f"generation_config.temperature must be a finite number >= 0, got {gc.temperature}")
    if gc.top_p is not None and not (0.0 < gc.top_p <= 1.0):
        raise ValueError(f"generation_config.top_p must be in (0, 1], got {gc.top_p}")
    if gc.top_k is not None and (not _is_int(gc.top_k) or gc.top_k < 0):
        raise ValueError(f"generation_config.top_k must be an int >= 0, got {gc.top_k!r}")
    if gc.min_p is not None and not (0.0 <= gc.min_p <= 1.0):
        raise ValueError(f"generation_config.min_p must be in [0, 1], got {gc.min_p}")
    rp = gc.repetition_penalty
    if rp is not None and not (math.isfinite(rp) and rp > 0):
        raise ValueError(f"generation_config.repetition_penalty must be a finite number > 0, got {rp}")
    for field_name, low in (("max_length", 0), ("min_length", 0), ("min_new_tokens", 0),
                            ("no_repeat_ngram_size", 0), ("num_return_sequences", 1)):
        v = getattr(gc, field_name)
        if v is not None and not _is_int(v):
            raise TypeError(f"generation_config.{field_name} must be an int, got {type(v).__name__}")
        if v is not None and v < low:
            raise ValueError(f"generation_config.{field_name} must be >= {low}, got {v}")
    for field_name in ("eos_token_id", "forced_eos_token_id"):
        v = getattr(gc, field_name)
        if v is not None and not _is_int(v):
            _check_id_list(field_name, v)
    if gc.forced_bos_token_id is not None and not _is_int(gc.forced_bos_token_id):
        raise TypeError(f"generation_config.forced_bos_token_id must be an int, got {gc.forced_bos_token_id!r:.40}")
    _check_id_list("suppress_tokens", gc.suppress_tokens)
    _check_id_list("begin_suppress_tokens", gc.begin_suppress_tokens)
    _check_id_list("bad_words_ids", gc.bad_words_ids, nested=True)
    stops = gc.stop_strings
    if stops is not None and not isinstance(stops, str) and not (
            isinstance(stops, (list, tuple)) and all(isinstance(x, str) and x for x in stops)):
        raise TypeError(f"generation_config.stop_strings must be a str or a list of non-empty str, got {stops!r:.60}")


def check_generation_tokens(gc, vocab_size) -> None:
    """Token ids the logits processors index with must lie in [0, vocab_size): ValueError
    naming the field otherwise (EOS ids may be negative: transformers' "no EOS")."""
    if vocab_size is None:
        return
    fields = {"suppress_tokens": gc.suppress_tokens, "begin_suppress_tokens": gc.begin_suppress_tokens,
              "forced_bos_token_id": gc.forced_bos_token_id, "forced_eos_token_id": gc.forced_eos_token_id,
              "bad_words_ids": [t for w in (gc.bad_words_ids or ()) for t in w]}
    for name, value in fields.items():
        ids = value if isinstance(value, (list, tuple)) else ([] if value is None else [value])
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"generation_config.{name} holds token ids outside the vocabulary [0, {vocab_size}): {bad}")


def prompt_problem(tokens: list[int], max_new_tokens: int, *, vocab_size, max_positions, can_ever_fit) -> str | None:
    """Why this one request cannot run (it becomes FAILED with this reason), or None."""
    if not tokens:
        return "empty prompt"
    if max_new_tokens < 1:
        return (f"max_new_tokens must be >= 1, got {max_new_tokens} (from max_length minus the prompt's {len(tokens)} "
                "tokens when max_new_tokens is unset)")
    if vocab_size is not None:
        bad = next((t for t in tokens if not 0 <= t < vocab_size), None)
        if bad is not None:
            return f"token id {bad} is outside the vocabulary [0, {vocab_size})"
    total = len(tokens) + max_new_tokens
    if max_positions is not None and total > max_positions:
        return (f"prompt of {len(tokens)} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
                f"max_position_embeddings {max_positions}")
    if not can_ever_fit(total):
        return f"request needs more KV cache than exists: {len(tokens)} prompt + {max_new_tokens} new tokens"
    return None


def check_count(name: str, value, minimum: int = 0) -> None:
    """``value`` must be an int (not a bool) >= ``minimum``: TypeError / ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r:.40}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_request_id(request_id) -> None:
    if not isinstance(request_id, str):
        raise TypeError(f"request_id must be a str, got {type(request_id).__name__}")
