"""The continuous-batching engine: requests, cache, scheduler, model runner, serving loop.

A step reads schedule -> run -> postprocess: ``Scheduler.schedule()`` picks the requests and
token counts, ``ModelRunner.launch`` does one packed forward and samples, and
``Scheduler.postprocess`` moves every request on (tokens, states, finished requests).

The names below load on first use, so importing a light module of this package (such as
``scheduler_names``) does not import torch.
"""
from __future__ import annotations

import importlib

_LAZY = {"BatchConfig": ".config", "Engine": ".engine", "generate_batch": ".engine"}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
