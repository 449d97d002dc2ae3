"""Replicas across machines: the ``cbkernels serve`` HTTP server as a Ray Serve deployment.

    pip install 'cbkernels[ray]'
    serve run cbkernels.ray_app:app                                    # one replica, embedded SmolLM2
    serve run cbkernels.ray_app:app model=/models/m num_replicas=4 num_gpus=1

Each replica is one process holding the model and one ``Engine`` (its own KV cache and
continuous batching), serving the same OpenAI-compatible routes as ``cbkernels serve``;
Ray Serve's HTTP proxy spreads requests over the replicas and replaces a replica that
dies (the requests that were in flight on it fail; clients retry them). Every response names
the replica that served it in the ``x-cbkernels-replica`` header.

``app(args)`` is an application builder: ``serve run`` passes the ``key=value`` arguments
(all strings), a Python caller passes a dict. Keys: ``model`` (a local directory or .gguf
file; default the embedded SmolLM2), ``device``, ``num_replicas`` (default 1), ``num_gpus``
per replica (default 0; 1 on a GPU cluster), ``num_cpus`` per replica (default 1),
``served_model_name``, ``api_key``, ``num_blocks``, ``block_size``, ``max_batch_tokens``,
``max_num_seqs``, ``max_queue``, ``threads``. An unknown key is a ValueError naming it.
Tensor parallelism inside a replica is not offered here (see docs/distributed.md).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

REPLICA_HEADER = "x-cbkernels-replica"
_INTS = ("num_replicas", "num_blocks", "block_size", "max_batch_tokens", "max_num_seqs", "max_queue", "threads")
_FLOATS = ("num_gpus", "num_cpus")
_STRINGS = ("model", "device", "served_model_name", "api_key")


def parse_args(args: Optional[dict]) -> dict:
    """The builder's arguments, typed and checked (ValueError / TypeError naming the key)."""
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise TypeError(f"args must be a dict of options, got {type(args).__name__}")
    unknown = sorted(set(args) - set(_INTS + _FLOATS + _STRINGS))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; known: {sorted(_INTS + _FLOATS + _STRINGS)}")
    out: dict = {}
    for key, value in args.items():
        if key in _INTS:
            try:
                out[key] = int(value)
            except (TypeError, ValueError):
                raise ValueError(f"{key} must be an integer, got {value!r}") from None
            if out[key] < (0 if key == "max_queue" else 1):
                raise ValueError(f"{key} must be positive, got {value!r}")
        elif key in _FLOATS:
            try:
                out[key] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{key} must be a number, got {value!r}") from None
            if out[key] < 0:
                raise ValueError(f"{key} must be >= 0, got {value!r}")
        else:
            out[key] = str(value)
    if out.get("device") not in (None, "cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {out['device']!r}")
    if "model" in out and not Path(out["model"]).exists():
        raise ValueError(f"model: no such file or directory: {out['model']}")
    return out


class Replica:
    """One replica: the model, its engine, and the server's ASGI app around them."""

    def __init__(self, options: dict):
        import torch

        from .engine import BatchConfig, Engine
        from .models import load_for_device
        from .server.app import ServerSettings, create_app

        if options.get("threads"):
            torch.set_num_threads(options["threads"])
        model, tokenizer, _device = load_for_device(options.get("model"), options.get("device"))
        config = BatchConfig(**{k: options[k] for k in ("num_blocks", "block_size", "max_batch_tokens", "max_num_seqs")
                                if k in options})
        self.engine = Engine(model, config)
        name = options.get("served_model_name") or (
            Path(options["model"]).name if options.get("model") else ServerSettings.model_name)
        settings = ServerSettings(model_name=name, api_key=options.get("api_key"),
                                  max_waiting=options.get("max_queue", ServerSettings.max_waiting))
        self.asgi = create_app(self.engine, tokenizer, settings)
        self.asgi.middleware("http")(_name_replica(_replica_id()))

    def __serve_build_asgi_app__(self):
        return self.asgi


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a Ray replica (tests of the class itself)
        import os

        return f"pid-{os.getpid()}"


def _name_replica(replica: str):
    async def name_replica(request, call_next):
        response = await call_next(request)
        response.headers[REPLICA_HEADER] = replica
        return response

    return name_replica


def app(args: Optional[dict] = None):
    """The Ray Serve application (``serve run cbkernels.ray_app:app key=value ...``)."""
    options = parse_args(args)
    try:
        from ray import serve
    except ImportError:
        raise ImportError("the Ray Serve deployment needs the 'ray' extra: pip install 'cbkernels[ray]'") from None
    actor_options = {"num_cpus": options.get("num_cpus", 1.0), "num_gpus": options.get("num_gpus", 0.0)}
    deployment = serve.deployment(serve.ingress()(Replica), name="cbkernels",
                                  num_replicas=options.get("num_replicas", 1), ray_actor_options=actor_options)
    return deployment.bind(options)
