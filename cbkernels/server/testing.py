"""Helpers for tests of the server: an in-process uvicorn on a free loopback port, and a
private copy of the default model for it (the server keeps its model on the paged attention
while it runs, so a test session's shared model is left untouched)."""
from __future__ import annotations

import copy
import functools
import socket
import threading
import time


@functools.lru_cache(maxsize=1)
def serving_model():
    """(model, tokenizer): a deep copy of the process-wide default model, loaded once."""
    from cbkernels.models import cached_default_model

    model, tokenizer = cached_default_model()
    return copy.deepcopy(model), tokenizer


class ServerThread:
    """Runs an ASGI app under uvicorn in a background thread on 127.0.0.1 (a port the OS
    picks, bound before the thread starts); a context manager that waits for start-up and
    shuts the server down (lifespan included) on exit."""

    def __init__(self, app, *, startup_timeout_s: float = 120.0, graceful_s: float = 5.0):
        import uvicorn

        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=graceful_s)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True,
                                        name="cbkernels-test-server")
        self._startup_timeout_s = startup_timeout_s

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + self._startup_timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=60)
        self._sock.close()


def chat_ids(tokenizer, question: str) -> list[int]:
    """Token ids of one user message through the chat template, as the server builds them."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def engine_greedy(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """The engine's own greedy tokens for these prompts (``cbkernels.generate_batch`` on the
    process-wide default model, EOS as the server sets it)."""
    import cbkernels
    from cbkernels.models import cached_default_model
    from transformers import GenerationConfig

    model, tokenizer = cached_default_model()
    gc = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=[tokenizer.eos_token_id],
                          pad_token_id=tokenizer.eos_token_id)
    config = cbkernels.BatchConfig(num_blocks=256, block_size=16, backend="torch")
    return [out.generated_tokens for out in cbkernels.generate_batch(model, prompts, gc, config)]
