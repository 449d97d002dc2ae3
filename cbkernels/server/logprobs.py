"""Log-probabilities in OpenAI's shapes.

The engine returns, per generated token, its log-probability and (when asked for) the
``k`` most likely tokens of the same distribution with theirs. Here they become:

* chat completions (``logprobs: true, top_logprobs: k``): ``choice.logprobs.content``, one
  ``{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}`` per
  token;
* legacy completions (``logprobs: k``): ``choice.logprobs`` with the parallel lists
  ``tokens``, ``token_logprobs``, ``top_logprobs`` (per token a ``{token: logprob}`` map of the
  ``k`` most likely, the chosen token always among them) and ``text_offset`` (where each
  token's text starts in the choice's text).

A token's ``bytes`` are its exact UTF-8 bytes (a byte-level token may hold part of a
character: its ``token`` string then shows U+FFFD). A log-probability of minus infinity (a
token that top-p / top-k ruled out) is written as -9999.0, since JSON has no infinity.
"""
from __future__ import annotations

import math
import re
from typing import Optional

NEG_INF_LOGPROB = -9999.0
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece byte fallback


def _byte_level_map() -> dict[str, int]:
    """The byte-level BPE alphabet: printable stand-ins for the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _finite(value: float) -> float:
    return value if math.isfinite(value) else NEG_INF_LOGPROB


class TokenTexts:
    """Token id -> (text, UTF-8 bytes), computed once per id."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = _byte_level_map() if type(decoder).__name__ == "ByteLevel" else None

    def __call__(self, token: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token)
        if hit is None:
            hit = self._cache[token] = self._compute(token)
        return hit

    def _compute(self, token: int) -> tuple[str, list[int]]:
        piece = self._tok.convert_ids_to_tokens(token)
        raw: Optional[bytes] = None
        if isinstance(piece, str):
            match = _BYTE_TOKEN.match(piece)
            if match:
                raw = bytes([int(match.group(1), 16)])
            elif self._byte_level is not None and piece and all(c in self._byte_level for c in piece):
                raw = bytes(self._byte_level[c] for c in piece)
        if raw is None:
            text = self._tok.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            return text, list(text.encode("utf-8"))
        return raw.decode("utf-8", errors="replace"), list(raw)


class ChoiceLogprobs:
    """The log-probabilities of one choice's tokens, as they are consumed."""

    def __init__(self, texts: TokenTexts, top: int):
        self.texts, self.top = texts, top
        self.entries: list[tuple[int, float, tuple]] = []  # (token, logprob, ((token, logprob), ...))
        self.offsets: list[int] = []

    def add(self, tokens, logprobs, tops, offsets) -> tuple[int, int]:
        """Record the consumed ``tokens``; returns the range of ``entries`` they occupy."""
        lo = len(self.entries)
        for i, token in enumerate(tokens):
            lp = logprobs[i] if i < len(logprobs) else float("nan")
            alts = tuple(tops[i]) if i < len(tops) else ()
            self.entries.append((int(token), lp, alts))
        self.offsets.extend(offsets)
        return lo, len(self.entries)

    # ------------------------------------------------------------ chat
    def _item(self, token: int, logprob: float) -> dict:
        text, raw = self.texts(token)
        return {"token": text, "logprob": _finite(logprob), "bytes": raw}

    def chat(self, lo: int = 0, hi: Optional[int] = None) -> dict:
        content = []
        for token, lp, alts in self.entries[lo:hi]:
            item = self._item(token, lp)
            item["top_logprobs"] = [self._item(t, v) for t, v in alts[:self.top]]
            content.append(item)
        return {"content": content, "refusal": None}

    # ------------------------------------------------------------ legacy completions
    def completion(self, lo: int = 0, hi: Optional[int] = None) -> dict:
        tokens, token_logprobs, tops = [], [], []
        for token, lp, alts in self.entries[lo:hi]:
            text = self.texts(token)[0]
            tokens.append(text)
            token_logprobs.append(_finite(lp))
            best = {self.texts(t)[0]: _finite(v) for t, v in alts[:self.top]}
            best.setdefault(text, _finite(lp))
            tops.append(best)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops,
                "text_offset": list(self.offsets[lo:hi])}
