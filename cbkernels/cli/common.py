"""What every subcommand shares: the one-line usage error and loading a model for a run."""
from __future__ import annotations


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit code 2."""


def load_model_for_cli(model_path=None, device=None, *, allow_pickle: bool = False):
    """(model, tokenizer, device) for a command: the embedded SmolLM2 when ``model_path`` is
    None, else a local directory or .gguf file; fp32 on CPU, bf16 on CUDA. ``device`` None
    picks CUDA when available. Loading problems become a ``UsageError``."""
    import torch

    from ..models import load_default_model, load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    try:
        if model_path is None:
            model, tok = load_default_model(dtype=dtype)
        else:
            model, tok = load_model(model_path, dtype=dtype, allow_pickle=allow_pickle)
    except (ValueError, OSError) as exc:
        raise UsageError(f"cannot load model: {str(exc).splitlines()[0]}") from None
    return model.to(device), tok, device
