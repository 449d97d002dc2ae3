"""From token ids to text as they arrive: incremental decoding and stop strings.

``Detokenizer`` turns a growing list of token ids into text deltas whose concatenation is
the decoded text. A token's text can depend on its neighbours (a leading space, a
character split over several byte tokens), so each step decodes a short window that starts
a few tokens back and emits only what the window added; while the window ends inside an
unfinished UTF-8 character (the decoder shows U+FFFD), nothing is emitted.

``StopMatcher`` finds stop strings across token boundaries: it holds back any tail of the
text that could still grow into a stop string, and cuts the text where one begins (the
stop string itself is not returned).
"""
from __future__ import annotations

from typing import Optional

REPLACEMENT = "\ufffd"


class Detokenizer:
    def __init__(self, tokenizer, *, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        self._start = 0  # first id of the decoding window
        self._emitted_to = 0  # ids whose text has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False)

    def push(self, new_ids: list[int]) -> str:
        """Add token ids; return the text they complete (possibly empty)."""
        self.ids.extend(new_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back (an unfinished character at the very end)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._emitted_to == len(self.ids):
            return ""
        before = self._decode(self.ids[self._start:self._emitted_to])
        after = self._decode(self.ids[self._start:])
        if after.endswith(REPLACEMENT) and not final:
            return ""  # wait for the rest of the character
        # The window's text normally extends the text already emitted; should a tokenizer
        # rewrite it, the part already sent stays sent and only the length is trusted.
        delta = after[len(before):]
        self._start, self._emitted_to = self._emitted_to, len(self.ids)
        return delta


class StopMatcher:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self.stops), default=0)
        self._held = ""
        self.stopped: Optional[str] = None  # the stop string that matched

    def push(self, text: str) -> str:
        """Add decoded text; return what is safe to emit. After a match, ``stopped`` is set and
        everything from the start of the stop string on is dropped."""
        if self.stopped is not None or not text:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        hits = [(buf.find(s), s) for s in self.stops]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            cut, self.stopped = min(hits)
            self._held = ""
            return buf[:cut]
        keep = self._partial_tail(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def _partial_tail(self, buf: str) -> int:
        """Length of the longest tail of ``buf`` that is the beginning of a stop string."""
        for k in range(min(len(buf), self._longest - 1), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def flush(self) -> str:
        """At the end of generation: the held-back tail was not a stop string after all."""
        held, self._held = self._held, ""
        return "" if self.stopped is not None else held


class ChoiceText:
    """Text of one choice: tokens in, (text delta, stopped) out; counts the tokens consumed."""

    def __init__(self, tokenizer, stops: list[str]):
        self.detok = Detokenizer(tokenizer)
        self.stop = StopMatcher(stops)
        self.text = ""
        self.num_tokens = 0
        self.decoded_chars = 0  # characters the decoder has produced (before stop strings)
        self.offsets: list[int] = []  # per token of the last push: decoded characters before it

    @property
    def stopped(self) -> bool:
        return self.stop.stopped is not None

    def push(self, ids) -> str:
        """Add tokens; return the text delta. ``offsets`` then holds, for each token consumed
        (a stop string ends the consumption at the token completing it), where its text starts."""
        self.offsets = []
        if self.stopped:
            return ""
        delta = ""
        for token in ids:  # one at a time, so the count stops at the token that completed a stop string
            self.num_tokens += 1
            self.offsets.append(self.decoded_chars)
            piece = self.detok.push([token])
            self.decoded_chars += len(piece)
            delta += self.stop.push(piece)
            if self.stopped:
                break
        self.text += delta
        return delta

    def finish(self) -> str:
        self.offsets = []
        delta = "" if self.stopped else self.stop.push(self.detok.flush())
        delta += self.stop.flush()
        self.text += delta
        return delta
