"""The continuous-batching engine: requests, cache, scheduler, model runner, serving loop.

A step reads schedule -> run -> postprocess: ``scheduler.schedule()`` picks the requests and
token counts, ``ModelRunner.run`` does one packed forward and samples, and
``scheduler.postprocess`` moves every request on (tokens, states, finished requests).
"""
from .config import BatchConfig
from .engine import Engine, generate_batch

__all__ = ["BatchConfig", "Engine", "generate_batch"]
