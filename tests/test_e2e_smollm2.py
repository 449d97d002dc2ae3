"""End to end on SmolLM2-135M-Instruct (offline GGUF), fp32, greedy: the engine's tokens are
identical to transformers' generate() run one prompt at a time, under every scheduling mode.

conftest sets TRITON_INTERPRET=1 without CUDA, so the normal runs force the fast PyTorch path
(BatchConfig(backend="torch")); one short run goes through the interpreted Triton kernels.
"""
import copy

import pytest
import torch
from transformers import GenerationConfig

from cbkernels import BatchConfig, Engine

pytest.importorskip("gguf")
MAX_NEW = 12
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in simple terms for a curious child who wants to know how plants eat.",
    "Hi!",
    "List three prime numbers.",
    "What is 2+2?",
    "Tell me a short story about a robot who learns to paint, with a twist at the end.",
    "Translate 'good morning' into Spanish.",
    "Give me one tip for writing clean Python code.",
]
SYSTEM = "You are a concise assistant. Answer in one short sentence, and never use lists or markdown."


@pytest.fixture(scope="module")
def model_and_tok():
    try:
        from cbkernels.models import cached_default_model

        return cached_default_model(torch.float32)
    except ValueError as e:
        pytest.skip(str(e))


def _ids(tok, messages):
    out = tok.apply_chat_template(messages, add_generation_prompt=True)
    return list(out if isinstance(out, list) else out["input_ids"])


@pytest.fixture(scope="module")
def gc(model_and_tok):
    tok = model_and_tok[1]
    return GenerationConfig(max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.eos_token_id)


def _reference(model, prompts, gc):
    with torch.no_grad():
        return [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               generation_config=gc)[0, len(p):].tolist() for p in prompts]


@pytest.fixture(scope="module")
def prompts(model_and_tok):
    tok = model_and_tok[1]
    return [_ids(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def reference(model_and_tok, prompts, gc):
    return _reference(model_and_tok[0], prompts, gc)


@pytest.mark.parametrize("kw", [
    pytest.param(dict(), id="default"),
    pytest.param(dict(max_batch_tokens=20), id="split-prefill"),
    pytest.param(dict(num_blocks=10, block_size=16), id="preemption"),
    pytest.param(dict(scheduler="prefill_first", max_batch_tokens=64), id="prefill-first"),
])
def test_tokens_identical_to_generate(model_and_tok, prompts, reference, gc, kw):
    model = model_and_tok[0]
    engine = Engine(model, BatchConfig(backend="torch", **kw))
    outs = engine.generate(prompts, gc)
    assert [o.error for o in outs] == [None] * len(prompts)
    assert [o.generated_tokens for o in outs] == reference
    assert engine.cache.get_num_free_blocks() == engine.cache.num_blocks
    if "num_blocks" in kw:
        assert engine.metrics()["preemptions"] > 0
    if "max_batch_tokens" in kw and kw["max_batch_tokens"] < max(map(len, prompts)):
        assert engine.metrics()["steps"] > MAX_NEW + 2  # prompts really were split


def test_shared_system_prompt_prefix_cache(model_and_tok, gc):
    model, tok = model_and_tok
    shared = [_ids(tok, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
              for q in QUESTIONS[:6]]
    engine = Engine(model, BatchConfig(backend="torch", scheduler="prefill_first", max_num_seqs=2))
    outs = engine.generate(shared, gc)
    assert [o.generated_tokens for o in outs] == _reference(model, shared, gc)
    assert engine.metrics()["prefix_hit_rate"] > 0.2
    assert sum(o.prefix_hit_tokens > 0 for o in outs) >= 4
    assert engine.cache.get_num_free_blocks() == engine.cache.num_blocks


def test_interpreted_triton_kernels(model_and_tok, prompts):
    """Two short prompts through the Triton kernels (interpreted on CPU), on the model cut to
    two layers to keep the interpreter's time in budget."""
    from transformers import AutoModelForCausalLM

    full = model_and_tok[0]
    cfg = copy.deepcopy(full.config)
    cfg.num_hidden_layers = 2
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:2]
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").eval()
    model.load_state_dict(full.state_dict(), strict=False)  # layers 2.. of the full model are unused
    gc = GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    short = [prompts[3][-12:], prompts[5][-9:]]
    ref = _reference(model, short, gc)
    engine = Engine(model, BatchConfig(backend="triton", block_size=16, max_batch_tokens=16))
    outs = engine.generate(short, gc)
    assert [o.generated_tokens for o in outs] == ref
    assert engine.cache.get_num_free_blocks() == engine.cache.num_blocks
