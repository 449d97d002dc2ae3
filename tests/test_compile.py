"""torch.compile(fullgraph=True) over the public kernels: no graph breaks, same results as eager.

The ops are torch.library custom ops with fake implementations (cbkernels/ops.py), so dynamo
traces them as single nodes; fullgraph=True turns any graph break into an error.
"""
from __future__ import annotations

import pytest
import torch

import cbkernels
from cbkernels.testing import assert_bits_equal, assert_close, make_paged_batch

# Empty split-KV segments take log2(0) = -inf on purpose; numpy (the interpreter) warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Inductor needs a C++ compiler on CPU (gcc is there); aot_eager checks the same tracing
# (dynamo + AOT autograd functionalisation of the mutating ops) without code generation.
BACKENDS = ("inductor", "aot_eager")


def _step(q, key, value, k_cache, v_cache, slot_mapping, block_tables, seq_lens, cu_seqlens_q, block_mapping):
    """One decode/prefill step of a layer: write new K/V, attend, read the history, copy-on-write."""
    cbkernels.scatter_kv(key, value, k_cache, v_cache, slot_mapping)
    out, lse = cbkernels.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q,
                                         softcap=20.0, return_lse=True, max_seqlen_q=3, max_seqlen_k=40)
    cbkernels.copy_blocks(k_cache, v_cache, block_mapping)
    keys, values, cu_k = cbkernels.gather_kv(k_cache, v_cache, block_tables, seq_lens)
    return out * 2, lse, keys.sum(), values.sum(), cu_k


def _inputs():
    # Sequences (q_len, kv_len): the last q_len rows of each are "new" and scattered this step.
    lengths = [(1, 40), (3, 3), (2, 17)]
    b = make_paged_batch(lengths, num_q_heads=4, num_kv_heads=2, head_dim=64, block_size=16,
                         dtype=torch.float32, device=DEVICE)
    gen = torch.Generator().manual_seed(5)
    slots = []
    for seq, (q_len, kv_len) in enumerate(lengths):
        for pos in range(kv_len - q_len, kv_len):
            slots.append(int(b.block_tables[seq, pos // 16]) * 16 + pos % 16)
    key = torch.randn(len(slots), 2, 64, generator=gen).to(DEVICE)
    value = torch.randn(len(slots), 2, 64, generator=gen).to(DEVICE)
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    # Copy the first block of sequence 0 into the block nobody owns (kept NaN by make_paged_batch).
    used = {int(b.block_tables[s, j]) for s, (_, kv) in enumerate(lengths) for j in range(-(-kv // 16))}
    spare = next(i for i in range(b.k_cache.shape[0]) if i not in used)
    block_mapping = torch.tensor([[int(b.block_tables[0, 0]), spare]], dtype=torch.int64, device=DEVICE)
    return [b.q, key, value, b.k_cache, b.v_cache, slot_mapping, b.block_tables, b.seq_lens,
            b.cu_seqlens_q, block_mapping]


def _clone(args):
    return [a.clone() for a in args]


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_matches_eager_without_graph_breaks(backend):
    torch._dynamo.reset()
    args = _inputs()
    eager_args, compiled_args = _clone(args), _clone(args)
    expected = _step(*eager_args)
    compiled = torch.compile(_step, fullgraph=True, backend=backend)
    result = compiled(*compiled_args)
    assert_close(result[0], expected[0])
    assert_close(result[1], expected[1])
    assert_close(result[2], expected[2])
    assert_close(result[3], expected[3])
    assert torch.equal(result[4], expected[4])
    # The in-place cache writes (scatter_kv, copy_blocks) happened exactly as in eager.
    assert_bits_equal(compiled_args[3], eager_args[3])
    assert_bits_equal(compiled_args[4], eager_args[4])


def test_compiled_paged_attention_has_one_graph():
    torch._dynamo.reset()
    args = _inputs()
    q, k_cache, v_cache, block_tables, seq_lens, cu = args[0], args[3], args[4], args[6], args[7], args[8]

    def attend(q, k_cache, v_cache, block_tables, seq_lens, cu):
        return cbkernels.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, cu, sliding_window=8)

    explanation = torch._dynamo.explain(attend)(q, k_cache, v_cache, block_tables, seq_lens, cu)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
