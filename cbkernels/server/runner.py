"""Running the app under uvicorn, with a clean shutdown.

SIGTERM or SIGINT: the server stops accepting connections and new requests (503), gives
the requests in flight ``drain_timeout_s`` to finish, cancels the rest (they end with an
error event / 503), stops the engine and returns 0. A second SIGINT forces the exit.
uvicorn's own signal handling re-raises the signal after shutting down (so the process
would die of it); this runner keeps the handling but exits normally instead.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
import sys
import threading

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, api_key) -> str | None:
    """The loud warning for a server anyone on the network can use, or None."""
    if api_key or is_loopback(host):
        return None
    bar = "!" * 78
    return (f"{bar}\nWARNING: cbkernels serve is listening on {host} WITHOUT an API key: anyone who can reach this\n"
            f"address can run generations on this machine. Pass --api-key KEY (or set CBKERNELS_API_KEY), or\n"
            f"bind to 127.0.0.1.\n{bar}")


def _make_server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn.Server whose signal handlers drain the engine first and do not re-raise."""

        on_stop = None  # called once, in the event loop, when the first signal arrives

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            loop = asyncio.get_running_loop()

            def handle(sig, _frame):
                if self.should_exit:
                    self.force_exit = sig == signal.SIGINT or self.force_exit
                    return
                self.should_exit = True
                if self.on_stop is not None:
                    loop.call_soon_threadsafe(self.on_stop)

            previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server


def run_server(engine, tokenizer, settings, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
               access_log: bool = False) -> int:
    """Serve ``engine`` until SIGTERM / SIGINT; returns the exit code (0 after a clean shutdown)."""
    import uvicorn

    from .app import create_app

    warning = exposure_warning(host, settings.api_key)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    app = create_app(engine, tokenizer, settings)
    state = app.state.server
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=settings.drain_timeout_s + 5.0, server_header=False)
    server = _make_server_class()(config)
    drain_tasks = []
    server.on_stop = lambda: drain_tasks.append(asyncio.ensure_future(state.bridge.drain(settings.drain_timeout_s)))
    server.run()
    return 0 if server.started else 1
