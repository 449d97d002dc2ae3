"""A ``GenerationConfig`` resolved the way ``model.generate()`` resolves it.

``GenerationSpec(model, generation_config)`` merges the passed config with the model's own
``generation_config`` and transformers' global defaults through the model's
``_prepare_generation_config`` (the path ``generate()`` takes), so an unset ``eos_token_id``,
``max_length`` or ``min_length`` comes from the model as it does for ``generate()``. Per
prompt, ``params(prompt_len)`` applies generate()'s length rules: ``max_new_tokens`` wins
over ``max_length``; a ``max_length`` nobody set is 20 new tokens capped by the model's
``max_position_embeddings``; ``min_new_tokens`` wins over ``min_length``.

Every field is accounted for: the engine honours it (``HONOURED``), it cannot matter for
token-id prompts on a decoder-only model (``INERT``), or a value other than generate()'s
default raises an ``IgnoredSettingWarning`` naming it (a ValueError when the caller asks
for strictness, as transformers' ``drop_unsupported_processors=False`` does).
"""
from __future__ import annotations

import copy
import dataclasses
import warnings
from typing import Optional

import torch

from .hf_config import IgnoredSettingWarning, LEGACY_ALIASES
from .inputs import check_generation_config, check_generation_tokens
from .requests import SamplingParams

HONOURED = frozenset({
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "eos_token_id", "do_sample", "temperature",
    "top_k", "top_p", "min_p", "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens",
    "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id", "stop_strings", "num_return_sequences",
})
# bos/pad only matter when generate() builds or pads input ids; the prompts here are token ids,
# one per request, never padded. use_cache=True and num_beams=1 are what the engine does.
INERT = frozenset({"bos_token_id", "pad_token_id", "transformers_version", "continuous_batching_config"})
_DEFAULT_VALUES = {"use_cache": True, "num_beams": 1}


def _global_defaults() -> dict:
    from transformers import GenerationConfig

    return GenerationConfig._get_default_generation_params()


def merge_with_model(model, generation_config):
    """``generation_config`` (None: an empty one) completed by the model's generation config
    and transformers' global defaults, through the model's ``_prepare_generation_config``
    when it has one (any GenerationMixin model), else the same two ``update`` calls."""
    from transformers import GenerationConfig

    # A max_new_tokens <= 0 fails each request with a reason (inputs.prompt_problem) rather than
    # the whole call, so it is kept out of transformers' validation and put back afterwards.
    held = None
    if generation_config is not None and isinstance(generation_config.max_new_tokens, int) \
            and generation_config.max_new_tokens <= 0:
        held, generation_config = generation_config.max_new_tokens, copy.deepcopy(generation_config)
        generation_config.max_new_tokens = None
    prepare = getattr(model, "_prepare_generation_config", None)
    if callable(prepare):
        merged = prepare(generation_config)[0]
    else:
        merged = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
        own = getattr(model, "generation_config", None)
        if own is not None:
            merged.update(**own.to_dict(), defaults_only=True, allow_custom_entries=True)
        merged.update(**_global_defaults(), defaults_only=True)
    if held is not None:
        merged.max_new_tokens = held
    return merged


def unsupported_fields(gc) -> dict:
    """Fields of a merged config that are set to something cbkernels does not do."""
    from transformers import GenerationConfig

    defaults = {**_global_defaults(), **_DEFAULT_VALUES}
    known = set(GenerationConfig().__dict__)
    cb_names = {"page_size", "num_blocks", "max_batch_tokens", "max_memory_percent", "max_requests_per_batch",
                "use_cuda_graph", "scheduler_type", *LEGACY_ALIASES}  # read by hf_config.carried_config
    found = {}
    for key, value in vars(gc).items():
        if key.startswith("_") or key in HONOURED or key in INERT:
            continue
        if key not in known:  # a custom entry: a legacy CB field is dealt with elsewhere
            if key not in cb_names:
                found[key] = value
            continue
        default = defaults.get(key)
        if key == "cache_implementation" and value == "paged":  # "continuous batching": what runs here
            continue
        if value != default and not (default is None and value in (None, False)):  # None / False: off
            found[key] = value
    return found


def _stop_check(tokenizer, stop_strings):
    from transformers.generation.stopping_criteria import StopStringCriteria

    criteria = StopStringCriteria(tokenizer, stop_strings)
    width = criteria.maximum_token_len

    def ends_with_stop_string(tokens: list[int]) -> bool:
        return bool(criteria(torch.tensor([tokens[-width:]], dtype=torch.int64), None)[0])

    return ends_with_stop_string


class GenerationSpec:
    """A generation config resolved for a model, before its prompts are known. Raises
    TypeError / ValueError naming the field for a malformed config."""

    def __init__(self, model, generation_config=None, *, tokenizer=None, strict: bool = False,
                 vocab_size: Optional[int] = None, return_logprobs: bool = False, top_logprobs: int = 0):
        if generation_config is not None:
            check_generation_config(generation_config)
        own = getattr(model, "generation_config", None)
        self.has_default_max_length = ((generation_config is None or generation_config.max_length is None)
                                       and (own is None or own.max_length is None))
        gc = merge_with_model(model, generation_config)
        check_generation_config(gc)
        check_generation_tokens(gc, vocab_size)
        self.config = gc
        self.max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        unsupported = unsupported_fields(gc)
        if unsupported and strict:
            raise ValueError(f"generation_config sets fields cbkernels does not implement: {unsupported} "
                             "(drop_unsupported_processors=False)")
        for key, value in unsupported.items():
            warnings.warn(f"generation_config.{key}={value!r} is ignored by cbkernels: it does not implement it",
                          IgnoredSettingWarning, stacklevel=4)
        stop = None
        if gc.stop_strings:
            if tokenizer is None:
                raise ValueError("generation_config.stop_strings needs a tokenizer: pass tokenizer=... (as "
                                 "model.generate() does)")
            stop = _stop_check(tokenizer, gc.stop_strings)
        self._base = SamplingParams.from_generation_config(gc, stop_check=stop, return_logprobs=bool(return_logprobs),
                                                           top_logprobs=int(top_logprobs))

    @property
    def num_return_sequences(self) -> int:
        return self._base.num_return_sequences

    def params(self, prompt_len: int) -> SamplingParams:
        """The request's settings for a prompt of ``prompt_len`` tokens (generate()'s length
        rules; see the module docstring). max_new_tokens may come out <= 0: the request then
        fails with that reason."""
        gc = self.config
        if gc.max_new_tokens is not None:
            max_new = gc.max_new_tokens
        elif self.has_default_max_length:
            total = gc.max_length + prompt_len
            if self.max_positions is not None:
                total = min(total, self.max_positions)
            max_new = total - prompt_len
        else:
            max_new = gc.max_length - prompt_len
        min_new = gc.min_new_tokens if gc.min_new_tokens is not None else max(0, (gc.min_length or 0) - prompt_len)
        return dataclasses.replace(self._base, max_new_tokens=int(max_new), min_new_tokens=int(min_new))
