"""The serving loops of a tensor-parallel engine (see ``cbkernels.engine.distributed``).

* ``DriverLoop`` (rank 0): ``ServingLoop`` that tells the followers to stop when it ends
  (``stop()``, or an error); ``stop()`` without a running loop tells them at once.
* ``Heartbeat`` (rank 0): while nothing else is sent, an empty message every ``HEARTBEAT_S``,
  so a follower waiting for the next step hears from rank 0 well within the control group's
  timeout, whoever drives rank 0's steps (this loop, the server's stepper, a script).
* ``FollowerLoop`` (other ranks): receives rank 0's messages and runs the steps they announce,
  in a thread (``start()``) or in the caller (``stop()`` without a thread: follow until rank 0
  stops). Same interface as ``ServingLoop``, so ``Engine.start`` / ``stop`` / ``stream`` /
  ``generate`` need no tensor-parallel branch.
"""
from __future__ import annotations

import threading
import time
from typing import Optional

from .serving import ServingLoop

# Longest silence of rank 0 while idle; far below the control group's timeout.
HEARTBEAT_S = 1.0


class DriverLoop(ServingLoop):
    def __init__(self, engine, plane):
        super().__init__(engine.step, engine._has_work, engine._changed, name="cbkernels-engine-tp0")
        self._plane = plane

    def _serve(self) -> None:
        try:
            super()._serve()
        finally:
            with self._changed:
                self._plane.send_stop(quiet=True)

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop the loop (whose exit tells the followers); without a loop, tell them here."""
        was_running = self.is_alive()
        super().stop(timeout)
        if not was_running:
            with self._changed:
                self._plane.send_stop()


class Heartbeat:
    """Rank 0's daemon thread: ``send()`` (under ``lock``) whenever ``idle_s()`` reaches
    ``HEARTBEAT_S``; it ends once ``stopped()`` (the followers stopped following) or at the
    first failed send."""

    def __init__(self, send, idle_s, stopped, lock):
        self._send, self._idle_s, self._stopped, self._lock = send, idle_s, stopped, lock
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._beat, name="cbkernels-tp-heartbeat", daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _beat(self) -> None:
        while not self._stopped():
            time.sleep(HEARTBEAT_S / 4)
            if self._idle_s() < HEARTBEAT_S:
                continue
            with self._lock:
                if self._stopped() or self._idle_s() < HEARTBEAT_S:
                    continue
                try:
                    self._send()
                except Exception as exc:  # noqa: BLE001 - the group is broken: the next step reports it
                    self.error = exc
                    return


class FollowerLoop:
    def __init__(self, engine, plane):
        self._engine, self._plane = engine, plane
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def runs_elsewhere(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive() and threading.current_thread() is not thread

    def start(self) -> None:
        with self._engine._changed:
            if self.is_alive():
                return
            self.error = None
            self._thread = threading.Thread(target=self._serve, name="cbkernels-engine-follower", daemon=True)
            self._thread.start()

    def _serve(self) -> None:
        try:
            self._plane.follow()
        except BaseException as exc:  # noqa: BLE001
            self.error = exc
        finally:
            with self._engine._changed:
                self._engine._changed.notify_all()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Wait until rank 0 stops the group: join the following thread, or follow here."""
        thread = self._thread
        if thread is not None:
            if thread is not threading.current_thread():
                thread.join(timeout)
        elif not self._plane.stopped:
            self._plane.follow()
