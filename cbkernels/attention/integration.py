"""transformers integration: ``attn_implementation="cbkernels"``.

``cbkernels_attention`` is registered with transformers' ``AttentionInterface``. Called by
an engine step (the step's metadata and backend in the forward kwargs, see
``cbkernels.attention.metadata``) it hands the layer to that backend, which writes the new
K/V into the paged cache and attends over it; called without them (plain
``model.generate()``, a training forward) it is exact dense causal attention through
transformers' own ``sdpa_attention_forward``, with sdpa's mask builder registered under the
same name so padded batches stay correct.

transformers' own ``model.generate_batch`` cannot run on these kernels: its continuous
batching accepts only the names ``"sdpa"``, ``"paged|eager"`` or a name containing
``"flash"`` (generation/continuous_batching/continuous_api.py), and "flash" names load a
flash-attn package or Hub kernel and call ``flash_attn_varlen_func`` /
``flash_attn_with_kvcache`` resolved inside transformers. Its cache also hands the
attention function a gathered contiguous KV copy (``read_index``) rather than block tables,
except on a CUDA-only flash decode path. Serving it would mean patching those internals,
which this package does not do; use ``cbkernels.Engine`` / ``cbkernels.generate_batch``.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

NAME = "cbkernels"
# Forward kwargs of a paged step: transformers passes unknown kwargs through to the attention
# function, which is how the step's metadata and its backend reach every layer.
METADATA_KWARG = "cbkernels_metadata"
BACKEND_KWARG = "cbkernels_backend"
_registered = False


def cbkernels_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                        scaling=None, **kwargs):
    """transformers' attention-function signature. With a step in the kwargs, the step's
    backend runs it; without one, dense causal attention through transformers' SDPA path."""
    meta = kwargs.get(METADATA_KWARG)
    if meta is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    backend = kwargs[BACKEND_KWARG]
    out = backend.attend(module, query, key, value, meta, scaling=scaling, softcap=kwargs.get("softcap"),
                         sliding_window=kwargs.get("sliding_window"))
    return out, None


class AttentionSwitch:
    """Switches one model to ``attn_implementation="cbkernels"`` while an engine runs and
    back to what it had before (``activate`` is idempotent; ``restore`` only undoes its own)."""

    def __init__(self, model):
        self.model = model
        self.saved: str | None = None

    def activate(self) -> None:
        current = self.model.config._attn_implementation
        if self.saved is None and current != NAME:
            self.saved = current
            self.model.set_attn_implementation(NAME)

    def restore(self) -> None:
        if self.saved is not None:
            self.model.set_attn_implementation(self.saved)
            self.saved = None


def register() -> None:
    """Make ``attn_implementation="cbkernels"`` available in transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, cbkernels_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    _registered = True


# transformers.modeling_utils (where AttentionInterface lives) takes seconds to import, so
# ``import cbkernels`` does not import it: ``register_on_import`` registers right away when
# transformers is already loaded, else the moment transformers loads that module.
_TRIGGER = "transformers.modeling_utils"


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TRIGGER:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            register()

        spec.loader.exec_module = exec_then_register
        return spec


def register_on_import() -> None:
    if _TRIGGER in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
