"""``PagedAttentionCache``: the paged K/V tensors of every layer, their allocators, and
the per-request bookkeeping (prefix-cache matching, copy-on-write, slots, block tables)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .allocators import BlockPool, CacheAllocator, FullAttentionCacheAllocator, OutOfBlocks, SlidingAttentionCacheAllocator
from .inputs import check_count, check_request_id
from .block_tables import DeviceBlockTables, table_width
from .cache_sizing import CacheSize, profile_activation_peak, resolve_config, size_cache
from .model_config import DEFAULT_MAX_CONTEXT, max_context, text_config
from .tp_layout import TPLayout, agree_min, describe

def layer_windows_of(config) -> list[Optional[int]]:
    """Sliding window of every decoder layer (None: full attention), from ``layer_types``
    when the config has it, else a model-wide ``sliding_window``."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return [window if t == "sliding_attention" and window else None for t in layer_types[:n]]
    if window and getattr(config, "use_sliding_window", True):
        return [window] * n
    return [None] * n


_FP8_CACHE_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def kv_cache_dtype(name: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The cache's element dtype for ``BatchConfig.kv_cache_dtype``; fp8 on a CUDA arch the
    compile gate builds no fp8 kernels for is refused (ValueError naming kv_cache_dtype)."""
    if name == "auto":
        return model_dtype
    from ..ops.checks import check_fp8_device

    dtype = _FP8_CACHE_DTYPES[name]
    device = torch.device(device)
    check_fp8_device(device, dtype, name="kv_cache_dtype")
    if device.type == "cuda" and model_dtype == torch.float32:
        raise ValueError("kv_cache_dtype: fp8 caches on CUDA need a float16 / bfloat16 model (fp32 attention "
                         "over fp8 spills in every compiled tile)")
    return dtype


class PagedAttentionCache:
    def __init__(
        self, num_blocks: int, block_size: int, max_batch_tokens: int, *, num_layers: int = 1,
        num_kv_heads: int = 1, head_dim: int = 64, dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu", layer_windows: Optional[Sequence[Optional[int]]] = None,
        prefix_caching: bool = True, max_context: Optional[int] = None,
    ):
        for name, value, low in (("num_blocks", num_blocks, 1), ("block_size", block_size, 1),
                                 ("max_batch_tokens", max_batch_tokens, 1), ("num_layers", num_layers, 0),
                                 ("num_kv_heads", num_kv_heads, 1), ("head_dim", head_dim, 1)):
            check_count(name, value, low)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if layer_windows is not None and len(layer_windows) != num_layers:
            raise ValueError(f"layer_windows must have num_layers ({num_layers}) entries, got {len(layer_windows)}")
        self.num_blocks, self.block_size, self.max_batch_tokens = num_blocks, block_size, max_batch_tokens
        self.num_layers = num_layers
        windows = list(layer_windows) if layer_windows is not None else [None] * num_layers
        self.pool = BlockPool(num_blocks)
        # One allocator per distinct window; all draw on one shared pool of block ids.
        self.allocators: list[CacheAllocator] = []
        self.group_of_layer: list[int] = []
        index: dict[Optional[int], int] = {}
        for w in windows:
            if w not in index:
                index[w] = len(self.allocators)
                self.allocators.append(FullAttentionCacheAllocator(self.pool, block_size) if w is None
                                       else SlidingAttentionCacheAllocator(self.pool, block_size, w))
            self.group_of_layer.append(index[w])
        self.sliding_allocators = [a for a in self.allocators if a.sliding_window is not None]
        # A ring of recycled blocks cannot be shared, so prefix caching needs full layers only.
        self.prefix_caching = prefix_caching and all(w is None for w in windows)
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        self.kv = torch.zeros(shape, dtype=dtype, device=device) if num_layers else None
        # The dtype attention computes in (the model's); an fp8 cache only stores K/V.
        self.compute_dtype = torch.float32 if dtype.itemsize == 1 else dtype
        # The running requests' block tables on the same device, updated incrementally.
        full_only = all(w is None for w in windows)
        self.device_tables = DeviceBlockTables(
            len(self.allocators), table_width(max_context or DEFAULT_MAX_CONTEXT, block_size, num_blocks, full_only),
            device)
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0
        per_block = num_layers * 2 * block_size * num_kv_heads * head_dim * self.kv.element_size() if num_layers else 0
        self.size = CacheSize(num_blocks, per_block, block_size, "num_blocks given")
        # Set by for_model: the tensor-parallel layout (this rank's share of the heads) and the
        # query heads attention computes on this rank.
        self.tp: Optional[TPLayout] = None
        self.num_q_heads: Optional[int] = None

    @classmethod
    def for_model(cls, model, config, *, mem_info=None, profile_peak_bytes=None) -> "PagedAttentionCache":
        """The cache for ``model`` under ``config`` (its device-dependent defaults resolved
        first, ``cache_sizing.resolve_config``); ``mem_info`` / ``profile_peak_bytes`` replace the
        CUDA measurements (tests)."""
        mc = text_config(model)
        head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        # Under tensor parallelism each rank caches its own share of the KV heads (tp_layout).
        tp = describe(model)
        kv_heads = tp.kv_heads
        param = next(model.parameters())
        device = torch.device(config.device) if config.device is not None else param.device
        config = resolve_config(config, device)
        cache_dtype = kv_cache_dtype(config.kv_cache_dtype, param.dtype, device)
        # Bytes per block from the cache's element size: fp8 doubles the blocks of a bf16 budget.
        block_bytes = mc.num_hidden_layers * 2 * config.block_size * kv_heads * head_dim * cache_dtype.itemsize
        if profile_peak_bytes is None and config.gpu_memory_utilization is not None and config.num_blocks is None:
            logits = min(config.max_num_seqs, config.max_batch_tokens)
            profile_peak_bytes = lambda: profile_activation_peak(model, config.max_batch_tokens, logits)  # noqa: E731
        size = size_cache(config, block_bytes=block_bytes, device=device, mem_info=mem_info,
                          profile_peak_bytes=profile_peak_bytes,
                          max_useful_blocks=config.max_num_seqs * -(-max_context(mc) // config.block_size))
        if tp.is_parallel and config.num_blocks is None:  # every rank the same blocks: same schedules
            agreed = agree_min(tp, size.num_blocks)
            if agreed != size.num_blocks:
                size = CacheSize(agreed, size.block_bytes, size.block_size,
                                 f"{size.how}; the smallest of {tp.size} tensor-parallel ranks")
        cache = cls(size.num_blocks, config.block_size, config.max_batch_tokens, num_layers=mc.num_hidden_layers,
                    num_kv_heads=kv_heads, head_dim=head_dim, dtype=cache_dtype, device=device,
                    layer_windows=layer_windows_of(mc), prefix_caching=config.prefix_caching,
                    max_context=max_context(mc))
        cache.size = size
        cache.compute_dtype = param.dtype
        cache.tp, cache.num_q_heads = tp, tp.q_heads
        return cache

    # ------------------------------------------------------------------ pool
    def layer_cache(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[layer_idx, 0], self.kv[layer_idx, 1]

    def get_num_free_blocks(self) -> int:
        return self.pool.num_free()

    def num_used_blocks(self) -> int:
        """Blocks some request holds (cached blocks nobody holds count as free)."""
        return self.num_blocks - self.pool.num_free()

    def occupancy(self) -> float:
        return self.num_used_blocks() / self.num_blocks

    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0

    def allocate_blocks(self, n: int, request_id: str) -> list[int]:
        """Append ``n`` blocks to the request in the first layer group (the primitive the
        scheduler-level ``reserve`` builds on). TypeError / ValueError name a bad ``n`` or
        ``request_id``; more than ``get_num_free_blocks()`` raises ``OutOfBlocks``."""
        return self.allocators[0].allocate_blocks(n, request_id)

    def free_blocks(self, request_id: str) -> None:
        """Give the request's blocks back; an unknown ``request_id`` is a no-op (freeing twice
        is safe, which the fault paths rely on)."""
        check_request_id(request_id)
        self.device_tables.release(request_id)
        for alloc in self.allocators:
            alloc.free_blocks(request_id)

    # ------------------------------------------------------------------ requests
    def blocks_needed(self, req, n_tokens: int) -> int:
        new_len = req.num_computed + n_tokens
        return sum(a.blocks_needed(req.request_id, req.num_computed, new_len) for a in self.allocators)

    def can_ever_fit(self, total_len: int) -> bool:
        return sum(a.peak_blocks(total_len, self.max_batch_tokens) for a in self.allocators) <= self.num_blocks

    def match_prefix(self, req) -> list[tuple[int, int]]:
        """Adopt cached blocks for the longest cached prefix of a fresh request. At least one
        token is left to compute (its logits sample the next token); when that token falls
        into an adopted block, the block is copied first. Returns (src, dst) copies."""
        if not self.prefix_caching or req.num_computed or self.allocators[0].block_table(req.request_id):
            return []
        alloc: FullAttentionCacheAllocator = self.allocators[0]  # type: ignore[assignment]
        bs, tokens = self.block_size, req.tokens
        self.prefix_queried_tokens += len(tokens)
        parent = None
        for start in range(0, len(tokens) - bs + 1, bs):
            chunk = tokens[start:start + bs]
            h = self.pool.hash_fn(parent, chunk)
            block = self.pool.lookup(h, parent, chunk)
            if block is None:
                break
            alloc.adopt(req.request_id, block)
            req.block_hashes.append(h)
            parent = h
        hit = min(len(req.block_hashes) * bs, len(tokens) - 1)
        copies = []
        if hit < len(req.block_hashes) * bs:
            req.block_hashes.pop()  # that block gets rewritten: hash it again once full
            if self.pool.num_free():
                copies.append(alloc.copy_on_write(req.request_id, hit // bs))
            else:  # no room for a private copy: drop the block and recompute it
                self.pool.release(alloc.tables[req.request_id].pop())
                alloc.changed.add(req.request_id)
                hit = len(req.block_hashes) * bs
        req.num_computed = hit
        req.prefix_hit_tokens += hit
        self.prefix_hit_tokens += hit
        return copies

    def reserve(self, req, n_tokens: int) -> None:
        """Give the request slots for its next ``n_tokens`` tokens (OutOfBlocks if short)."""
        new_len = req.num_computed + n_tokens
        rid, bs = req.request_id, self.block_size
        for a in self.allocators:
            if len(a.tables.get(rid, ())) * bs < new_len:
                break
        else:
            return  # the common decode step: its blocks already hold the new token
        need = self.blocks_needed(req, n_tokens)
        if need > self.pool.num_free():
            raise OutOfBlocks(f"request {req.request_id} needs {need} blocks, {self.pool.num_free()} free")
        for a in self.allocators:
            have = len(a.block_table(req.request_id))
            missing = -(-new_len // self.block_size) - have
            if missing > 0:
                a.allocate_blocks(missing, req.request_id, req.num_computed)

    def try_reserve(self, req, n_tokens: int) -> bool:
        """``reserve``, False instead of OutOfBlocks (nothing reserved then)."""
        try:
            self.reserve(req, n_tokens)
        except OutOfBlocks:
            return False
        return True

    def commit(self, req) -> None:
        """After a step computed K/V up to ``req.num_computed``: hash newly full blocks into
        the prefix cache and trim sliding rings."""
        for a in self.sliding_allocators:
            a.trim(req.request_id, req.num_computed)
        bs = self.block_size
        if not self.prefix_caching or len(req.block_hashes) >= req.num_computed // bs:
            return  # nothing to hash (the usual decode step: no block filled up)
        table = self.allocators[0].block_table(req.request_id)
        for logical in range(len(req.block_hashes), req.num_computed // bs):
            parent = req.block_hashes[-1] if req.block_hashes else None
            chunk = req.tokens[logical * bs:(logical + 1) * bs]
            h = self.pool.hash_fn(parent, chunk)
            req.block_hashes.append(h)
            self.pool.register(table[logical], h, parent, chunk)

    def release(self, req) -> None:
        self.free_blocks(req.request_id)
        req.block_hashes.clear()

    def fork(self, parent, child) -> Optional[list[tuple[int, int]]]:
        """``child`` (a fresh request with the parent's prompt: num_return_sequences) takes
        over what ``parent`` has computed: full-attention blocks shared by reference count,
        a partly written last block and sliding rings copied. Returns the (src, dst) copies,
        or None (nothing changed) when the pool lacks the blocks for them."""
        n = parent.num_computed
        if sum(a.fork_cost(parent.request_id, n) for a in self.allocators) > self.pool.num_free():
            return None
        copies = []
        for a in self.allocators:
            copies += a.fork(parent.request_id, child.request_id, n)
        child.num_computed = n
        child.block_hashes = list(parent.block_hashes)
        return copies

    def apply_copies(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate blocks src -> dst in every layer."""
        if not copies:
            return
        from ..ops import copy_blocks

        mapping = torch.tensor(copies, dtype=torch.int64, device=self.kv.device)
        for layer in range(self.num_layers):
            copy_blocks(self.kv[layer, 0], self.kv[layer, 1], mapping)
