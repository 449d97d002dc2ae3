"""What every subcommand shares: the one-line usage error and loading a model for a run."""
from __future__ import annotations


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit code 2."""


def load_model_for_cli(model_path=None, device=None, *, allow_pickle: bool = False):
    """``cbkernels.models.load_for_device`` for a command: loading problems (a missing CUDA
    device, an unreadable model) become a one-line ``UsageError``."""
    from ..models import load_for_device

    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available")
    try:
        return load_for_device(model_path, device, allow_pickle=allow_pickle)
    except (ValueError, OSError) as exc:
        raise UsageError(f"cannot load model: {str(exc).splitlines()[0]}") from None
