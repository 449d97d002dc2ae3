"""transformers' configuration honoured: every ContinuousBatchingConfig field sets the engine's
effective configuration or warns by name; the deprecated routes through a GenerationConfig
follow transformers 5.24's precedence with deprecation warnings; generation configs resolve
as model.generate() resolves them (the model's eos / max_length / min_length included), on
several architectures, stopping point included."""
import dataclasses
import queue
import warnings

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import CompileConfig, ContinuousBatchingConfig

import cbkernels
from cbkernels import BatchConfig, Engine, PrefillFirstScheduler
from cbkernels.engine import hf_config
from cbkernels.engine.hf_config import IgnoredSettingWarning, UNCAPPED_BYTES, choose_config
from cbkernels.testing import tiny_llama, tiny_model, token_prompts

VOCAB = 96


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(vocab=VOCAB)


def _ignored(record, name):
    return [w for w in record if issubclass(w.category, IgnoredSettingWarning) and name in str(w.message)]


def _engine(model, cb):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        engine = Engine(model, cb)
    return engine, record


# ------------------------------------------------------------------ field by field
def _gen(max_new=3, **kw):
    kw.setdefault("do_sample", False)
    return GenerationConfig(max_new_tokens=max_new, pad_token_id=0, **kw)


MAPPED = {  # field -> (value, check of the engine it configures)
    "page_size": (8, lambda e: e.config.block_size == 8 and e.cache.block_size == 8),
    "block_size": (4, lambda e: e.config.block_size == 4 and e.cache.block_size == 4),  # transformers' old name
    "num_blocks": (12, lambda e: e.config.num_blocks == 12 and e.cache.num_blocks == 12),
    "max_batch_tokens": (24, lambda e: e.config.max_batch_tokens == 24 and e.scheduler.max_batch_tokens == 24),
    "max_memory_percent": (0.05, lambda e: e.config.memory_fraction == 0.05 and e.config.max_cache_bytes == UNCAPPED_BYTES),
    "max_requests_per_batch": (5, lambda e: e.config.max_num_seqs == 5 and e.scheduler.max_num_seqs == 5),
    "allow_block_sharing": (False, lambda e: e.config.prefix_caching is False and e.cache.prefix_caching is False),
    "scheduler_type": ("prefill_first", lambda e: isinstance(e.scheduler, PrefillFirstScheduler)),
    "use_cuda_graph": (False, lambda e: e.config.use_cuda_graph is False and e.runner.graphs is None),
    "seed": (7, lambda e: e.generator is not None and e.generator.initial_seed() == 7),
    "return_logprobs": (True, lambda e: e.options.return_logprobs
                        and len(e.generate([[1, 2, 3]], _gen())[0].logprobs) == 3),
    "max_queue_size": (2, lambda e: e.options.max_queue_size == 2 and _queue_limit(e, 2)),
    "per_request_processors": (True, lambda e: e.options.per_request_processors),
    "drop_unsupported_processors": (False, lambda e: _strict(e)),
    "auto_switch_to_flash": (False, lambda e: e.generate([[1, 2]], _gen())[0].error is None),  # never switches
}
WARNED = {  # field -> a non-default value cbkernels has no counterpart for
    "max_blocks_per_request": 8, "use_async_batching": True, "q_padding_interval_size": 32,
    "kv_padding_interval_size": 64, "varlen_compile_config": CompileConfig(), "decode_compile_config": CompileConfig(),
    "default_compile_level": 1, "use_default_compile_configs": True, "max_cached_graphs": 4, "safety_margin": 0.2,
    "cpu_offload_space": 1.0, "cpu_offload_space_safety_threshold": 0.5, "disable_nccl_graph_mixing": False,
    "cpu_group_timeout": 10.0,
}


def _queue_limit(engine, limit):
    for _ in range(limit):
        engine.add_request([1, 2], _gen())
    with pytest.raises(queue.Full, match="max_queue_size"):
        engine.add_request([1, 2], _gen())
    return True


def _strict(engine):
    with pytest.raises(ValueError, match="typical_p"):
        engine.generate([[1, 2]], _gen(typical_p=0.5, do_sample=True))
    return not engine.options.drop_unsupported_processors


def test_every_field_of_transformers_config_is_accounted_for():
    fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    assert set(MAPPED) | set(WARNED) == fields == hf_config.FIELDS
    assert not set(MAPPED) & set(WARNED)


@pytest.mark.parametrize("field", sorted(MAPPED))
def test_mapped_field_sets_the_effective_configuration(llama, field):
    value, check = MAPPED[field]
    engine, record = _engine(llama, ContinuousBatchingConfig(**{field: value}))
    assert not [w for w in record if issubclass(w.category, IgnoredSettingWarning)]
    assert check(engine)


@pytest.mark.parametrize("field", sorted(WARNED))
def test_field_without_counterpart_warns_by_name(llama, field):
    engine, record = _engine(llama, ContinuousBatchingConfig(**{field: WARNED[field]}))
    assert _ignored(record, f"continuous_batching_config.{field}")
    assert engine.generate([[1, 2, 3]], _gen())[0].error is None  # and the engine runs


def test_defaults_translate_silently_to_transformers_defaults(llama):
    engine, record = _engine(llama, ContinuousBatchingConfig())
    assert not [w for w in record if issubclass(w.category, IgnoredSettingWarning)]
    assert engine.config.block_size == 256 and engine.config.scheduler == "fifo" and engine.config.prefix_caching


def test_cuda_graphs_asked_for_on_cpu_are_turned_off_with_a_warning(llama):
    engine, record = _engine(llama, ContinuousBatchingConfig(use_cuda_graph=True))
    assert _ignored(record, "use_cuda_graph") and engine.runner.graphs is None
    engine, record = _engine(llama, ContinuousBatchingConfig(use_cuda_graph=(True, False)))
    assert _ignored(record, "use_cuda_graph[0]") and engine.config.use_cuda_graph is False


@pytest.mark.parametrize("field, value, error", [
    ("page_size", 100, ValueError), ("scheduler_type", "lifo", ValueError), ("max_queue_size", -1, ValueError),
    ("return_logprobs", "yes", TypeError), ("num_blocks", 0, ValueError), ("max_batch_tokens", 2.5, TypeError),
])
def test_bad_values_raise_naming_the_field(llama, field, value, error):
    with pytest.raises(error, match=field):
        Engine(llama, ContinuousBatchingConfig(**{field: value}))


def test_engine_rejects_other_config_types(llama):
    with pytest.raises(TypeError, match="config must be"):
        Engine(llama, {"num_blocks": 8})


# ------------------------------------------------------------------ the deprecated routes
LEGACY = dict(num_blocks=8, max_batch_tokens=32, block_size=4, use_cuda_graph=True, scheduler="prefill_first")


def test_loose_generation_config_fields_are_honoured_with_a_deprecation_warning(llama):
    gc = _gen(**LEGACY)
    with pytest.warns(FutureWarning, match="num_blocks"):
        chosen = choose_config(llama, generation_config=gc)
    assert isinstance(chosen, ContinuousBatchingConfig)
    engine, record = _engine(llama, chosen)
    assert (engine.config.num_blocks, engine.config.max_batch_tokens, engine.config.block_size) == (8, 32, 4)
    assert isinstance(engine.scheduler, PrefillFirstScheduler)
    assert engine.config.use_cuda_graph is False and _ignored(record, "use_cuda_graph")  # no graphs on a CPU


def test_generate_batch_runs_the_legacy_fields_and_matches_generate(llama):
    prompts = token_prompts((3, 9, 17), vocab=VOCAB)
    gc = _gen(max_new=5, **LEGACY)
    with pytest.warns(FutureWarning, match="deprecated"):
        outs = cbkernels.generate_batch(llama, prompts, gc)
    ref = [llama.generate(torch.tensor([p]), generation_config=_gen(max_new=5))[0, len(p):].tolist() for p in prompts]
    assert [o.generated_tokens for o in outs] == ref


def test_carried_config_wins_over_loose_fields_and_warns(llama):
    gc = _gen(num_blocks=8)
    gc.continuous_batching_config = ContinuousBatchingConfig(num_blocks=16, page_size=8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        chosen = choose_config(llama, generation_config=gc)
    assert chosen.num_blocks == 16
    assert any(issubclass(w.category, FutureWarning) and "continuous_batching_config" in str(w.message) for w in record)
    assert _ignored(record, "num_blocks")


def test_explicit_config_wins_and_the_carried_ones_are_named(llama):
    gc = _gen(num_blocks=8)
    gc.continuous_batching_config = ContinuousBatchingConfig(num_blocks=16)
    explicit = ContinuousBatchingConfig(num_blocks=24, page_size=8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert choose_config(llama, None, explicit, gc) is explicit
        assert choose_config(llama, BatchConfig(num_blocks=4), None, gc).num_blocks == 4
    assert len(_ignored(record, "continuous_batching_config")) == 2 and _ignored(record, "num_blocks")
    with pytest.raises(TypeError, match="not both"):
        choose_config(llama, BatchConfig(), explicit, gc)
    assert choose_config(llama, generation_config=_gen()) is None  # nothing carried: defaults


def test_model_generation_config_is_the_fallback_carrier(llama, monkeypatch):
    own = _gen(num_blocks=6)
    monkeypatch.setattr(llama, "generation_config", own)
    with pytest.warns(FutureWarning):
        assert choose_config(llama).num_blocks == 6


def test_batch_config_still_works_positionally(llama):
    outs = cbkernels.generate_batch(llama, [[1, 2, 3]], _gen(), BatchConfig(backend="torch", num_blocks=9))
    assert outs[0].error is None and len(outs[0].generated_tokens) == 3


# ------------------------------------------------------------------ generation semantics
ARCHS = {"llama": 5, "qwen2": 7, "gpt_oss": 9, "glm": 9, "helium": 2, "gemma2": 4}


def _stop_index(tokens, target):
    """The first position >= target whose token is new there (so EOS = that token stops
    exactly after it), else the last such position before target."""
    new = [i for i, t in enumerate(tokens) if t not in tokens[:i]]
    return next((i for i in new if i >= target), new[-1])


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_eos_from_the_model_generation_config_stops_like_generate(arch):
    model = tiny_model(arch)
    prompt = [5, 9, 17, 33, 2, 7, 8]
    with torch.no_grad():
        free = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):].tolist()
    stop = _stop_index(free, ARCHS[arch])
    model.generation_config.eos_token_id = free[stop]  # only the model knows its EOS
    for gc in (GenerationConfig(max_new_tokens=20), None):  # an eos-less config, and none at all
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), generation_config=gc)[0, len(prompt):].tolist()
        out = Engine(model, BatchConfig(backend="torch", block_size=4)).generate([prompt], gc)[0]
        assert out.generated_tokens == ref
        assert len(ref) == stop + 1 and out.finish_reason == "eos"


def test_length_rules_follow_generate(monkeypatch):
    model = tiny_llama(vocab=VOCAB, max_positions=64)
    prompts = token_prompts((3, 9, 60), vocab=VOCAB)
    configs = [GenerationConfig(max_length=15), GenerationConfig(), GenerationConfig(max_length=30, max_new_tokens=4),
               GenerationConfig(min_new_tokens=2, max_new_tokens=4)]
    def reference(p, gc=None):
        try:
            return model.generate(torch.tensor([p]), generation_config=gc)[0, len(p):].tolist()
        except ValueError:  # generate() refuses a prompt as long as max_length
            return None

    lengths = []
    for gc in configs:  # max_length counts the prompt; an unset one is 20 new tokens capped at 64 positions
        ref = [reference(p, gc) for p in prompts]
        outs = Engine(model, BatchConfig(backend="torch")).generate(prompts, gc)
        assert [o.generated_tokens if o.error is None else None for o in outs] == ref, gc
        lengths.append([None if r is None else len(r) for r in ref])
    assert lengths == [[12, 6, None], [20, 20, 4], [4, 4, 4], [4, 4, 4]]  # 60 >= max_length 15: FAILED
    assert "max_length" in Engine(model, BatchConfig(backend="torch")).generate(prompts[2:], configs[0])[0].error
    monkeypatch.setattr(model.generation_config, "max_length", 12)  # the model's own max_length
    ref = [reference(p) for p in prompts[:2]]
    outs = Engine(model, BatchConfig(backend="torch")).generate(prompts[:2], GenerationConfig())
    assert [o.generated_tokens for o in outs] == ref and [len(r) for r in ref] == [9, 3]
    assert Engine(model, BatchConfig(backend="torch")).generate(prompts[2:], GenerationConfig())[0].error is not None


def test_unimplemented_generation_fields_warn_by_name(llama):
    engine = Engine(llama, BatchConfig(backend="torch"))
    for kwargs, name in ((dict(typical_p=0.5, do_sample=True), "typical_p"), (dict(output_scores=True), "output_scores"),
                         (dict(num_beams=2), "num_beams"), (dict(my_setting=3), "my_setting"),
                         (dict(use_cache=False), "use_cache")):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            out = engine.generate([[1, 2, 3]], _gen(**kwargs))[0]
        assert _ignored(record, f"generation_config.{name}") and out.error is None
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        engine.generate([[1, 2, 3]], _gen(repetition_penalty=1.2, top_k=5, min_p=0.1, cache_implementation="paged"))
    assert not [w for w in record if issubclass(w.category, IgnoredSettingWarning)]


@pytest.mark.parametrize("kwargs, name", [
    (dict(suppress_tokens=[VOCAB]), "suppress_tokens"), (dict(bad_words_ids=[[1, -2]]), "bad_words_ids"),
    (dict(forced_eos_token_id=500), "forced_eos_token_id"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(min_p=1.5), "min_p"), (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    (dict(stop_strings=["x"]), "stop_strings"),  # no tokenizer given
])
def test_bad_generation_fields_raise_naming_them(llama, kwargs, name):
    gc = _gen()
    for key, value in kwargs.items():
        setattr(gc, key, value)  # past GenerationConfig's own checks
    with pytest.raises((TypeError, ValueError), match=name):
        Engine(llama, BatchConfig(backend="torch")).generate([[1, 2, 3]], gc)


def test_stop_strings_stop_like_generate():
    from cbkernels.models import cached_default_model

    model, tok = cached_default_model()
    prompt = tok("The capital of France is", add_special_tokens=False)["input_ids"]
    free = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    text = tok.decode(free)
    stop = text[len(tok.decode(free[:3])):][:4]  # four characters starting at the fourth token
    gc = GenerationConfig(max_new_tokens=12, do_sample=False, stop_strings=[stop], eos_token_id=None)
    ref = model.generate(torch.tensor([prompt]), generation_config=gc, tokenizer=tok)[0, len(prompt):].tolist()
    out = Engine(model, BatchConfig(backend="torch"), tokenizer=tok).generate([prompt], gc)[0]
    assert out.generated_tokens == ref and len(ref) < len(free) and out.finish_reason == "stop"
    assert stop in tok.decode(out.generated_tokens)
