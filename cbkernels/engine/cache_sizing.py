"""How many KV blocks the cache gets, and the defaults that depend on the device.

* ``num_blocks`` given: that many.
* On CUDA, unless ``memory_fraction`` or ``max_cache_bytes`` is set: like a serving engine.
  ``gpu_memory_utilization`` (default 0.9) of the device's total memory is the ceiling for
  everything; what is in use already (weights, other processes) and the peak activation
  memory of one maximal step (a profiling forward of ``max_batch_tokens`` tokens) come off it,
  and the KV cache gets the rest.
* Otherwise (CPU, or an explicit byte budget): ``memory_fraction`` (default 0.1) of free
  memory, capped at ``max_cache_bytes`` (default 2 GiB).

In every case no more blocks than ``max_num_seqs`` requests at the model's longest context
could use. ``max_num_seqs`` defaults to 256 on CUDA and 64 elsewhere, and an explicit value
larger than the cache has blocks is refused (every running request holds a block).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
DEFAULT_MEMORY_FRACTION = 0.1
DEFAULT_MAX_CACHE_BYTES = 2 << 30
DEFAULT_MAX_NUM_SEQS = {"cuda": 256, "other": 64}
# Fallback when the machine's free memory cannot be read (e.g. an exotic OS).
UNKNOWN_FREE_BYTES = 4 << 30
GIB = float(1 << 30)


def human_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / (1 << 20):.1f} MiB"


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return UNKNOWN_FREE_BYTES


def resolve_config(config, device: torch.device):
    """A copy of ``config`` with the device-dependent defaults filled in; a setting that
    cannot apply on ``device`` is an error naming it."""
    on_cuda = device.type == "cuda"
    explicit_budget = config.memory_fraction is not None or config.max_cache_bytes is not None
    if config.gpu_memory_utilization is not None and not on_cuda:
        raise ValueError(f"gpu_memory_utilization applies to CUDA devices; the cache is on {device} "
                         "(use memory_fraction / max_cache_bytes or num_blocks)")
    use_utilization = on_cuda and config.num_blocks is None and not explicit_budget
    return dataclasses.replace(
        config,
        max_num_seqs=config.max_num_seqs or DEFAULT_MAX_NUM_SEQS["cuda" if on_cuda else "other"],
        gpu_memory_utilization=(config.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION)
        if use_utilization else None,
        memory_fraction=None if use_utilization else (config.memory_fraction or DEFAULT_MEMORY_FRACTION),
        max_cache_bytes=None if use_utilization else (config.max_cache_bytes or DEFAULT_MAX_CACHE_BYTES),
        async_scheduling=on_cuda if config.async_scheduling is None else config.async_scheduling,
    )


@dataclass(frozen=True)
class CacheSize:
    num_blocks: int
    block_bytes: int  # every layer's K and V of one block
    block_size: int
    how: str  # how the number was chosen, for people

    @property
    def bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def tokens(self) -> int:
        return self.num_blocks * self.block_size

    def describe(self) -> str:
        return f"{self.tokens} tokens in {self.num_blocks} blocks, {human_bytes(self.bytes)} ({self.how})"


def size_cache(config, *, block_bytes: int, max_useful_blocks: int, device: torch.device,
               mem_info: Optional[Callable[[], tuple[int, int]]] = None,
               profile_peak_bytes: Optional[Callable[[], int]] = None) -> CacheSize:
    """Blocks for a resolved ``config``. ``mem_info`` returns (free, total) bytes of the
    device and ``profile_peak_bytes`` the activation peak of one maximal step (both measured
    on CUDA by default; tests pass fakes)."""
    bs = config.block_size
    if config.num_blocks is not None:
        return CacheSize(config.num_blocks, block_bytes, bs, "num_blocks given")
    if config.gpu_memory_utilization is not None:
        free, total = (mem_info or (lambda: torch.cuda.mem_get_info(device)))()
        peak = (profile_peak_bytes or (lambda: 0))()
        in_use = total - free
        budget = int(config.gpu_memory_utilization * total) - in_use - peak
        how = (f"gpu_memory_utilization {config.gpu_memory_utilization:g} of {human_bytes(total)}, less "
               f"{human_bytes(in_use)} in use and a {human_bytes(peak)} activation peak")
        if budget < block_bytes:
            raise ValueError(f"no room for the KV cache: {how} leaves {human_bytes(budget)}; raise "
                             "gpu_memory_utilization, lower max_batch_tokens, or set num_blocks")
    else:
        free = free_memory_bytes(device)
        budget = min(config.max_cache_bytes, int(config.memory_fraction * free))
        how = (f"memory_fraction {config.memory_fraction:g} of {human_bytes(free)} free, "
               f"capped at max_cache_bytes {human_bytes(config.max_cache_bytes)}")
    blocks = max(1, budget // block_bytes)
    if blocks > max_useful_blocks:
        blocks = max_useful_blocks
        how += f"; capped at what {config.max_num_seqs} requests of the model's longest context use"
    return CacheSize(blocks, block_bytes, bs, how)


def check_max_num_seqs(requested, effective: int, num_blocks: int) -> int:
    """The running-request limit for a cache of ``num_blocks``: an explicit ``requested``
    above it is an error; a default is capped to it."""
    if effective <= num_blocks:
        return effective
    if requested is not None:
        raise ValueError(f"max_num_seqs {requested} is more than the cache's {num_blocks} blocks "
                         "(every running request holds at least one): lower it or give the cache more blocks")
    return num_blocks


@torch.inference_mode()
def profile_activation_peak(model, num_tokens: int, num_logits: int) -> int:
    """Peak bytes a forward of ``num_tokens`` tokens allocates beyond what is allocated
    already (weights, the KV cache not yet made), with the model's own attention (CUDA)."""
    device = next(model.parameters()).device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    ids = torch.zeros(1, num_tokens, dtype=torch.long, device=device)
    model(input_ids=ids, use_cache=False, logits_to_keep=num_logits)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    return peak
