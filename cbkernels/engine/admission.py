"""Predictive admission: admit a waiting request only while the predicted peak block demand
of everything running, plus it, fits the cache.

Every running request holds a slot in a few arrays: its predicted final length ``P`` (prompt
+ predicted output, from the length model at quantile ``quantile``) and the scheduler step
``E`` at which it is predicted to finish. A decoding request grows one token a step, so its
length at a later step ``T < E`` is ``P - (E - T)``. The demand peaks just before some
request finishes; at ``T = E_k - 1`` the requests alive are those with ``E >= E_k``, so one
sort by ``E`` and a cumulative sum give the demand at every such moment (vectorised: no
Python loop over the running requests). Each request counts one more block than its tokens
fill (the partly written last block).

A request whose bucket the length model has learned nothing about (``LengthModel.knows``)
has no prediction: it counts the blocks it holds now, as greedy admission would, and is
predicted again at every check until its bucket has learned.

A request still running past its predicted end is a miss: its length is predicted again
(conditioned on what it has generated so far). A preemption means the demand was
underestimated: the margin (the share of the cache admission keeps back) grows by
``MARGIN_STEP`` after a step that preempted; it shrinks by ``MARGIN_DECAY`` every step
without a preemption. Preemption stays
the fallback when predictions are wrong.

The check runs when a request is at the head of the queue; a deferred head is checked
again only once the requests that left since (finished or preempted) hold, at their
predicted final size, at least the blocks it was short of (one request lowers the peak by
no more than that), or ``RECHECK_STEPS`` steps later, so a long queue costs nothing per step.
"""
from __future__ import annotations

import math

import numpy as np

from .length_model import LengthModel

MARGIN_STEP = 0.02
MARGIN_DECAY = 0.99
MAX_MARGIN = 0.3
RECHECK_STEPS = 8
QUANTILE = 0.3
EXACT_LIMIT = 128  # up to this many requests the peak counts whole blocks exactly (n x n)


class PredictiveAdmission:
    def __init__(self, num_blocks: int, block_size: int, max_batch_tokens: int, length_model: LengthModel,
                 quantile: float = QUANTILE, groups: int = 1, capacity: int = 64):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_batch_tokens = max_batch_tokens
        self.model = length_model
        self.quantile = quantile
        self.groups = groups  # layer groups (allocators): each holds its own blocks
        self.final = np.zeros(capacity)  # predicted final length, tokens
        self.end = np.zeros(capacity)  # predicted step of the last token
        self.alive = np.zeros(capacity, dtype=bool)
        self.known = np.zeros(capacity, dtype=bool)  # False: the length model had nothing to predict with
        self.owner: list = [None] * capacity
        self._free = list(range(capacity - 1, -1, -1))
        # Kept per slot without numpy, for the quick check: ceil(P / block) of the known ones,
        # their sum, how many are unknown, and the earliest predicted end (may be stale-low).
        self._final_blocks = [0] * capacity
        self._sum_final_blocks = 0
        self._unknown = 0
        self._next_end = float("inf")
        self.margin = 0.0
        self.misses = 0  # requests that ran past their predicted end
        self.deferred = 0  # requests whose admission waited for predicted demand to fit
        self._freed = 0.0  # blocks (at their predicted final size) of the requests that left since
        self._deferred_head = None  # (request, step, blocks over the limit) of the last deferral
        self._preempted = False  # in the step being scheduled

    # ------------------------------------------------------------------ slots
    def _slot(self) -> int:
        if not self._free:  # more running than expected (forked siblings): grow
            n = len(self.alive)
            self.final = np.concatenate([self.final, np.zeros(n)])
            self.end = np.concatenate([self.end, np.zeros(n)])
            self.alive = np.concatenate([self.alive, np.zeros(n, dtype=bool)])
            self.known = np.concatenate([self.known, np.zeros(n, dtype=bool)])
            self.owner += [None] * n
            self._final_blocks += [0] * n
            self._free = list(range(2 * n - 1, n - 1, -1))
        return self._free.pop()

    def _predict(self, req, step: int) -> tuple[float, float, bool]:
        """(predicted final length, predicted step of its last token, whether the length model
        knew anything); with nothing learned for its bucket a request counts what it holds now."""
        if not self.model.knows(req.prompt_len, req.params.max_new_tokens):
            return float(len(req.tokens)), float(step), False
        generated = len(req.tokens) - req.prompt_len
        out = self.model.predict(req.prompt_len, req.params.max_new_tokens, generated, self.quantile)
        final = req.prompt_len + out
        # The prompt (and anything generated before a preemption) prefills in chunks of at most
        # max_batch_tokens, then one token a step.
        todo = len(req.tokens) - req.num_computed
        prefill_steps = max(1, -(-todo // self.max_batch_tokens))
        return final, step + prefill_steps - 1 + (final - len(req.tokens)), True

    def _set(self, s: int, final: float, end: float, known: bool) -> None:
        """Slot ``s`` (not counted yet) gets a prediction."""
        self.final[s], self.end[s], self.known[s] = final, end, known
        blocks = math.ceil(final / self.block_size) if known else 0
        self._final_blocks[s] = blocks
        self._sum_final_blocks += blocks
        if known:
            self._next_end = min(self._next_end, end)
        else:
            self._unknown += 1

    def _unset(self, s: int) -> None:
        self._sum_final_blocks -= self._final_blocks[s]
        self._final_blocks[s] = 0
        self._unknown -= not self.known[s]

    def add(self, req, step: int) -> None:
        """``req`` starts running (admitted or forked)."""
        s = self._slot()
        req.admission_slot = s
        self._set(s, *self._predict(req, step))
        self.alive[s] = True
        self.owner[s] = req

    def remove(self, req) -> None:
        """``req`` stopped running (finished, failed, cancelled or preempted)."""
        s = req.admission_slot
        if s < 0:
            return
        req.admission_slot = -1
        self._freed += self._final_blocks[s] if self.known[s] else self.final[s] / self.block_size + 1
        self._unset(s)
        self.alive[s] = False
        self.owner[s] = None
        self._free.append(s)

    def on_preemption(self) -> None:
        self._preempted = True

    def tick(self) -> None:
        """A new step: adapt the margin to whether the last one preempted."""
        if self._preempted:
            self.margin = min(MAX_MARGIN, self.margin + MARGIN_STEP)
        else:
            self.margin *= MARGIN_DECAY
        self._preempted = False

    # ------------------------------------------------------------------ the check
    def _repredict(self, step: int) -> float:
        """Predict misses again; requests predicted without data are predicted again (their
        bucket may have learned meanwhile). Returns the blocks of those still unknown."""
        if not self._unknown and self._next_end > step:
            return 0.0  # no miss, nothing unknown
        held = 0.0
        for s in np.flatnonzero(self.alive & ((self.end <= step) | ~self.known)).tolist():
            self.misses += bool(self.known[s])
            final, end, known = self._predict(self.owner[s], step)
            self._unset(s)
            self._set(s, final, max(end, step + 1) if known else end, known)
            if not known:
                held += final / self.block_size + 1
        live = self.alive & self.known
        self._next_end = float(self.end[live].min()) if live.any() else float("inf")
        return held

    def peak_blocks(self, extra: tuple[float, float] | None = None, held: float = 0.0) -> float:
        """Predicted peak blocks of the running requests with a prediction (plus ``extra``:
        (final, end)), plus ``held`` blocks that stay as they are (unknown lengths)."""
        live = self.alive & self.known
        final, end = self.final[live], self.end[live]
        if extra is not None:
            final, end = np.append(final, extra[0]), np.append(end, extra[1])
        if not len(final):
            return held * self.groups
        order = np.argsort(-end, kind="stable")
        final, end = final[order], end[order]
        if len(final) <= EXACT_LIMIT:
            # Request j at T_k = E_k - 1 holds P_j - (E_j - T_k) tokens, ceil(. / block) blocks;
            # alive at T_k: j <= k in this order (E_j >= E_k).
            length = final[:, None] - end[:, None] + (end[None, :] - 1)
            blocks = np.triu(np.ceil(np.maximum(length, 0.0) / self.block_size))
            return (float(blocks.sum(axis=0).max()) + held) * self.groups
        n = np.arange(1, len(final) + 1)
        # The same in O(n): the alive requests hold sum(P - E) + n*T tokens, and each at most
        # one block more than its tokens fill.
        tokens = np.cumsum(final - end) + n * (end - 1)
        return (float(np.max(tokens / self.block_size + n)) + held) * self.groups

    def admits(self, req, step: int) -> bool:
        """Whether ``req`` (the head of the queue) may start now."""
        head = self._deferred_head
        if head is not None and head[0] is req and step - head[1] < RECHECK_STEPS and self._freed * self.groups < head[2]:
            return False  # what left since cannot have made room (a request lowers the peak by its blocks at most)
        held = self._repredict(step)
        final, end, known = self._predict(req, step)
        limit = (1.0 - self.margin) * self.num_blocks
        head = math.ceil(final / self.block_size) if known else final / self.block_size + 1
        # Quick: everyone at its predicted final length at once bounds the peak from above.
        if (self._sum_final_blocks + held + head) * self.groups <= limit:
            self._deferred_head = None
            return True
        peak = self.peak_blocks((final, end), held) if known else self.peak_blocks(None, held + head)
        if peak <= limit:
            self._deferred_head = None
            return True
        if not req.deferred:
            req.deferred = True
            self.deferred += 1
        self._deferred_head = (req, step, peak - limit)
        self._freed = 0.0
        return False
