"""Next-token sampling for the rows that sample: greedy, temperature, top-k, top-p."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .requests import SamplingParams


def _filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if 0 < k < logits.shape[-1]:
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def _filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches ``p`` (the most
    likely token always stays)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> int:
    """One token from ``logits [V]``."""
    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits.float() / max(params.temperature, 1e-6)
    scores = _filter_top_p(_filter_top_k(scores, params.top_k), params.top_p)
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], generator: Optional[torch.Generator]) -> list[int]:
    """Tokens for ``logits [S, V]``, row i drawn with ``params[i]``. All-greedy batches take
    one argmax (one device-to-host copy)."""
    if all(p.greedy for p in params):
        return torch.argmax(logits, dim=-1).tolist()
    return [sample_row(logits[i], p, generator) for i, p in enumerate(params)]
