"""``--tp N`` for ``cbkernels generate`` and ``cbkernels serve``: one process per rank under
``torchrun --nproc-per-node N -m cbkernels ... --tp N``. Every rank loads its shard of the
model (transformers' ``DistributedConfig(tp_size=N)``) and builds the engine; rank 0 takes the
prompts or serves HTTP and prints, the other ranks follow its steps until it stops.
"""
from __future__ import annotations

import os

from .common import UsageError


def add_argument(p) -> None:
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallel over N processes: launch with torchrun --nproc-per-node N -m cbkernels "
                        "... --tp N (rank 0 prints / serves HTTP; docs/distributed.md)")


def check(args) -> None:
    if args.tp < 1:
        raise UsageError(f"--tp must be positive, got {args.tp}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.tp > 1 and world != args.tp:
        raise UsageError(f"--tp {args.tp} needs one process per rank: launch with torchrun --nproc-per-node "
                         f"{args.tp} -m cbkernels ... (this process group has {world})")


def load(args):
    """(model, tokenizer, device): this rank's shard of the model, fp32 on CPU, bf16 on CUDA."""
    import torch
    from transformers.distributed import DistributedConfig

    from ..models import load_default_model, load_model

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    kwargs = dict(dtype=dtype, distributed_config=DistributedConfig(tp_size=args.tp))
    try:
        if args.model is None:
            model, tok = load_default_model(**kwargs)
        else:
            model, tok = load_model(args.model, allow_pickle=args.allow_pickle, **kwargs)
    except (ValueError, OSError) as exc:
        raise UsageError(f"cannot load model: {str(exc).splitlines()[0]}") from None
    return model, tok, device


def make_engine(model, config, tokenizer):
    """The engine (with the tokenizer on every rank: stop strings are rebuilt on each); a
    tensor-parallel size that cannot shard the model is a UsageError."""
    from ..engine import Engine

    try:
        return Engine(model, config, tokenizer=tokenizer)
    except ValueError as exc:
        if "tensor parallel" in str(exc):
            raise UsageError(str(exc)) from None
        raise


def follow_and_exit(engine) -> int:
    """A rank other than 0: run rank 0's steps until it stops, then leave the group. SIGINT
    and SIGTERM (torchrun forwards them to every rank) are left to rank 0, which drains its
    requests and then stops the others."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    engine.stop()
    finish()
    return 0


def leads(engine) -> bool:
    from ..engine.distributed import is_rank0

    return is_rank0(engine)


def finish() -> None:
    """Leave the process group (every rank, at the end of the command)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
