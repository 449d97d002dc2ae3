"""Workloads shared by the engine benchmarks: prompts, models, and one timed engine run."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..prompts import DEFAULT_PROMPTS

# Chat prompts of mixed lengths: 16 of them span about 31-119 tokens with the chat template.
BENCH_PROMPTS: list[str] = DEFAULT_PROMPTS + [
    "List five animals that live in the ocean.",
    "Translate 'good morning' into Spanish, French and German.",
    "Describe the water cycle for a ten-year-old, step by step, in a short numbered list.",
    "What are the main differences between a cat and a dog as pets? Consider care, cost, space and time.",
    "Write a short email to a colleague asking to move tomorrow's meeting to Friday afternoon.",
    "Explain what a hash table is and why lookups are fast on average.",
    "Suggest a name for a bakery that sells only bread made with old grains, and explain the choice.",
    "Why do leaves change colour in autumn? Mention chlorophyll and carotenoids.",
]


@dataclass
class RunResult:
    wall_s: float
    generated: int
    outputs: list
    metrics: dict

    @property
    def tokens_per_s(self) -> float:
        return self.generated / self.wall_s if self.wall_s else 0.0


def encode_prompts(tokenizer, prompts=BENCH_PROMPTS) -> list[list[int]]:
    from ..prompts import encode

    return [encode(tokenizer, p) for p in prompts]


def tiny_llama(vocab: int = 512, layers: int = 2, seed: int = 0):
    """A random-weight Llama small enough to run thousands of requests on a CPU."""
    from ..testing import tiny_llama as build

    return build(vocab=vocab, layers=layers, max_positions=4096, seed=seed)


# Llama-3-8B layer shapes (hidden 4096, 32 query / 8 KV heads of 128, MLP 14336, vocab 128256):
# a GPU benchmark model that needs no download; only the layer count is cut.
LLAMA3_8B_SHAPES = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                        vocab_size=128256, max_position_embeddings=8192)


def llama_shaped(layers: int, dtype=torch.bfloat16, device="cuda", seed: int = 0):
    """A random-weight model with Llama-3-8B layer shapes and ``layers`` layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(num_hidden_layers=layers, eos_token_id=None, bos_token_id=None, pad_token_id=0,
                      **LLAMA3_8B_SHAPES)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.set_attn_implementation("sdpa")
    return model.eval()


def random_prompts(n: int, vocab: int, low: int = 32, high: int = 512, seed: int = 0) -> list[list[int]]:
    """Token-id prompts of uniformly drawn lengths, for models without a tokenizer."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(low, high + 1, (n,), generator=gen).tolist()
    return [torch.randint(1, vocab, (k,), generator=gen).tolist() for k in lens]


def run_engine(model, prompts: list[list[int]], generation_config, config) -> RunResult:
    """One timed ``Engine.generate`` (the engine's construction excluded)."""
    from ..engine import Engine

    engine = Engine(model, config)
    start = time.perf_counter()
    outputs = engine.generate(prompts, generation_config)
    wall = time.perf_counter() - start
    return RunResult(wall, sum(len(o.generated_tokens) for o in outputs), outputs, engine.metrics())
