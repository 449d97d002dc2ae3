"""From a request group's engine events to an answer: whole (``collect``) or streamed as
Server-Sent Events (``EventStream``), with stop strings applied and the client watched.

A client that goes away cancels its engine requests at once (``Group.close``), whether it
was streaming or waiting for a whole answer. A choice that fails fails the request it
belongs to (500, or an error event in a stream); the other requests go on.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional

from starlette.responses import Response

from . import schemas
from .errors import APIError
from .text import ChoiceText

# The engine's finish reasons -> the API's.
FINISH_REASONS = {"eos": "stop", "length": "length"}


@dataclass
class Update:
    index: int
    delta: str
    finish: Optional[str] = None  # set on the choice's last update
    logprobs: Optional[tuple[int, int]] = None  # the range of the choice's logprob entries this update adds


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def _failure(output=None, error: Optional[BaseException] = None) -> APIError:
    if error is not None:
        return APIError(500, f"generation failed: {type(error).__name__}: {error}", code="generation_failed")
    if output.finish_reason == "cancelled":
        return APIError(503, "the request was cancelled: the server is shutting down", code="shutting_down")
    return APIError(500, f"generation failed: {output.error}", code="generation_failed")


def choice_texts(group, tokenizer, stops: list[str]) -> list[ChoiceText]:
    """One decoder + stop matcher per choice; they also count the tokens each choice used."""
    return [ChoiceText(tokenizer, stops) for _ in group.request_ids]


async def updates(group, texts: list[ChoiceText], logprobs: Optional[list] = None) -> AsyncIterator[Update]:
    """Text deltas per choice as tokens arrive, until every choice has finished. With
    ``logprobs`` (a ``ChoiceLogprobs`` per choice), the consumed tokens' log-probabilities
    are recorded there and each update names the entries it added."""
    live = set(range(len(texts)))
    while live:
        events = await group.next_events()
        new: dict[int, list] = {}
        ended: dict[int, object] = {}
        for ev in events:
            if ev.index not in live:
                continue
            if ev.error is not None:
                raise _failure(error=ev.error)
            if ev.tokens:
                new.setdefault(ev.index, []).append(ev)
            if ev.output is not None:
                ended[ev.index] = ev.output
        for index in sorted(set(new) | set(ended)):
            text = texts[index]
            got = new.get(index, ())
            tokens = [t for ev in got for t in ev.tokens]
            delta = text.push(tokens)
            span = None
            if logprobs is not None and tokens:
                used = len(text.offsets)
                span = logprobs[index].add(tokens[:used], [v for ev in got for v in ev.logprobs][:used],
                                           [v for ev in got for v in ev.top][:used], text.offsets)
            finish = None
            if text.stopped:
                finish = "stop"
                group.cancel_choice(index)
            elif index in ended:
                output = ended[index]
                if output.error is not None or output.finish_reason not in FINISH_REASONS:
                    raise _failure(output)
                delta += text.finish()
                finish = FINISH_REASONS[output.finish_reason]
            if delta or finish or (span and span[1] > span[0]):
                yield Update(index, delta, finish, span)
            if finish:
                live.discard(index)


async def collect(group, texts: list[ChoiceText], logprobs: Optional[list] = None) -> list[tuple[str, str]]:
    """Every choice's whole text and finish reason."""
    parts = [[] for _ in texts]
    finish = [None] * len(texts)
    async for upd in updates(group, texts, logprobs):
        parts[upd.index].append(upd.delta)
        finish[upd.index] = upd.finish or finish[upd.index]
    return [("".join(p), f) for p, f in zip(parts, finish)]


def completion_tokens(texts: list[ChoiceText]) -> int:
    return sum(t.num_tokens for t in texts)


async def sse_stream(group, texts: list[ChoiceText], *, chat: bool, obj_id: str, created: int, model: str,
                     prompt_tokens: int, include_usage: bool, logprobs: Optional[list] = None) -> AsyncIterator[bytes]:
    """The chunks of a streamed answer, ending with ``data: [DONE]``."""
    if chat:
        for i in range(len(group.request_ids)):  # the role first, as OpenAI does
            yield schemas.sse(schemas.chat_chunk(obj_id, created, model, i, {"role": "assistant", "content": ""},
                                                 with_usage=include_usage))
    try:
        async for upd in updates(group, texts, logprobs):
            lp = None
            if logprobs is not None and upd.logprobs is not None:
                book = logprobs[upd.index]
                lp = book.chat(*upd.logprobs) if chat else book.completion(*upd.logprobs)
            if chat:
                if upd.delta or lp is not None:
                    yield schemas.sse(schemas.chat_chunk(obj_id, created, model, upd.index, {"content": upd.delta},
                                                         with_usage=include_usage, logprobs=lp))
                if upd.finish:
                    yield schemas.sse(schemas.chat_chunk(obj_id, created, model, upd.index, {}, upd.finish,
                                                         with_usage=include_usage))
            else:
                yield schemas.sse(schemas.completion_chunk(obj_id, created, model, upd.index, upd.delta, upd.finish,
                                                           with_usage=include_usage, logprobs=lp))
        if include_usage:
            kind = "chat.completion.chunk" if chat else "text_completion"
            use = schemas.usage(prompt_tokens, completion_tokens(texts))
            yield schemas.sse(schemas.usage_chunk(obj_id, kind, created, model, use))
    except APIError as exc:
        yield schemas.sse(exc.body())
    yield schemas.DONE


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(receive, work):
    """Await ``work``; if the client disconnects first, cancel it and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        raise ClientGone()
    return task.result()


class EventStream(Response):
    """A response streaming ``chunks`` as ``text/event-stream``. When the client goes away
    (or the server cancels the response), ``on_close`` runs at once: it cancels the
    request's engine work, so the blocks are free within one engine step."""

    def __init__(self, chunks: AsyncIterator[bytes], on_close: Callable[[], None]):
        self.chunks, self.on_close = chunks, on_close
        self.status_code, self.background = 200, None

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]})

        async def pump():
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        streaming = asyncio.ensure_future(pump())
        watch = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({streaming, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.on_close()
            for task in (streaming, watch):
                task.cancel()
            await asyncio.gather(streaming, watch, return_exceptions=True)
