"""The GPU-only part of tensor parallelism: NCCL collectives inside CUDA graphs.

Decode steps replay captured graphs whose forward holds the model's NCCL all-reduces;
prefills (and a capture's warm-up) run them eagerly. NCCL by default lets captured and
eager collectives of one communicator overlap, at a cost on every launch;
``NCCL_GRAPH_MIXING_SUPPORT=0`` (set before the process group starts) drops that cost, but then
an eager collective must not be issued while a replayed graph's is outstanding, and stream
order is not enough. With the variable at 0, ``keep_graphs_and_eager_apart`` makes an eager
forward or a capture that follows a replay wait for the device first: one synchronization
per switch from decodes to a prefill, none between decodes.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Optional

MIXING_ENV = "NCCL_GRAPH_MIXING_SUPPORT"


def prepare(runner, sync: Optional[Callable[[], None]] = None) -> None:
    """For a tensor-parallel runner with decode graphs: warn while NCCL's graph mixing is on
    (slower), else keep replays and eager collectives apart."""
    if runner.graphs is None or not runner.graphs.capture:
        return
    if os.environ.get(MIXING_ENV) != "0":
        warnings.warn(f"tensor parallel with CUDA graphs: {MIXING_ENV}=0 in the environment before the process "
                      "group starts makes every collective launch cheaper (docs/distributed.md)", RuntimeWarning,
                      stacklevel=4)
        return
    keep_graphs_and_eager_apart(runner, sync)


def keep_graphs_and_eager_apart(runner, sync: Optional[Callable[[], None]] = None) -> None:
    """Wrap ``runner._eager`` and ``runner.graphs.run``: after a replay, the next eager
    forward or capture first waits for the device (``sync``, default the current stream)."""
    import torch

    if sync is None:
        sync = torch.cuda.current_stream(runner.device).synchronize
    graphs = runner.graphs
    eager, run = runner._eager, graphs.run
    replayed = [False]

    def settle() -> None:
        if replayed[0]:
            sync()
            replayed[0] = False

    def eager_after_replays(*args, **kwargs):
        settle()
        return eager(*args, **kwargs)

    def run_after_replays(requests, bucket):
        if bucket not in graphs.graphs:  # about to capture: its warm-up runs eagerly
            settle()
        logits = run(requests, bucket)
        replayed[0] = replayed[0] or logits is not None
        return logits

    runner._eager, graphs.run = eager_after_replays, run_after_replays
