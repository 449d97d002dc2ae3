"""transformers' continuous-batching API, served by cbkernels, for the models you choose.

``cbkernels.enable(model)`` binds ``model.generate_batch``, ``model.init_continuous_batching``,
``model.continuous_batching_context_manager`` and ``model.destroy_cached_continuous_batching_manager``
to cbkernels with transformers 5.24's signatures and return types: ``generate_batch`` returns a
dict keyed by request id (``req_0``, ``req_1``, ...; with num_return_sequences, a prompt's
``req_i__child#k`` before ``req_i``), the manager has ``add_request(s)``, ``get_result``,
``request_id_iter``, ``cancel_request``, ``start`` / ``stop`` / ``is_running``, ``pause``, and
results are ``GenerationOutput`` objects (a subclass carrying cbkernels' timings too).
``model.generate(..., cache_implementation="paged")``, which transformers routes to
``generate_batch``, then runs on cbkernels as well. ``cbkernels.disable(model)`` removes the
binding. The methods are set on that one model object: nothing in transformers is patched.
"""
from __future__ import annotations

import contextlib
import types
import warnings

from .engine.hf_config import IgnoredSettingWarning, choose_config
from .hf_manager import _CACHED, ContinuousBatchingManager, to_generation_output  # noqa: F401 - re-exported

BOUND = ("generate_batch", "init_continuous_batching", "continuous_batching_context_manager",
         "destroy_cached_continuous_batching_manager")


# ---------------------------------------------------------------- the bound methods
def _hints_warning(workload_hints) -> None:
    if workload_hints is not None:
        warnings.warn(f"workload_hints={workload_hints!r} are ignored by cbkernels: it sizes its cache and batch "
                      "from the configuration", IgnoredSettingWarning, stacklevel=3)


def init_continuous_batching(model, generation_config=None, continuous_batching_config=None, workload_hints=None):
    cached = getattr(model, _CACHED, None)
    if cached is not None:
        return cached
    _hints_warning(workload_hints)
    chosen = choose_config(model, None, continuous_batching_config, generation_config)
    return ContinuousBatchingManager(model, generation_config, chosen, tokenizer=getattr(model, "_cbkernels_tokenizer", None))


@contextlib.contextmanager
def continuous_batching_context_manager(model, generation_config=None, block: bool = True, timeout=None,
                                        continuous_batching_config=None, persistent_manager: bool = False,
                                        warmup: bool = True, workload_hints=None):
    manager = init_continuous_batching(model, generation_config, continuous_batching_config, workload_hints)
    if warmup and not manager.warmed_up:
        manager.warmup()
    manager.start()
    try:
        yield manager
    finally:
        manager.stop(block=block, timeout=timeout, keep_for_next_session=persistent_manager)


def destroy_cached_continuous_batching_manager(model) -> None:
    cached = getattr(model, _CACHED, None)
    if cached is not None:
        cached.destroy()
        delattr(model, _CACHED)


def generate_batch(model, inputs, generation_config=None, continuous_batching_config=None,
                   record_timestamps: bool = False, progress_bar: bool = False, persistent_manager: bool = False,
                   warmup: bool = True, **kwargs) -> dict:
    """transformers' ``generate_batch`` on cbkernels: {request id: GenerationOutput}."""
    if not inputs:
        return {}
    max_new_tokens = kwargs.pop("max_new_tokens", None)
    gc = generation_config if generation_config is not None else model.generation_config
    for key, value in kwargs.items():  # generate(cache_implementation="paged", ...) merged these into gc already
        if getattr(gc, key, object()) != value:
            warnings.warn(f"generate_batch({key}={value!r}) is ignored: pass it in the generation config",
                          IgnoredSettingWarning, stacklevel=2)
    from tqdm import tqdm

    results = {}
    with continuous_batching_context_manager(model, generation_config, True, None, continuous_batching_config,
                                             persistent_manager, warmup) as manager:
        ids = [r for r in manager.add_requests(inputs, max_new_tokens=max_new_tokens,
                                               record_timestamps=record_timestamps) if r is not None]
        family = {rid: manager.families[rid] for rid in ids}
        expected = sum(len(f) for f in family.values())
        with tqdm(total=expected, disable=not progress_bar, desc=f"Solving {expected} requests", unit="request") as bar:
            while len(results) < expected:
                out = manager.get_result(timeout=1)
                if out is not None and out.is_finished():
                    results[out.request_id] = out
                    bar.update(1)
                elif out is None and not manager.is_running():
                    break
    ordered = {}
    for rid in ids:  # transformers' order: a prompt's children, then the prompt's own request
        seq = family.get(rid, [rid])
        for sid in seq[1:] + seq[:1]:
            if sid in results:
                ordered[sid] = results[sid]
    return ordered


def enable(model, *, tokenizer=None):
    """Serve ``model``'s continuous-batching methods with cbkernels (see the module
    docstring); ``tokenizer`` is used for stop strings. Returns the model."""
    for name in BOUND:
        fn = globals()[name]
        setattr(model, name, types.MethodType(fn, model))
    model._cbkernels_tokenizer = tokenizer
    return model


def disable(model):
    """Undo ``enable``: the model's own (transformers') methods are back. Returns the model."""
    if is_enabled(model):
        destroy_cached_continuous_batching_manager(model)
    for name in BOUND:
        bound = model.__dict__.get(name)
        if isinstance(bound, types.MethodType) and bound.__func__ is globals()[name]:
            delattr(model, name)
    model.__dict__.pop("_cbkernels_tokenizer", None)
    return model


def is_enabled(model) -> bool:
    bound = getattr(model, "__dict__", {}).get("generate_batch")
    return isinstance(bound, types.MethodType) and bound.__func__ is generate_batch
