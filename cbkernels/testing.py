"""Test utilities: one per-dtype tolerance table, one ``assert_close``, and builders of
poisoned, fragmented paged caches that make any stray read visible as NaN.

Public so that downstream users can check their own kernels the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Largest element-wise error accepted against a float64 reference, used as both atol and rtol.
# fp32: accumulation-order noise only. fp16: ~10 ulps at 1.0 (ulp 2**-10 ~ 1e-3).
# bf16: ~4 ulps at 1.0 (ulp 2**-7 ~ 7.8e-3); also covers the interpreter's bf16 emulation
# (docs/verification.md: tolerance >= 1.6e-2).
TOLERANCES: dict[torch.dtype, float] = {
    torch.float32: 2e-3,
    torch.float16: 1e-2,
    torch.bfloat16: 3e-2,
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Compare in float64 with the tolerance of ``dtype`` (default: ``actual.dtype``); NaN never passes."""
    dtype = actual.dtype if dtype is None else dtype
    if torch.isnan(actual).any():
        raise AssertionError(f"result holds {int(torch.isnan(actual).sum())} NaN values")
    tol = TOLERANCES.get(dtype, 0.0)
    torch.testing.assert_close(actual.double(), expected.double(), atol=tol, rtol=tol)


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-for-bit equality (NaN payloads included): for copies, which must be exact."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != {expected.dtype}"
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
    a, e = actual.contiguous().view(width), expected.contiguous().view(width)
    if not torch.equal(a, e):
        diff = int((a != e).sum())
        raise AssertionError(f"{diff} of {a.numel()} elements differ bitwise")


@dataclass
class PagedBatch:
    """A random mixed batch laid out in a paged cache, ready for the attention kernels."""

    q: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    max_seqlen_q: int
    max_seqlen_k: int


def make_paged_batch(
    lengths: list[tuple[int, int]],
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    shared_prefix_blocks: int = 0,
    seed: int = 0,
) -> PagedBatch:
    """Build a poisoned, shuffled paged cache holding ``lengths`` = [(q_len, kv_len), ...].

    * every slot no sequence owns is NaN, and one physical block is never used;
    * physical blocks are a random permutation, so tables are fragmented and unordered;
    * block-table entries past each sequence's last block hold garbage (-1, huge, or valid
      ids of other sequences' blocks);
    * with ``shared_prefix_blocks = n``, every sequence long enough to cover ``n`` full
      blocks points its first ``n`` entries at the same physical blocks (prefix sharing).
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [math.ceil(kv / block_size) for _, kv in lengths]
    shared = shared_prefix_blocks
    own = [max(n - shared, 0) if kv >= shared * block_size and shared else n
           for n, (_, kv) in zip(blocks_needed, lengths)]
    num_blocks = sum(own) + shared + 1  # +1: a block nobody owns, kept full of NaN
    perm = torch.randperm(num_blocks, generator=gen)
    shared_ids, cursor = perm[:shared].tolist(), shared
    max_blocks = max(blocks_needed + [1]) + 2  # room for garbage past the last entry
    tables = torch.randint(-5, num_blocks * 4, (len(lengths), max_blocks), generator=gen)
    tables[tables.abs() % 3 == 0] = -1
    for b, ((_, kv), n, n_own) in enumerate(zip(lengths, blocks_needed, own)):
        prefix = shared_ids if n_own != n else []
        ids = prefix + perm[cursor:cursor + n_own].tolist()
        cursor += n_own
        tables[b, :n] = torch.tensor(ids[:n], dtype=tables.dtype)

    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    written: set[int] = set()
    for b, (_, kv) in enumerate(lengths):
        for pos in range(kv):
            block = int(tables[b, pos // block_size])
            slot = block * block_size + pos % block_size
            if slot in written:  # a shared prefix block: its owner already wrote it
                continue
            written.add(slot)
            k_cache[block, pos % block_size] = torch.randn(num_kv_heads, head_dim, generator=gen).to(dtype)
            v_cache[block, pos % block_size] = torch.randn(num_kv_heads, head_dim, generator=gen).to(dtype)

    q_lens = [q for q, _ in lengths]
    total_q = sum(q_lens)
    q = torch.randn(total_q, num_q_heads, head_dim, generator=gen).to(dtype)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(q_lens, dtype=torch.int64), 0)
    seq_lens = torch.tensor([kv for _, kv in lengths], dtype=torch.int32)
    return PagedBatch(
        q=q.to(device), k_cache=k_cache.to(device), v_cache=v_cache.to(device),
        block_tables=tables.to(torch.int32).to(device), seq_lens=seq_lens.to(device),
        cu_seqlens_q=cu.to(device), max_seqlen_q=max(q_lens + [0]),
        max_seqlen_k=max([kv for _, kv in lengths] + [0]),
    )


def tiny_llama(*, vocab: int = 96, hidden: int = 64, heads: int = 4, kv_heads: int = 2, layers: int = 2,
               max_positions: int = 256, seed: int = 0, device: str | torch.device = "cpu"):
    """A random-weight LlamaForCausalLM small enough for engine tests (no EOS, pad id 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                      eos_token_id=None, bos_token_id=None, pad_token_id=0)
    return LlamaForCausalLM(cfg).to(device).eval()


def tiny_sliding_qwen2(*, vocab: int = 96, window: int = 10, max_positions: int = 256, seed: int = 0):
    """A random-weight Qwen2 with one full-attention layer and two sliding-window layers."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      eos_token_id=None, bos_token_id=None, pad_token_id=0,
                      use_sliding_window=True, sliding_window=window, max_window_layers=1,
                      layer_types=["full_attention", "sliding_attention", "sliding_attention"])
    model = Qwen2ForCausalLM(cfg).eval()
    model.set_attn_implementation("sdpa")
    return model


def token_prompts(lengths, *, vocab: int, seed: int = 1) -> list[list[int]]:
    """Random token-id prompts of the given lengths (ids 1..vocab-1; 0 is the pad id)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in lengths]


def assert_pool_accounting(cache) -> None:
    """Every block's reference count equals the number of request tables that own it (every
    entry of a full-attention table; a sliding ring's held entries), and the free list plus
    the evictable cached blocks are exactly the unreferenced blocks, each listed once."""
    pool = cache.pool
    owners = [0] * pool.num_blocks
    for alloc in cache.allocators:
        held = getattr(alloc, "held", None)
        for rid, table in alloc.tables.items():
            logical = held[rid] if held is not None else range(len(table))
            for lg in logical:
                owners[table[lg]] += 1
    assert pool.ref_counts == owners, f"ref counts {pool.ref_counts} != owners {owners}"
    free = list(pool.free_ids) + list(pool.evictable)
    assert len(free) == len(set(free)), "a block is listed free twice"
    assert set(free) == {b for b, n in enumerate(owners) if n == 0}
    assert set(pool.evictable) <= set(pool.block_to_hash) and not set(pool.free_ids) & set(pool.block_to_hash)


def reference_tokens(model, prompts, generation_config) -> list[list[int]]:
    """What ``model.generate()`` produces for each prompt alone: the engines' ground truth."""
    with torch.no_grad():
        return [model.generate(torch.tensor([p], device=model.device), generation_config=generation_config)[0, len(p):]
                .tolist() for p in prompts]


def tiny_model(model_type: str, seed: int = 0):
    """A random-weight 2-layer causal LM of any transformers architecture (vocab 128, hidden 64,
    4 query / 2 KV heads of 16), pad id 0, bos 1 and no eos in its config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, head_dim=16,
                               pad_token_id=0, bos_token_id=1, eos_token_id=None)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()
