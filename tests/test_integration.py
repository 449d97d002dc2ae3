"""attn_implementation="cbkernels" inside transformers, without an engine step."""
import torch
from transformers import AttentionInterface, GenerationConfig, LlamaConfig, LlamaForCausalLM

import cbkernels
from cbkernels import BatchConfig, Engine
from cbkernels.attention.integration import cbkernels_attention


def _model(attn):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=80, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, eos_token_id=None, bos_token_id=None,
                      pad_token_id=0)
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attn).eval()


def test_register_is_idempotent():
    cbkernels.register()
    cbkernels.register()
    assert AttentionInterface()["cbkernels"] is cbkernels_attention


def test_dense_fallback_matches_sdpa_forward_and_padded_generate():
    ours, ref = _model("cbkernels"), _model("sdpa")
    assert ours.config._attn_implementation == "cbkernels"
    ids = torch.randint(1, 80, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits)
        gc = GenerationConfig(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(ours.generate(ids, attention_mask=mask, generation_config=gc),
                           ref.generate(ids, attention_mask=mask, generation_config=gc))
    # training forward: loss and gradients flow through the dense path
    ours.train()
    loss = ours(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and ours.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_engine_switches_and_restores_attention():
    model = _model("eager")
    gc = GenerationConfig(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    prompt = [5, 6, 7, 8, 9]
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), generation_config=gc)[0, 5:].tolist()
    out = Engine(model, BatchConfig(backend="torch")).generate([prompt], gc)
    assert out[0].generated_tokens == ref
    assert model.config._attn_implementation == "eager"


def test_import_is_cheap_and_registers_when_transformers_loads():
    import subprocess
    import sys

    code = ("import sys, cbkernels, cbkernels.attention.integration; assert 'transformers.modeling_utils' not in sys.modules; "
            "from transformers import AttentionInterface; "
            "assert AttentionInterface._global_mapping['cbkernels'] is cbkernels.attention.integration.cbkernels_attention")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")
