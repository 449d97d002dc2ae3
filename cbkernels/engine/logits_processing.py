"""``model.generate()``'s logits processors for a step's sampled rows, all rows at once.

Each row is one request with its own settings (``SamplingParams``) and its own token history
(prompt + generated so far: generate()'s ``input_ids``). The processors run in the order
``GenerationMixin._get_logits_processor`` builds them, so greedy tokens are the ones
``generate()`` picks:

1. repetition penalty            (per-row penalty tensor, seen-token mask from the histories)
2. no-repeat n-grams             (the histories' windows matched against each row's suffix)
3. bad words, min length / min new tokens   -> -inf
4. forced BOS, then forced EOS   (the row becomes -inf except the forced token(s), 0)
5. suppress tokens, begin-suppress tokens   -> -inf

Nothing here reads back from the device: which rows a length-dependent rule hits is decided
on the host from lengths the engine already has, and the banned (row, token) pairs reach the
device as one index tensor. A row without a setting carries the neutral value (penalty 1.0,
no bans), so a batch mixing requests runs one pass. The sampling warpers (temperature, top-k,
top-p, min-p) follow in ``sampling.py``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .requests import Request

NEG_INF = float("-inf")


def _histories(requests: Sequence[Request], wanted: list[bool], device) -> torch.Tensor:
    """Token histories of the wanted rows, left-padded with -1 to one width ([S, L]); other
    rows are all padding. All rows end at the last column, so a suffix is a column slice."""
    width = max((len(r.tokens) for r, w in zip(requests, wanted) if w), default=0)
    rows = [[-1] * (width - len(r.tokens)) + r.tokens if w else [-1] * width for r, w in zip(requests, wanted)]
    return torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)


def _repetition_penalty(scores: torch.Tensor, hist: torch.Tensor, penalty: list[float]) -> torch.Tensor:
    """generate()'s RepetitionPenaltyLogitsProcessor: every token seen in the row's history
    is divided by the penalty (multiplied, when its score is negative)."""
    vocab = scores.shape[-1]
    seen = torch.zeros((scores.shape[0], vocab + 1), dtype=torch.bool, device=scores.device)
    seen.scatter_(1, hist.masked_fill(hist < 0, vocab).clamp(max=vocab), True)
    p = torch.tensor(penalty, dtype=scores.dtype).to(scores.device, non_blocking=True).unsqueeze(1)
    return torch.where(seen[:, :vocab], torch.where(scores < 0, scores * p, scores / p), scores)


def _ngram_bans(hist: torch.Tensor, rows: list[int], n: int, vocab: int) -> torch.Tensor:
    """generate()'s NoRepeatNGramLogitsProcessor for the rows ``rows`` (all of size ``n``):
    a length-n window of the history whose first n-1 tokens equal the row's last n-1 tokens
    bans its own last token. Returns a [len(rows), vocab] mask."""
    h = hist[torch.tensor(rows, dtype=torch.int64).to(hist.device, non_blocking=True)]
    windows = h.unfold(1, n, 1)  # [R, W, n]
    suffix = h[:, h.shape[1] - (n - 1):] if n > 1 else h[:, :0]
    # Padding (-1) never equals a real token: a window reaching into it cannot match a suffix
    # of real tokens, and rows shorter than n are left out by the caller.
    matches = (windows[..., :-1] == suffix.unsqueeze(1)).all(dim=-1)
    banned = torch.zeros((h.shape[0], vocab + 1), dtype=torch.bool, device=hist.device)
    last = windows[..., -1]
    banned.scatter_(1, torch.where(matches & (last >= 0), last.clamp(max=vocab), vocab), True)
    return banned[:, :vocab]


def _ends_with(tokens: list[int], prefix: tuple[int, ...]) -> bool:
    return len(prefix) <= len(tokens) and tuple(tokens[len(tokens) - len(prefix):]) == prefix


def _host_bans(requests: Sequence[Request], vocab: int):
    """(row, token) pairs banned before forcing (bad words, min length) and after it
    (suppress, begin-suppress), and the forced rows: row -> allowed tokens."""
    early, late, forced = [], [], {}
    for i, r in enumerate(requests):
        p = r.params
        n_tokens, generated = len(r.tokens), len(r.tokens) - r.prompt_len
        for word in p.bad_words_ids:  # a one-token word always; a longer one after its prefix
            if len(word) == 1 or _ends_with(r.tokens, word[:-1]):
                early.append((i, word[-1]))
        if p.eos_token_ids and generated < p.min_new_tokens:
            early.extend((i, t) for t in p.eos_token_ids)
        if p.forced_bos_token_id is not None and n_tokens == 1:
            forced[i] = (p.forced_bos_token_id,)
        if p.forced_eos_token_ids and generated == p.max_new_tokens - 1:
            forced[i] = p.forced_eos_token_ids  # applied after forced BOS in generate(): it wins
        late.extend((i, t) for t in p.suppress_tokens)
        # generate() begins suppressing at the prompt's length, one later after a one-token
        # prompt whose first generated token is a forced BOS.
        begin = r.prompt_len + (1 if r.prompt_len == 1 and p.forced_bos_token_id is not None else 0)
        if p.begin_suppress_tokens and n_tokens == begin:
            late.extend((i, t) for t in p.begin_suppress_tokens)
    keep = lambda pairs: [(i, t) for i, t in pairs if 0 <= t < vocab]  # noqa: E731 - ids past the logits: nothing to ban
    return keep(early), keep(late), forced


def _fill(scores: torch.Tensor, pairs: list[tuple[int, int]], value: float) -> None:
    if pairs:
        idx = torch.tensor(pairs, dtype=torch.int64).to(scores.device, non_blocking=True)
        scores[idx[:, 0], idx[:, 1]] = value


def process_logits(scores: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """``scores [S, V]`` (fp32, row i for ``requests[i]``) after generate()'s logits
    processors, each row with its own settings. Rows whose request sets none are unchanged."""
    params = [r.params for r in requests]
    if not any(p.processes_logits for p in params):
        return scores
    scores = scores.clone()
    vocab = scores.shape[-1]
    ngram_rows = [i for i, (r, p) in enumerate(zip(requests, params))
                  if p.no_repeat_ngram_size and len(r.tokens) >= p.no_repeat_ngram_size]
    penalised = [p.repetition_penalty != 1.0 for p in params]
    hist: Optional[torch.Tensor] = None
    if any(penalised) or ngram_rows:
        wanted = [pen or i in ngram_rows for i, pen in enumerate(penalised)]
        hist = _histories(requests, wanted, scores.device)
    # 1. repetition penalty (a penalty of 1.0 divides by one: the row is unchanged)
    if any(penalised):
        scores = _repetition_penalty(scores, hist, [p.repetition_penalty for p in params])
    # 2. n-gram bans, grouped by n
    for n in sorted({params[i].no_repeat_ngram_size for i in ngram_rows}):
        rows = [i for i in ngram_rows if params[i].no_repeat_ngram_size == n]
        index = torch.tensor(rows, dtype=torch.int64).to(scores.device, non_blocking=True)
        scores[index] = scores[index].masked_fill(_ngram_bans(hist, rows, n, vocab), NEG_INF)
    early, late, forced = _host_bans(requests, vocab)
    # 3. bad words and minimum length
    _fill(scores, early, NEG_INF)
    # 4. forced tokens: -inf everywhere but the forced token(s), which get 0
    if forced:
        rows = torch.tensor(list(forced), dtype=torch.int64).to(scores.device, non_blocking=True)
        scores[rows] = NEG_INF
        _fill(scores, [(i, t) for i, toks in forced.items() for t in toks if 0 <= t < vocab], 0.0)
    # 5. suppressed tokens
    _fill(scores, late, NEG_INF)
    return scores
