"""``Stepper``: the server's serving loop, one thread per engine.

It runs the engine's steps while requests are live and makes every other engine call
(``add_request``, ``cancel``, ``pop_result``) itself, between two steps, from an inbox that
the event loop fills. So no thread ever waits for the engine's lock (a step holds it for its
whole forward), a step's tokens are read straight from its requests once the step ends, and
the whole step's output leaves in one callback (``post``): one wake-up of the event loop per
step, however many requests ran in it. Idle, the thread sleeps on a condition variable
until the inbox gets work: no polling.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Optional

STALL_WAIT_S = 0.01  # a step that moved no live request on (cannot happen in a healthy engine): pause


@dataclass
class Event:
    """What one step made for one choice of a request group."""
    index: int  # which choice
    tokens: tuple = ()  # new token ids
    logprobs: tuple = ()  # their log-probabilities (when asked for)
    top: tuple = ()  # their top alternatives, [(token, logprob), ...] each (when asked for)
    output: object = None  # the RequestOutput, once the request is over
    error: Optional[BaseException] = None


class Track:
    """One engine request followed by the stepper: which group and choice it feeds, and how
    many of its generated tokens were handed out."""

    __slots__ = ("group", "index", "rid", "req", "seen")

    def __init__(self, group, index: int, rid: str):
        self.group, self.index, self.rid = group, index, rid
        self.req = None  # the engine's Request, once added
        self.seen = 0


class _Op:
    __slots__ = ("run", "abandon")

    def __init__(self, run: Callable[[], None], abandon: Optional[Callable[[BaseException], None]] = None):
        self.run, self.abandon = run, abandon


class Stepper:
    def __init__(self, engine, post: Callable[[list], None], *, name: str = "cbkernels-engine"):
        self.engine = engine
        self._post = post  # called from this thread with [(track, Event), ...] after each step
        self._name = name
        self._cv = threading.Condition()
        self._inbox: list[_Op] = []
        self._live: dict[str, Track] = {}
        self._stopping = False
        self._stop_when_idle = False
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None  # what ended the thread, if not stop()

    # ------------------------------------------------------------ any thread
    def start(self) -> None:
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
                self._thread.start()

    def _call(self, op: _Op) -> None:
        with self._cv:
            if self._thread is None or not self._thread.is_alive():
                gone = True
            else:
                gone = False
                self._inbox.append(op)
                self._cv.notify()
        if gone and op.abandon is not None:
            op.abandon(self.error or RuntimeError("the engine's serving thread is not running"))

    def add(self, tracks: list[Track], prompts, generation_config, kwargs: dict,
            settle: Callable[[Optional[BaseException]], None]) -> None:
        """Queue ``prompts`` (one per track); ``settle(error or None)`` once they are in."""
        def run():
            added = []
            try:
                for track, prompt in zip(tracks, prompts):
                    self.engine.add_request(prompt, generation_config, request_id=track.rid, **kwargs)
                    track.req = self.engine.requests[track.rid]
                    self._live[track.rid] = track
                    added.append(track)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                for track in added:
                    self._forget(track)
                settle(exc)
            else:
                settle(None)

        self._call(_Op(run, settle))

    def cancel(self, request_ids: list[str]) -> None:
        """Cancel these requests before the next step (their blocks are freed then)."""
        self._call(_Op(lambda: [self._cancel(rid) for rid in request_ids]))

    def stop_when_idle(self) -> None:
        """End the thread once no request is live and the inbox is empty (private engines)."""
        with self._cv:
            self._stop_when_idle = True
            self._cv.notify()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Cancel what is live (its outputs are still handed out), end after the current step."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # ------------------------------------------------------------ the stepping thread
    def _cancel(self, rid: str) -> None:
        if rid in self._live:
            try:
                self.engine.cancel(rid)
            except KeyError:  # already gone
                pass

    def _forget(self, track: Track) -> None:
        self._live.pop(track.rid, None)
        try:
            self.engine.cancel(track.rid)
            self.engine.pop_result(track.rid)
        except (KeyError, ValueError):
            pass

    def _serve(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._stopping or self._inbox or self._live or self._stop_when_idle):
                        self._cv.wait()
                    if self._stopping or (self._stop_when_idle and not self._inbox and not self._live):
                        break
                    ops, self._inbox = self._inbox, []
                for op in ops:
                    op.run()
                self._hand_out()
                if self._live:
                    before = self._progress()
                    self.engine.step()
                    self._hand_out()
                    if self._live and self._progress() == before:
                        with self._cv:
                            self._cv.wait(STALL_WAIT_S)
        except BaseException as exc:  # noqa: BLE001 - every live request learns of it
            self.error = exc
        finally:
            self._close()

    def _close(self) -> None:
        with self._cv:
            ops, self._inbox = self._inbox, []
            self._stopping = True
        why = self.error or RuntimeError("the server is shutting down")
        for op in ops:
            if op.abandon is not None:
                op.abandon(why)
        if self.error is None:
            try:  # a clean stop: live requests end cancelled, their outputs handed out
                for rid in list(self._live):
                    self._cancel(rid)
                self._hand_out()
            except BaseException as exc:  # noqa: BLE001
                self.error = exc
        if self._live:
            self._post([(t, Event(t.index, error=self.error or why)) for t in self._live.values()])
            self._live.clear()

    def _progress(self) -> int:
        return sum(len(t.req.tokens) + t.req.num_computed + t.req.is_done for t in self._live.values())

    def _hand_out(self) -> None:
        """Every live request's new tokens (and log-probabilities), and the outputs of those
        that ended, to the event loop in one call."""
        batch = []
        for rid, track in list(self._live.items()):
            req = track.req
            made = len(req.tokens) - req.prompt_len
            done = req.is_done
            if made > track.seen:
                lo, start = track.seen, req.prompt_len + track.seen
                tokens = tuple(req.tokens[start:req.prompt_len + made])
                logprobs = tuple(req.logprobs[lo:made]) if req.params.return_logprobs else ()
                top = tuple(req.top_logprobs[lo:made]) if req.params.top_logprobs else ()
                track.seen = made
                batch.append((track, Event(track.index, tokens=tokens, logprobs=logprobs, top=top)))
            if done:
                del self._live[rid]
                batch.append((track, Event(track.index, output=self.engine.pop_result(rid))))
        if batch:
            self._post(batch)
