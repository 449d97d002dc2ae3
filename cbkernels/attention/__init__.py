"""Attention for engine steps, one module per concern:

* ``metadata``: the step's host plan (``StepPlan``) and device metadata (``StepMetadata``);
* ``backend``: the two-verb interface (``build`` a step's metadata, ``attend`` one layer);
* ``torch_backend`` / ``triton_backend``: the implementations; ``registry``: names -> classes;
* ``integration``: ``attn_implementation="cbkernels"`` registered with transformers.

Kept import-light: ``import cbkernels`` loads only ``integration`` (no torch).
"""
