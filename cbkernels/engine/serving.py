"""``ServingLoop``: one background thread that runs engine steps while there is work.

It is handed what it needs and nothing else: ``step`` (one engine step), ``has_work``, and
the condition variable every state change notifies. Any other thread may then add, cancel,
stream or wait; they synchronise on that condition's lock.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional

# How long a waiting thread sleeps before it re-checks that the serving loop is alive (a
# safety net only: every step, cancel and add wakes waiters at once).
WAIT_RECHECK_S = 1.0
# Pause of the serving loop between steps: 0 just yields the GIL so waiting threads get the lock.
HANDOFF_S = 0


class ServingLoop:
    def __init__(self, step: Callable[[], object], has_work: Callable[[], bool], changed: threading.Condition,
                 name: str = "cbkernels-engine"):
        self._step = step
        self._has_work = has_work
        self._changed = changed
        self._name = name
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self.error: Optional[BaseException] = None  # what ended the loop, if not stop()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def runs_elsewhere(self) -> bool:
        """True when the loop is alive and the caller is another thread: then the caller
        waits for the loop's steps instead of stepping itself."""
        thread = self._thread
        return thread is not None and thread.is_alive() and threading.current_thread() is not thread

    def start(self) -> None:
        with self._changed:
            if self.is_alive():
                return
            self._stopping, self.error = False, None
            self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
            self._thread.start()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop after the current step; queued requests stay queued."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _serve(self) -> None:
        try:
            while True:
                with self._changed:
                    while not self._stopping and not self._has_work():
                        self._changed.wait()
                    if self._stopping:
                        return
                    self._step()
                # Python locks are not fair: without giving up the GIL here the loop would take
                # the lock straight back and starve add_request / cancel / stream callers.
                time.sleep(HANDOFF_S)
        except BaseException as exc:  # noqa: BLE001 - kept for the caller; waiters fall back to driving
            self.error = exc
        finally:
            with self._changed:
                self._changed.notify_all()
