"""Attention for engine steps: step metadata, one backend per implementation, and the
registration of ``attn_implementation="cbkernels"`` with transformers."""
