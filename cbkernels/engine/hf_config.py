"""transformers' continuous-batching configuration, translated into the engine's.

``Engine`` and ``generate_batch`` take either a ``BatchConfig`` or transformers'
``ContinuousBatchingConfig`` (transformers 5.24's fields). Every field of the latter is
accounted for (``FIELDS`` below): it sets an engine setting, or it has no counterpart here
and a value other than its default raises an ``IgnoredSettingWarning`` naming it.

Which configuration wins, as transformers 5.24 resolves it (``init_continuous_batching``):

1. the configuration passed explicitly (``continuous_batching_config=`` / ``config=``);
2. else a ``ContinuousBatchingConfig`` carried by the generation config
   (``generation_config.continuous_batching_config``, deprecated since 5.13: FutureWarning);
3. else the loose fields older transformers read off the generation config itself
   (``GenerationConfig(num_blocks=8, block_size=4, scheduler="prefill_first", ...)``, which
   5.24 silently ignores; cbkernels honours them with a FutureWarning);
4. else the defaults.

A lower route that is present while a higher one wins is ignored with a warning naming it.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from .config import BatchConfig
from .scheduler_names import SCHEDULER_NAMES

# "No cap beyond the fraction": max_memory_percent asks for a share of free memory, nothing less.
UNCAPPED_BYTES = 1 << 60
# Loose generation-config names older transformers used for today's ContinuousBatchingConfig fields.
LEGACY_ALIASES = {"block_size": "page_size", "scheduler": "scheduler_type"}


class IgnoredSettingWarning(UserWarning):
    """A transformers setting that cbkernels has no counterpart for: it does not apply."""


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """What a ContinuousBatchingConfig sets beyond ``BatchConfig``."""

    return_logprobs: bool = False  # every request returns log-probabilities of its tokens
    max_queue_size: int = 0  # requests waiting for admission at most (0: no limit)
    per_request_processors: bool = False  # the HF manager's add_request(**kwargs) may set sampling fields
    drop_unsupported_processors: bool = True  # False: a generation field cbkernels lacks is an error


def warn_ignored(name: str, value, why: str) -> None:
    warnings.warn(f"{name}={value!r} is ignored by cbkernels: {why}", IgnoredSettingWarning, stacklevel=4)


# ContinuousBatchingConfig field -> why it does not apply (a value other than the default warns).
_NO_COUNTERPART = {
    "max_blocks_per_request": "it sizes transformers' flash-attn decode path; cbkernels' kernels read block tables "
                              "of any length",
    "use_async_batching": "cbkernels runs steps synchronously (its step sends one packed host-to-device copy)",
    "q_padding_interval_size": "cbkernels pads decode CUDA graphs to its own batch-size buckets",
    "kv_padding_interval_size": "cbkernels' CUDA graphs do not pad the KV length",
    "varlen_compile_config": "cbkernels does not torch.compile the model",
    "decode_compile_config": "cbkernels does not torch.compile the model",
    "default_compile_level": "cbkernels does not torch.compile the model",
    "use_default_compile_configs": "cbkernels does not torch.compile the model",
    "max_cached_graphs": "deprecated in transformers and without effect",
    "safety_margin": "cbkernels admits prefills while blocks are free and preempts the newest request when short",
    "cpu_offload_space": "cbkernels recomputes a preempted request instead of offloading its KV cache",
    "cpu_offload_space_safety_threshold": "cbkernels does not offload the KV cache to the CPU",
    "disable_nccl_graph_mixing": "cbkernels runs on one device (no tensor parallelism)",
    "cpu_group_timeout": "cbkernels runs on one device (no tensor parallelism)",
}
# Settings whose every value cbkernels satisfies: block_size was copied into page_size by
# transformers itself; cbkernels never switches attention to flash (it brings its own).
_SATISFIED = {"block_size", "auto_switch_to_flash"}
_MAPPED = {"page_size", "num_blocks", "max_batch_tokens", "max_memory_percent", "max_requests_per_batch",
           "allow_block_sharing", "scheduler_type", "use_cuda_graph", "seed", "return_logprobs", "max_queue_size",
           "per_request_processors", "drop_unsupported_processors"}
FIELDS = _MAPPED | _SATISFIED | set(_NO_COUNTERPART)


def _cb_class():
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    return ContinuousBatchingConfig


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return torch.device("cpu")


def _cuda_graph(value, device: torch.device) -> Optional[bool]:
    """transformers' use_cuda_graph (None, a bool, or (varlen, decode)) -> the engine's."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or not all(isinstance(v, bool) for v in value):
            raise TypeError(f"continuous_batching_config.use_cuda_graph must be a bool or a (varlen, decode) pair "
                            f"of bools, got {value!r}")
        if value[0]:
            warn_ignored("continuous_batching_config.use_cuda_graph[0]", value[0],
                         "cbkernels captures decode steps only (mixed prefill steps run eagerly)")
        value = value[1]
    if value and device.type != "cuda":  # what transformers does on a machine without graphs
        warn_ignored("continuous_batching_config.use_cuda_graph", value, f"no CUDA graphs on a {device.type} model")
        return False
    return value


def from_continuous_batching_config(cb, device: torch.device) -> tuple[BatchConfig, EngineOptions]:
    """Translate one ContinuousBatchingConfig (see the module docstring)."""
    defaults = {f.name: f.default for f in dataclasses.fields(cb) if f.default is not dataclasses.MISSING}
    for f in dataclasses.fields(cb):
        value = getattr(cb, f.name)
        if f.name in _NO_COUNTERPART and value != defaults.get(f.name):
            if (f.name == "use_async_batching" and value is False) or (f.name == "max_blocks_per_request"
                                                                       and value == 0):
                continue  # asks for what cbkernels does anyway
            warn_ignored(f"continuous_batching_config.{f.name}", value, _NO_COUNTERPART[f.name])
        elif f.name not in FIELDS and value != defaults.get(f.name):
            warn_ignored(f"continuous_batching_config.{f.name}", value, "a field this version of cbkernels does "
                         "not know (newer transformers?)")
    page = cb.page_size
    if isinstance(page, bool) or not isinstance(page, int) or page < 1 or page & (page - 1):
        raise ValueError(f"continuous_batching_config.page_size must be a power of two (cbkernels' block size), "
                         f"got {page!r}")
    if cb.scheduler_type not in SCHEDULER_NAMES:
        raise ValueError(f"continuous_batching_config.scheduler_type must be one of {SCHEDULER_NAMES}, "
                         f"got {cb.scheduler_type!r}")
    kwargs = dict(block_size=page, num_blocks=cb.num_blocks, scheduler=cb.scheduler_type,
                  prefix_caching=bool(cb.allow_block_sharing), seed=cb.seed,
                  use_cuda_graph=_cuda_graph(cb.use_cuda_graph, device))
    if cb.max_batch_tokens is not None:
        kwargs["max_batch_tokens"] = cb.max_batch_tokens
    if cb.max_requests_per_batch is not None:
        kwargs["max_num_seqs"] = cb.max_requests_per_batch
    if cb.max_memory_percent is not None:  # a share of the free memory, as transformers reads it
        kwargs.update(memory_fraction=cb.max_memory_percent, max_cache_bytes=UNCAPPED_BYTES)
    try:
        config = BatchConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"continuous_batching_config: {exc}") from None
    for name in ("return_logprobs", "per_request_processors", "drop_unsupported_processors"):
        if not isinstance(getattr(cb, name), bool):
            raise TypeError(f"continuous_batching_config.{name} must be True or False, got {getattr(cb, name)!r}")
    queue = cb.max_queue_size
    if isinstance(queue, bool) or not isinstance(queue, int) or queue < 0:
        raise ValueError(f"continuous_batching_config.max_queue_size must be an int >= 0, got {queue!r}")
    return config, EngineOptions(return_logprobs=cb.return_logprobs, max_queue_size=queue,
                                 per_request_processors=cb.per_request_processors,
                                 drop_unsupported_processors=cb.drop_unsupported_processors)


def engine_config(model, config) -> tuple[BatchConfig, EngineOptions]:
    """``Engine``'s ``config`` (a BatchConfig, a ContinuousBatchingConfig or None) -> the
    engine's BatchConfig and options."""
    if config is None:
        return BatchConfig(), EngineOptions()
    if isinstance(config, BatchConfig):
        return config, EngineOptions()
    if isinstance(config, _cb_class()):
        return from_continuous_batching_config(config, _model_device(model))
    raise TypeError(f"config must be a cbkernels.BatchConfig, a transformers ContinuousBatchingConfig or None, "
                    f"got {type(config).__name__}")


def _loose_fields(gc) -> dict:
    """ContinuousBatchingConfig fields set loosely on a generation config (the oldest route)."""
    from transformers import GenerationConfig

    own = set(GenerationConfig().__dict__)
    names = {f.name for f in dataclasses.fields(_cb_class())} - {"block_size"}
    found = {}
    for key, value in vars(gc).items():
        if key in own:
            continue
        target = LEGACY_ALIASES.get(key, key)
        if target in names:
            found[target] = value
    return found


def carried_config(generation_config):
    """The continuous-batching settings a generation config carries (routes 2 and 3 of the
    module docstring) as a ContinuousBatchingConfig, or None; each route warns that it is
    deprecated."""
    if generation_config is None:
        return None
    cb_class = _cb_class()
    carried = getattr(generation_config, "continuous_batching_config", None)
    loose = _loose_fields(generation_config)
    if carried is not None:
        if not isinstance(carried, cb_class):
            raise TypeError(f"generation_config.continuous_batching_config must be a ContinuousBatchingConfig, "
                            f"got {type(carried).__name__}")
        warnings.warn("generation_config.continuous_batching_config is deprecated (transformers 5.13): pass it as "
                      "continuous_batching_config=", FutureWarning, stacklevel=3)
        if loose:
            warn_ignored(f"generation_config fields {sorted(loose)}", list(loose.values()),
                         "generation_config.continuous_batching_config takes precedence")
        return carried
    if not loose:
        return None
    warnings.warn(f"continuous-batching fields on a GenerationConfig ({', '.join(sorted(loose))}) are deprecated: "
                  "pass a transformers ContinuousBatchingConfig as continuous_batching_config=",
                  FutureWarning, stacklevel=3)
    return cb_class(**loose)


def choose_config(model, config=None, continuous_batching_config=None, generation_config=None):
    """The one configuration a ``generate_batch`` call runs with (precedence in the module
    docstring): a BatchConfig, a ContinuousBatchingConfig, or None for the defaults."""
    if config is not None and continuous_batching_config is not None:
        raise TypeError("pass config or continuous_batching_config, not both")
    explicit = config if config is not None else continuous_batching_config
    gc = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    if explicit is None:
        return carried_config(gc)
    if gc is not None and (getattr(gc, "continuous_batching_config", None) is not None or _loose_fields(gc)):
        names = sorted(_loose_fields(gc)) + (["continuous_batching_config"]
                                              if getattr(gc, "continuous_batching_config", None) is not None else [])
        warn_ignored(f"generation_config fields {names}", "...", "an explicit configuration was passed")
    return explicit
