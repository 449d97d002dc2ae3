"""A background serving loop for ``Engine``: one thread runs the steps, any thread adds,
cancels, streams or waits. The engine's lock (``_lock``) and condition (``_changed``,
notified after every step, add and cancel) are what the threads synchronise on."""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # annotations only: engine.py imports this module
    from .engine import Engine

# How long a waiting thread sleeps before it re-checks that the serving loop is alive (a
# safety net only: every step, cancel and add wakes waiters at once).
WAIT_RECHECK_S = 1.0
# Pause of the serving loop between steps: 0 just yields the GIL so waiting threads get the lock.
_HANDOFF_S = 0


class ServingLoop:
    _lock: threading.RLock
    _changed: threading.Condition
    _loop: Optional[threading.Thread] = None
    _stopping: bool = False
    loop_error: Optional[BaseException] = None

    def _serving_elsewhere(self) -> bool:
        loop = self._loop
        return loop is not None and loop.is_alive() and threading.current_thread() is not loop

    def start(self) -> "Engine":
        """Run steps in a background thread until ``stop()`` (also a context manager)."""
        with self._lock:
            if self._loop is not None and self._loop.is_alive():
                return self
            self._stopping, self.loop_error = False, None
            self._loop = threading.Thread(target=self._serve, name="cbkernels-engine", daemon=True)
            self._loop.start()
        return self

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop the serving loop after its current step; queued requests stay queued."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
            loop = self._loop
        if loop is not None and loop is not threading.current_thread():
            loop.join(timeout)
        with self._lock:
            self._restore()

    def _serve(self) -> None:
        try:
            while True:
                with self._changed:
                    while not self._stopping and not self.scheduler.has_work():
                        self._changed.wait()
                    if self._stopping:
                        return
                    self.step()
                # Python locks are not fair: without giving up the GIL here the loop would take
                # the lock straight back and starve add_request / cancel / stream callers.
                time.sleep(_HANDOFF_S)
        except BaseException as exc:  # noqa: BLE001 - kept for the caller; waiters fall back to driving
            self.loop_error = exc
        finally:
            with self._changed:
                self._changed.notify_all()

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

