"""The adaptive half of ``Scheduler`` (docs/scheduling.md), as a mixin: the options
(predictive admission, the step budget, the length model every finished request teaches),
preemption's victim by priority, the step-time feedback and the scheduling metrics.
``scheduler.py`` keeps the mechanics that every step runs."""
from __future__ import annotations

from typing import Optional

from .admission import QUANTILE, PredictiveAdmission
from .config import ADMISSIONS
from .length_model import LengthModel
from .metrics import scheduling_snapshot
from .step_budget import StepBudget


class AdaptiveScheduling:
    def _init_adaptive(self, admission: str, target_itl_ms: Optional[float],
                       length_model: Optional[LengthModel]) -> None:
        """After ``cache``, ``max_batch_tokens`` and ``max_num_seqs`` are set."""
        if admission not in ADMISSIONS:
            raise ValueError(f"admission must be one of {ADMISSIONS}, got {admission!r}")
        if length_model is not None and not isinstance(length_model, LengthModel):
            raise TypeError(f"length_model must be a LengthModel or None, got {type(length_model).__name__}")
        cache = self.cache
        self.steps = 0  # schedule() calls: the clock of aging and of predicted ends
        self.length_model = length_model if length_model is not None else LengthModel()
        self.predictive = None
        if admission == "predictive":
            self.predictive = PredictiveAdmission(cache.num_blocks, cache.block_size, self.max_batch_tokens,
                                                  self.length_model, groups=len(cache.allocators),
                                                  capacity=self.max_num_seqs)
        self.step_budget = None if target_itl_ms is None else StepBudget(
            target_itl_ms, self.max_batch_tokens, context=self._running_context)
        self.recomputed_tokens = 0  # computed tokens preemption dropped and admission had to compute again
        self._priorities: set[int] = set()  # priorities ever queued: one means preemption's fast path
        self.last_budget = self.max_batch_tokens
        self._budget_total = 0
        self.deferred_by_target = 0  # admissions held back because the decodes with them would miss the target
        self._target_deferred_head = None

    def _running_context(self) -> int:
        """The tokens the running requests have computed: the KV a step's decodes read."""
        return sum(r.num_computed for r in self.running)

    def _target_admits(self, req) -> bool:
        """``target_itl_ms``: whether the decodes of the running requests and ``req`` are
        predicted to keep to the target when their histories have grown to their predicted
        ends (a running request's prompt and predicted output, or what it computed if it ran
        past that): a history grows a token a step, so decodes admitted at the target's edge
        would leave it as they run (``StepBudget.admits``)."""
        ends = sum(max(r.num_computed, r.prompt_len + (r.predicted_output or 0)) for r in self.running)
        own = self.length_model.predict(req.prompt_len, req.params.max_new_tokens, 0, QUANTILE)
        if self.step_budget.admits(len(self.running), ends + req.prompt_len + own):
            return True
        if self._target_deferred_head is not req:
            self._target_deferred_head = req
            self.deferred_by_target += 1
        return False

    def _sequence_charge(self, batch) -> int:
        """Tokens to set aside for one more sequence joining this step: the step budget counts
        the running requests and one new sequence; each further one costs its per-sequence
        time (``StepBudget.sequence_tokens``). 0 without ``target_itl_ms``."""
        if self.step_budget is None or not batch.started:
            return 0
        return self.step_budget.sequence_tokens()

    def _victim(self, batch):
        """The running request to preempt: not scheduled in this step, lowest priority, newest."""
        if len(self._priorities) <= 1:
            return next((r for r in reversed(self.running) if r not in batch.members), None)
        victim = None
        for r in reversed(self.running):
            if r not in batch.members and (victim is None or r.priority < victim.priority):
                victim = r
        return victim

    def observe_step(self, batch, seconds: float) -> None:
        """After a step: its wall time feeds the step-time model (``target_itl_ms``)."""
        if self.step_budget is not None and batch.requests:
            self.step_budget.observe(batch.total_tokens, len(batch.requests), seconds)

    def mean_budget(self) -> float:
        return self._budget_total / self.steps if self.steps else float(self.max_batch_tokens)

    def metrics(self) -> dict:
        """Scheduling counters for ``engine.metrics()`` (``metrics.scheduling_snapshot``)."""
        return scheduling_snapshot(self)
