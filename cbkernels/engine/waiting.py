"""The waiting queue: priorities, FIFO within a priority, and aging.

One deque per priority (higher first). Requests that must go first within their priority
(a preempted request, siblings of a request that could not fork) are put at the front of
their deque, as the engine has always done. Aging: the head of a deque that has waited
``aging_steps`` scheduler steps counts as one priority higher, so a request's effective
priority is ``priority + waited / aging_steps``. Comparing two heads by that is comparing
the fixed key ``priority * aging_steps - queued_step`` (the step they were queued at), so
no key changes while requests wait, and a low priority waits at most ``aging_steps`` per
priority level above it (plus what those queued before it need): nothing starves.

Operations: ``head``/``popleft`` cost one look at each non-empty priority (a handful),
``append``/``appendleft``/``in``/``len`` O(1); ``remove`` (a waiting request cancelled)
is linear in its priority's deque.
"""
from __future__ import annotations

from collections import deque
from typing import Iterator

AGING_STEPS = 256


class WaitQueue:
    def __init__(self, aging_steps: int = AGING_STEPS):
        if isinstance(aging_steps, bool) or not isinstance(aging_steps, int):
            raise TypeError(f"aging_steps must be an int, got {type(aging_steps).__name__}")
        if aging_steps < 1:
            raise ValueError(f"aging_steps must be >= 1, got {aging_steps}")
        self.aging_steps = aging_steps
        self._queues: dict[int, deque] = {}
        self._members: dict = {}

    def __len__(self) -> int:
        return len(self._members)

    def __bool__(self) -> bool:
        return bool(self._members)

    def __contains__(self, req) -> bool:
        return req in self._members

    def __iter__(self) -> Iterator:
        """In no particular order across priorities (each priority front to back)."""
        for q in list(self._queues.values()):
            yield from list(q)

    def _queue(self, req) -> deque:
        q = self._queues.get(req.priority)
        if q is None:
            q = self._queues[req.priority] = deque()
        return q

    def append(self, req) -> None:
        self._members[req] = None
        self._queue(req).append(req)

    def appendleft(self, req) -> None:
        self._members[req] = None
        self._queue(req).appendleft(req)

    def extendleft(self, reqs) -> None:
        """Like deque.extendleft: the last of ``reqs`` ends up first."""
        for req in reqs:
            self.appendleft(req)

    def key(self, req) -> int:
        """The aging key: the larger goes first."""
        return req.priority * self.aging_steps - req.queued_step

    def _head_queue(self) -> deque:
        if len(self._queues) == 1:
            return next(iter(self._queues.values()))
        best, best_key = None, None
        for prio, q in self._queues.items():
            k = (self.key(q[0]), prio)
            if best_key is None or k > best_key:
                best, best_key = q, k
        return best

    def head(self):
        """The request ``popleft`` returns (IndexError when empty)."""
        if not self._members:
            raise IndexError("head of an empty WaitQueue")
        return self._head_queue()[0]

    def __getitem__(self, index: int):
        if index != 0:
            raise IndexError("a WaitQueue gives only its head ([0])")
        return self.head()

    def popleft(self):
        if not self._members:
            raise IndexError("pop from an empty WaitQueue")
        q = self._head_queue()
        req = q.popleft()
        if not q:
            del self._queues[req.priority]
        del self._members[req]
        return req

    def remove(self, req) -> None:
        del self._members[req]
        q = self._queues[req.priority]
        q.remove(req)
        if not q:
            del self._queues[req.priority]
