"""What the scheduler hands the model runner for one step (``ScheduledBatch``)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .requests import Request


@dataclass(slots=True)
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # new tokens of each request
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)
    preempted: list[Request] = field(default_factory=list)
    failed: list[Request] = field(default_factory=list)
    members: set = field(default_factory=set)  # the scheduled requests, for O(1) membership
    started: list[Request] = field(default_factory=list)  # admitted or forked this step (may not run)
    samples: int = 0  # scheduled requests whose new tokens end their known tokens: they sample

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)
