"""Tensor parallelism as transformers sets it up: how many ranks share the model, which of
them this process is, and how many attention heads each one holds.

A model loaded under ``torchrun`` with ``from_pretrained(..., distributed_config=
DistributedConfig(tp_size=N))`` carries its device mesh (``model._device_mesh``), its
tensor-parallel size (``model._tp_size``) and its sharding plan (``model.tp_plan``): the query,
key and value projections are split column-wise, so each rank computes ``heads / N`` query
heads and ``kv_heads / N`` key/value heads, and its paged cache holds only those.

Reading the layout needs no communication; ``agree_min`` is the one collective here (the
cache's block count, so every rank allocates and preempts alike).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .model_config import text_config


@dataclass(frozen=True)
class TPLayout:
    size: int  # ranks sharing the model (1: not tensor parallel)
    rank: int  # this process's place in the tensor-parallel group
    q_heads: int  # query heads this rank computes
    kv_heads: int  # key/value heads this rank computes and caches
    group: Any = None  # the tensor-parallel torch.distributed process group (None when size is 1)

    @property
    def is_parallel(self) -> bool:
        return self.size > 1


def tp_size_of(model) -> int:
    """The model's tensor-parallel size (1 for a model loaded without a DistributedConfig)."""
    size = getattr(model, "_tp_size", None)
    return int(size) if size else 1


def _sharded(plan: dict, suffix: str) -> bool:
    return any(key.endswith(suffix) for key in plan)


def describe(model, q_heads: Optional[int] = None, kv_heads: Optional[int] = None) -> TPLayout:
    """The layout of ``model`` on this rank. A tensor-parallel model without a plan for its
    attention projections, or whose size does not divide its query or key/value heads, is a
    ValueError naming the numbers (transformers loads such a model, then fails in its first
    forward with a reshape error)."""
    mc = text_config(model)
    q_heads = q_heads or mc.num_attention_heads
    kv_heads = kv_heads or getattr(mc, "num_key_value_heads", None) or q_heads
    size = tp_size_of(model)
    if size == 1:
        return TPLayout(1, 0, q_heads, kv_heads)
    plan = dict(getattr(model, "tp_plan", None) or {})
    if not (_sharded(plan, "q_proj") and _sharded(plan, "k_proj") and _sharded(plan, "v_proj")):
        raise ValueError(f"tensor parallel size {size}: the model ({type(model).__name__}) has no tensor-parallel "
                         f"plan for its q_proj / k_proj / v_proj (its plan: {sorted(plan) or 'empty'}); cbkernels "
                         "shards the paged cache by the attention heads the plan splits")
    for what, heads in (("query", q_heads), ("key/value", kv_heads)):
        if heads % size:
            raise ValueError(f"tensor parallel size {size} does not divide the model's {heads} {what} heads "
                             f"({q_heads} query, {kv_heads} key/value): use a tp_size that divides both")
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ValueError(f"tensor parallel size {size} but torch.distributed is not initialized: launch with "
                         "torchrun and load the model with from_pretrained(..., distributed_config=...)")
    mesh = model._device_mesh
    names = getattr(mesh, "mesh_dim_names", None)
    tp_mesh = mesh["tp"] if names and "tp" in names else mesh
    return TPLayout(size, tp_mesh.get_local_rank(), q_heads // size, kv_heads // size, tp_mesh.get_group())


def agree_min(layout: TPLayout, value: int) -> int:
    """The smallest ``value`` over the tensor-parallel group (every rank must call this)."""
    if not layout.is_parallel:
        return value
    import torch.distributed as dist

    device = torch.device("cpu")
    if dist.get_backend(layout.group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=layout.group)
    return int(t.item())
