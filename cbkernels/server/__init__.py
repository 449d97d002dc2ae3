"""``cbkernels serve``: an OpenAI-compatible HTTP server on one ``cbkernels.Engine``.

Modules: ``app`` (FastAPI routes and life cycle), ``protocol`` (request parsing and checks),
``schemas`` (response bodies, Server-Sent Events), ``generation`` (engine events to answers,
stop strings, disconnects), ``bridge`` (event loop <-> engine threads, admission),
``text`` (incremental decoding, stop matching), ``metrics`` (Prometheus), ``auth`` (API key,
body size, HTTP counters), ``errors`` (the error object), ``runner`` (uvicorn, signals).
Needs the optional extra ``cbkernels[serve]`` (FastAPI, uvicorn, prometheus_client).
"""
from __future__ import annotations


def __getattr__(name):  # lazy: importing the package does not import FastAPI
    if name in ("create_app", "ServerSettings"):
        from . import app

        return getattr(app, name)
    if name in ("run_server",):
        from . import runner

        return getattr(runner, name)
    raise AttributeError(name)


__all__ = ["create_app", "ServerSettings", "run_server"]
