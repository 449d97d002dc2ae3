"""Schedulers: which requests run in the next step, and how many tokens each.

Both schedulers share the mechanics (``Scheduler``): a per-step token budget
``max_batch_tokens``, chunked (split) prefill of prompts that do not fit the budget, and
when blocks run out: wait (new requests), preempt the newest running request (it is
recomputed later), or fail at once a request that could never fit the cache. They differ
in priority: ``FIFOScheduler`` serves running requests (decodes first, so time between
tokens stays low) before admitting new ones; ``PrefillFirstScheduler`` finishes pending
prefills and admits new requests before decoding (lower time to first token).

Options common to both (docs/scheduling.md): the waiting queue orders requests by priority
with aging (``waiting.WaitQueue``); ``admission="predictive"`` holds a request back while
the predicted peak demand of the running ones plus it would not fit the cache
(``admission.PredictiveAdmission``, predictions from ``length_model.LengthModel``, which
learns from every finished request whatever the admission); ``target_itl_ms`` sizes each
step's token budget from a fitted step-time model (``step_budget.StepBudget``). Preemption
picks the lowest priority, newest first.
"""
from __future__ import annotations

from typing import Optional

from .adaptive import AdaptiveScheduling
from .admission import QUANTILE
from .allocators import OutOfBlocks
from .batch import ScheduledBatch
from .cache import PagedAttentionCache
from .inputs import check_count
from .length_model import LengthModel
from .requests import TERMINAL, Request, RequestStatus as S
from .scheduler_names import SCHEDULER_NAMES
from .waiting import AGING_STEPS, WaitQueue

# A request that ended on its own (not cancelled or failed) teaches the length model.
_NATURAL_ENDS = ("eos", "stop", "length")


class Scheduler(AdaptiveScheduling):
    def __init__(self, cache: PagedAttentionCache, max_batch_tokens: int, max_num_seqs: int = 64, *,
                 admission: str = "greedy", target_itl_ms: Optional[float] = None, aging_steps: int = AGING_STEPS,
                 length_model: Optional[LengthModel] = None):
        if not isinstance(cache, PagedAttentionCache):
            raise TypeError(f"cache must be a PagedAttentionCache, got {type(cache).__name__}")
        check_count("max_batch_tokens", max_batch_tokens, 1)
        check_count("max_num_seqs", max_num_seqs, 1)
        self.cache = cache
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting = WaitQueue(aging_steps)
        # In admission order, the last one the newest. A dict (values unused) for O(1)
        # membership and removal: requests hash and compare by identity.
        self.running: dict[Request, None] = {}
        self._init_adaptive(admission, target_itl_ms, length_model)

    # -------------------------------------------------------------- queue verbs
    def add(self, req: Request) -> None:
        if not isinstance(req, Request):
            raise TypeError(f"req must be a Request, got {type(req).__name__}")
        if req.status is not S.PENDING:
            raise ValueError(f"req must be PENDING to be queued, got {req.status.name}")
        if isinstance(req.priority, bool) or not isinstance(req.priority, int):
            raise TypeError(f"req.priority must be an int, got {type(req.priority).__name__}")
        for r in (req, *req.pending_children):
            r.queued_step = self.steps
        self._priorities.add(req.priority)
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, req: Request) -> None:
        """Drop a finished, failed or cancelled request and free its blocks. Siblings still
        waiting to fork from it queue up on their own (at the head: they arrived with it)."""
        if req in self.running:
            del self.running[req]
            if self.predictive is not None:
                self.predictive.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.cache.release(req)
        if req.status is S.FINISHED and req.finish_reason in _NATURAL_ENDS and len(req.tokens) > req.prompt_len:
            self.length_model.record(req.prompt_len, req.params.max_new_tokens, len(req.tokens) - req.prompt_len,
                                     req.predicted_output)
        children, req.pending_children = req.pending_children, []
        self.waiting.extendleft(reversed([c for c in children if not c.is_done]))

    def fail(self, req: Request, reason: str) -> None:
        """End a live request with an error (its blocks are freed)."""
        self.finish(req)
        req.fail(reason)

    def cancel(self, req: Request, now: float) -> None:
        """End a live request at the caller's wish (its blocks are freed)."""
        self.finish(req)
        req.transition(S.FINISHED)
        req.finish_reason, req.finish_time = "cancelled", now

    def preempt(self, req: Request) -> None:
        del self.running[req]
        if self.predictive is not None:
            self.predictive.remove(req)
            self.predictive.on_preemption()
        self.cache.release(req)
        req.transition(S.PENDING)
        req.dropped_tokens = req.num_computed
        req.num_computed = 0
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    # -------------------------------------------------------------- one step
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        self.steps += 1
        budget = self.max_batch_tokens if self.step_budget is None else self.step_budget.budget(len(self.running))
        self._budget = self.last_budget = budget
        self._budget_total += budget
        if self.predictive is not None:
            self.predictive.tick()
        for phase in self.phases():
            phase(batch)
        if not batch.requests:
            self._fail_stuck_head(batch)
        return batch

    def _fail_stuck_head(self, batch: ScheduledBatch) -> None:
        """Nothing could be scheduled: if nothing runs either, the cache is as free as it gets,
        so the head request can never get its blocks. It fails with a reason."""
        if self.running or not self.waiting:
            return
        req = self.waiting.popleft()
        req.fail(f"request cannot be scheduled: needs {self.cache.blocks_needed(req, 1)}+ blocks, "
                 f"{self.cache.get_num_free_blocks()} of {self.cache.num_blocks} free")
        self.cache.release(req)
        batch.failed.append(req)
        self._fail_siblings(batch, req)

    @staticmethod
    def _fail_siblings(batch: ScheduledBatch, req: Request) -> None:
        """Siblings waiting to fork from a request that can never run share its prompt and
        settings: they fail with it."""
        for child in req.pending_children:
            if not child.is_done:
                child.fail(req.error)
                batch.failed.append(child)
        req.pending_children = []

    def postprocess(self, batch: ScheduledBatch, sampled: list, now: float) -> list[Request]:
        """After the step ran: every scheduled request gains its computed tokens and, where
        ``sampled`` (one entry per request) holds a token, that token; states move on, and
        requests that hit a stop condition finish and free their blocks. Returns those."""
        self.commit(batch, [token is not None for token in sampled])
        return self.resolve(batch, sampled, now)

    def commit(self, batch: ScheduledBatch, samples: list[bool]) -> None:
        """The half of ``postprocess`` that needs no token values: computed tokens, prefix
        hashes, states; a row that samples leaves a pending token. With asynchronous scheduling
        this runs as soon as a step is launched, so the next step can be scheduled."""
        cache, decoding, terminal = self.cache, S.DECODING, TERMINAL
        # The cache has work only for sliding rings, or for blocks that filled up (to hash).
        sliding, hashing, bs = bool(cache.sliding_allocators), cache.prefix_caching, cache.block_size
        for req, n, sampled in zip(batch.requests, batch.num_tokens, samples):
            if req.status in terminal:  # finished or cancelled while this step was in flight
                continue
            computed = req.num_computed = req.num_computed + n
            if sliding or (hashing and len(req.block_hashes) < computed // bs):
                cache.commit(req)
            if not sampled:  # a prefill chunk short of the prompt's end
                req.transition(S.SPLIT_PENDING_REMAINDER)
                continue
            req.pending += 1
            if req.status is not decoding:
                req.transition(decoding)

    def resolve(self, batch: ScheduledBatch, sampled: list, now: float, made: Optional[list] = None) -> list[Request]:
        """The half of ``postprocess`` that needs the sampled tokens: append them, and finish
        (freeing their blocks) the requests that hit a stop condition. Returns those; ``made``
        (if given) gains a (request_id, token) pair for every token appended."""
        finished, terminal = [], TERMINAL
        for req, token in zip(batch.requests, sampled):
            if token is None:
                continue
            if req.status in terminal:  # cancelled or failed while its token was in flight
                req.pending = 0
                continue
            if made is not None and req.pending > 0:
                made.append((req.request_id, token))
            req.pending -= 1
            if type(token) is int:  # a plain token: Request.append_token + stop_reason, inlined (every row, every step)
                tokens, params = req.tokens, req.params
                tokens.append(token)
                req.token_times.append(now)
                if req.first_token_time is None:
                    req.first_token_time = now
                req.last_token_time = now
                if token in params.eos_token_ids:
                    reason = "eos"
                elif params.stop_check is not None and params.stop_check(tokens):
                    reason = "stop"
                elif len(tokens) - req.prompt_len >= params.max_new_tokens:
                    reason = "length"
                else:
                    continue
            else:  # a SampledToken carrying log-probabilities
                req.append_token(token, now)
                reason = req.stop_reason()
            if reason is not None:
                req.transition(S.FINISHED)
                req.finish_reason, req.finish_time = reason, now
                self.finish(req)
                finished.append(req)
        return finished

    def phases(self):
        raise NotImplementedError

    def _take(self, batch: ScheduledBatch, req: Request) -> bool:
        """Reserve blocks for the request's next chunk, preempting the newest unscheduled
        running request while blocks are short. False when it cannot run this step.
        A request with num_return_sequences siblings stops one token short of its prompt's
        end; the step that computes that token forks them."""
        fork = bool(req.pending_children) and req.num_computed >= req.prompt_len - 1
        n = min(req.remaining - (1 if req.pending_children and not fork else 0), self._budget)
        while True:
            try:
                self.cache.reserve(req, n)
                break
            except OutOfBlocks:
                victim = self._victim(batch)
                if victim is None or victim is req or victim.priority > req.priority:
                    if req in self.running:  # nobody newer to evict: step back itself
                        self.preempt(req)
                        batch.preempted.append(req)
                    return False
                self.preempt(victim)
                batch.preempted.append(victim)
        batch.requests.append(req)
        batch.members.add(req)
        batch.num_tokens.append(n)
        batch.samples += n == req.remaining
        self._budget -= n
        self._mark(req, n)
        if fork:
            self._fork(batch, req)
        return True

    def _fork(self, batch: ScheduledBatch, parent: Request) -> None:
        """The siblings adopt the parent's computed prompt (all but its last token) and run
        that last token in this step if the budget allows. One that cannot (no room for its
        copies, too many running) queues up on its own and prefills its prompt itself."""
        children, parent.pending_children = parent.pending_children, []
        on_their_own = []
        for child in children:
            if child.is_done:  # cancelled or failed while it waited
                continue
            copies = self.cache.fork(parent, child) if len(self.running) < self.max_num_seqs else None
            if copies is None:
                on_their_own.append(child)
                continue
            batch.copies.extend(copies)
            child.transition(S.PREFILLING_SPLIT)  # its prompt, but the last token, is computed
            child.transition(S.SPLIT_PENDING_REMAINDER)
            self.running[child] = None
            batch.started.append(child)
            child.predicted_output = parent.predicted_output
            if self.predictive is not None:
                self.predictive.add(child, self.steps)
            if self._budget > 0:
                self._take(batch, child)
        self.waiting.extendleft(reversed(on_their_own))

    @staticmethod
    def _mark(req: Request, n: int) -> None:
        if req.status is S.DECODING:  # stays DECODING
            return
        if req.status is S.SPLIT_PENDING_REMAINDER:
            req.transition(S.PREFILLING_SPLIT)
        elif req.status is S.PENDING:
            req.transition(S.PREFILLING if n == req.remaining else S.PREFILLING_SPLIT)

    def _decodes(self, batch: ScheduledBatch) -> None:
        """Every running decode's next token; ``_take``'s common case inlined, as this runs for
        every request every step: a decode whose new token falls inside its last block (its
        tables cover every computed token, so that block is held) reserves nothing. The rest
        goes through ``_take``."""
        members, requests, counts, try_reserve = batch.members, batch.requests, batch.num_tokens, self.cache.try_reserve
        decoding, running, bs = S.DECODING, self.running, self.cache.block_size  # locals: enum lookups cost
        budget, taken = self._budget, 0  # self._budget is only current around _take calls
        for req in list(running):
            if budget <= 0:
                break
            if req.status is not decoding or req in members:  # preempted this step: PENDING now
                continue
            known, pending, computed = len(req.tokens), req.pending, req.num_computed
            if pending and known + pending - req.prompt_len >= req.params.max_new_tokens:
                continue  # saturated: its in-flight token is its last
            if req.pending_children or known + pending - computed != 1 or (computed % bs == 0 and not try_reserve(req, 1)):
                # forking siblings, more than one token, or the new token opens a block the pool
                # cannot give: _take decides (it preempts for it, or steps it back)
                self._budget = budget
                self._take(batch, req)
                budget = self._budget
                continue
            requests.append(req)
            members.add(req)
            counts.append(1)
            taken += 1
            budget -= 1
        self._budget = budget
        batch.samples += taken  # every inlined decode samples

    def _continuing_prefills(self, batch: ScheduledBatch) -> None:
        for req in list(self.running):
            if self._budget <= 0:
                return
            if req.status is S.DECODING or req in batch.members or req not in self.running or req.saturated:
                continue
            self._take(batch, req)

    def _admit(self, batch: ScheduledBatch) -> None:
        while self.waiting and self._budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting.head()
            if req in batch.preempted:  # it just gave its blocks up: no churn within a step
                return
            if not self.cache.can_ever_fit(req.prompt_len + req.params.max_new_tokens):
                self.waiting.popleft()
                req.fail(f"request needs more KV cache than exists: {req.prompt_len} prompt + "
                         f"{req.params.max_new_tokens} new tokens > {self.cache.num_blocks} blocks of "
                         f"{self.cache.block_size}")
                batch.failed.append(req)
                self._fail_siblings(batch, req)
                continue
            if self.predictive is not None and self.running and not self.predictive.admits(req, self.steps):
                return  # the predicted peak would not fit: wait for running requests to finish
            if self.step_budget is not None and not self._target_admits(req):
                return  # the decodes with it would not keep to target_itl_ms: wait for some to finish
            charge = self._sequence_charge(batch)  # target_itl_ms: what one more sequence costs, in tokens
            if charge >= self._budget:
                return
            copies = self.cache.match_prefix(req)
            n = min(req.remaining, self._budget - charge)
            if self.cache.blocks_needed(req, n) > self.cache.get_num_free_blocks():
                self._undo_admission(req)  # wait for blocks to come back
                return
            self.waiting.popleft()
            self._budget -= charge
            self.running[req] = None
            batch.started.append(req)
            if req.predicted_output is None:
                req.predicted_output = self.length_model.predict(req.prompt_len, req.params.max_new_tokens, 0, QUANTILE)
            if req.dropped_tokens:
                self.recomputed_tokens += max(0, req.dropped_tokens - req.num_computed)
                req.dropped_tokens = 0
            if self.predictive is not None:
                self.predictive.add(req, self.steps)
            batch.copies.extend(copies)
            self._take(batch, req)

    def _undo_admission(self, req: Request) -> None:
        self.cache.prefix_hit_tokens -= req.num_computed
        req.prefix_hit_tokens -= req.num_computed
        self.cache.release(req)
        req.num_computed = 0


class FIFOScheduler(Scheduler):
    def phases(self):
        return (self._decodes, self._continuing_prefills, self._admit)


class PrefillFirstScheduler(Scheduler):
    def phases(self):
        return (self._continuing_prefills, self._admit, self._decodes)


# Every scheduler by the name BatchConfig.scheduler and the command line take.
SCHEDULERS: dict[str, type[Scheduler]] = dict(zip(SCHEDULER_NAMES, (FIFOScheduler, PrefillFirstScheduler), strict=True))


def make_scheduler(name: str, cache: PagedAttentionCache, max_batch_tokens: int, max_num_seqs: int,
                   **options) -> Scheduler:
    """``options``: admission, target_itl_ms, aging_steps, length_model (see ``Scheduler``)."""
    if not isinstance(name, str) or name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {tuple(SCHEDULERS)}, got {name!r}")
    return SCHEDULERS[name](cache, max_batch_tokens, max_num_seqs, **options)
