"""transformers integration: ``attn_implementation="cbkernels"``.

``cbkernels_attention`` is registered with transformers' ``AttentionInterface``. Called by
an engine step (paged metadata in the ``cbkernels_metadata`` kwarg) it scatters the layer's
new K/V into the paged cache and attends with ``paged_attention``; called without it (plain
``model.generate()``, a training forward) it is exact dense causal attention through
transformers' own ``sdpa_attention_forward``, with sdpa's mask builder registered under the
same name so padded batches stay correct.

transformers' own ``model.generate_batch`` cannot run on these kernels: its continuous
batching accepts only the names ``"sdpa"``, ``"paged|eager"`` or a name containing
``"flash"`` (generation/continuous_batching/continuous_api.py), and "flash" names load a
flash-attn package or Hub kernel and call ``flash_attn_varlen_func`` /
``flash_attn_with_kvcache`` resolved inside transformers. Its cache also hands the
attention function a gathered contiguous KV copy (``read_index``) rather than block tables,
except on a CUDA-only flash decode path. Serving it would mean patching those internals,
which this package does not do; use ``cbkernels.Engine`` / ``cbkernels.generate_batch``.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

import torch

from ..ops import torch_path as _torch_ops
from ..engine.model_runner import METADATA_KWARG

NAME = "cbkernels"
_registered = False


def cbkernels_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                        scaling=None, **kwargs):
    meta = kwargs.get(METADATA_KWARG)
    if meta is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    layer = module.layer_idx
    meta.layers_seen += 1
    cache = meta.cache
    group = meta.groups[cache.group_of_layer[layer]]
    k_cache, v_cache = cache.layer_cache(layer)
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    softcap = kwargs.get("softcap")
    sinks = getattr(module, "sinks", None)
    window = group.sliding_window if group.sliding_window is not None else kwargs.get("sliding_window")
    new_k, new_v = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [T, Hkv, D]
    if meta.backend == "torch":  # slots come from the engine: no validation, no sync
        if meta.padded:  # padding rows of a decode bucket hold slot -1: skip them
            _torch_ops.scatter_kv(new_k, new_v, k_cache, v_cache, group.slot_mapping)
        else:
            row_shape = k_cache.shape[2:]
            k_cache.view(-1, *row_shape).index_copy_(0, group.slot_mapping, new_k)
            v_cache.view(-1, *row_shape).index_copy_(0, group.slot_mapping, new_v)
        if softcap is None and sinks is None:
            return _torch_ops.engine_attention(query, key, value, k_cache, v_cache, meta, group, scale=scale), None
        q = query[0].transpose(0, 1)
        out = torch.empty_like(q)
        _torch_ops.paged_attention(q, k_cache, v_cache, group.block_tables, meta.seq_lens, meta.cu_seqlens_q,
                                   out, None, scale=scale, sliding_window=window, softcap=softcap, sinks=sinks)
        return out.unsqueeze(0), None
    # The engine built (and its tests check) this metadata: the unvalidated ops skip the
    # per-layer value checks, which would cost device-to-host syncs on CUDA.
    from ..ops import _paged_attention_op, _scatter_kv_op

    _scatter_kv_op(new_k.contiguous(), new_v.contiguous(), k_cache, v_cache, group.slot_mapping)
    q = query[0].transpose(0, 1).contiguous()  # [T, Hq, D]
    out = torch.empty_like(q)
    _paged_attention_op(q, k_cache, v_cache, group.block_tables, meta.seq_lens, meta.cu_seqlens_q, out, None,
                        scale, window, None if softcap is None else float(softcap), sinks,
                        meta.max_seqlen_q, meta.max_seqlen_k)
    return out.unsqueeze(0), None


def register() -> None:
    """Make ``attn_implementation="cbkernels"`` available in transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, cbkernels_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


# transformers.modeling_utils (where AttentionInterface lives) takes seconds to import, so
# ``import cbkernels`` does not import it: ``register_on_import`` registers right away when
# transformers is already loaded, else the moment transformers loads that module.
_TRIGGER = "transformers.modeling_utils"


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TRIGGER:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            register()

        spec.loader.exec_module = exec_then_register
        return spec


def register_on_import() -> None:
    if _TRIGGER in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
