"""Next tokens for a step's sampled rows: logits processing, sampling warpers, the draw.

One batched pass over all rows, each row with its own settings as tensors:

* ``process_logits`` (``logits_processing.py``): generate()'s logits processors;
* the warpers generate() adds when ``do_sample`` is on, in its order: temperature, top-k,
  top-p, min-p. A greedy row carries the neutral values (temperature 1, top-k off, top-p 1,
  min-p 0), which leave its scores bit-for-bit unchanged; one sort serves top-k and top-p;
* greedy rows take the argmax, sampling rows one ``torch.multinomial`` draw together;
* log-probabilities (when a row asks for them) are the log-softmax of the final scores, the
  scores ``generate(output_scores=True)`` reports.

The chosen tokens (and their log-probabilities) come back to the host in one copy per step.
"""
from __future__ import annotations

from operator import attrgetter
from typing import Optional, Sequence

import torch

from .logits_processing import NEG_INF, process_logits
from .requests import Request, SampledToken


def _to(device, values, dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def warp(scores: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """generate()'s sampling warpers on ``scores [S, V]``; rows that do not sample (or set no
    warper) come back unchanged."""
    params = [r.params for r in requests]
    vocab, device = scores.shape[-1], scores.device
    sampling = [not p.greedy for p in params]
    temperature = [p.temperature if s else 1.0 for p, s in zip(params, sampling)]
    top_k = [min(p.top_k, vocab) if s and p.top_k > 0 else vocab for p, s in zip(params, sampling)]
    top_p = [p.top_p if s else 1.0 for p, s in zip(params, sampling)]
    min_p = [p.min_p if s else 0.0 for p, s in zip(params, sampling)]
    if any(t != 1.0 for t in temperature):
        scores = scores / _to(device, temperature, scores.dtype).unsqueeze(1)
    cut_k, cut_p = any(k < vocab for k in top_k), any(p < 1.0 for p in top_p)
    if cut_k or cut_p:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        if cut_k:  # below the k-th largest score (ties with it stay)
            kth = sorted_scores.gather(1, _to(device, top_k, torch.int64).unsqueeze(1) - 1)
            scores = scores.masked_fill(scores < kth, NEG_INF)
            sorted_scores = sorted_scores.masked_fill(sorted_scores < kth, NEG_INF)
        if cut_p:
            # generate()'s TopPLogitsWarper works on the ascending order: it drops the tokens
            # whose cumulative probability, counted from the least likely, stays <= 1 - top_p,
            # and always keeps the most likely one.
            ascending = sorted_scores.flip(-1)
            cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
            p = _to(device, top_p, scores.dtype).unsqueeze(1)
            drop = (cumulative <= 1 - p) & (p < 1.0)
            drop[:, -1] = False
            removed = torch.zeros_like(drop).scatter_(1, order, drop.flip(-1))
            scores = scores.masked_fill(removed, NEG_INF)
    if any(m > 0.0 for m in min_p):  # below min_p times the most likely token's probability
        probs = scores.softmax(dim=-1)
        floor = _to(device, min_p, scores.dtype).unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
        scores = scores.masked_fill(probs < floor, NEG_INF)
    return scores


def _unpack(host: list[float], n: int, k: int, top_rows: list[int], requests) -> list[int]:
    """Split the one host copy into tokens, log-probabilities and top alternatives."""
    tokens = [int(t) for t in host[:n]]
    logprobs = host[n:2 * n]
    slot = {row: j for j, row in enumerate(top_rows)}
    out = []
    for i, (r, token) in enumerate(zip(requests, tokens)):
        p = r.params
        if not (p.return_logprobs or p.top_logprobs):
            out.append(token)
            continue
        top = None
        if p.top_logprobs:
            base = 2 * n + slot[i] * 2 * k
            ids, vals = host[base:base + k], host[base + k:base + 2 * k]
            top = [(int(t), v) for t, v in zip(ids[:p.top_logprobs], vals[:p.top_logprobs])]
        out.append(SampledToken(token, logprobs[i], top))
    return out


def distinct_params(params: Sequence) -> list:
    """Each parameter object once (by identity): per-step checks over many requests that share
    a generation config cost one check, not one per row."""
    return list({id(p): p for p in params}.values())


_PLAIN_GREEDY = attrgetter("params.plain_greedy")


def all_plain_greedy(requests: Sequence[Request]) -> bool:
    """Every row takes the argmax of its logits, unprocessed, without log-probabilities."""
    return all(map(_PLAIN_GREEDY, requests))


_NUMPY_DTYPES = (torch.float32, torch.float16, torch.float64)


def argmax_rows(logits: torch.Tensor) -> list[int]:
    """The argmax of every row of ``logits [S, V]`` as host ints (the first of tied maxima,
    as torch.argmax). On the CPU numpy's argmax does it: torch's CPU argmax is 2.5-10x
    slower at these shapes (256 x 512: 98 vs 10 us; 16 x 49,152: 454 vs 38 us, one thread)."""
    if logits.device.type == "cpu" and logits.dtype in _NUMPY_DTYPES and not logits.requires_grad:
        return logits.numpy().argmax(axis=-1).tolist()
    return torch.argmax(logits, dim=-1).tolist()


def sample(logits: torch.Tensor, requests: Sequence[Request], generator: Optional[torch.Generator]) -> list[int]:
    """Next token of every row of ``logits [S, V]``, row i for ``requests[i]`` (whose
    ``tokens`` are its history up to this step). Rows that ask for log-probabilities get a
    ``SampledToken`` carrying them."""
    if all_plain_greedy(requests):
        return argmax_rows(logits)  # the common greedy step
    params = [r.params for r in requests]
    distinct = distinct_params(params)  # requests of one generation config share one object
    want_logprobs = any(p.return_logprobs or p.top_logprobs for p in distinct)
    scores = process_logits(logits.float(), requests)
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    if drawn:
        scores = warp(scores, requests)
    tokens = torch.argmax(scores, dim=-1)
    if drawn:
        index = _to(scores.device, drawn, torch.int64)
        probs = scores.index_select(0, index).softmax(dim=-1)
        tokens = tokens.index_copy(0, index, torch.multinomial(probs, 1, generator=generator).squeeze(1))
    if not want_logprobs:
        return tokens.tolist()
    logp = scores.log_softmax(dim=-1)
    parts = [tokens.double(), logp.gather(1, tokens.unsqueeze(1)).squeeze(1).double()]
    top_rows = [i for i, p in enumerate(params) if p.top_logprobs]
    k = min(max((params[i].top_logprobs for i in top_rows), default=0), logp.shape[-1])
    if k:
        top = logp.index_select(0, _to(scores.device, top_rows, torch.int64)).topk(k, dim=-1)
        parts.append(torch.cat([top.indices.double(), top.values.double()], dim=1).flatten())
    return _unpack(torch.cat(parts).tolist(), len(requests), k, top_rows, requests)
