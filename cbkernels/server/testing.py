"""Helpers for tests and benchmarks of the server: an in-process uvicorn on a free loopback
port, a server as a separate process, a private copy of the default model (the server keeps
its model on the paged attention while it runs, so a test session's shared model is left
untouched), and the engine's own greedy output to compare with."""
from __future__ import annotations

import copy
import functools
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

# Chat questions the server tests send.
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "How do I boil an egg?",
             "Name three planets.", "Why is the sky blue?", "What is 12 times 7?", "Give a tip for Python.",
             "Summarise Romeo and Juliet."]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """An HTTP server started as a process (``argv``), its output in ``log_path``."""

    def __init__(self, argv, port: int, log_path, env):
        self.url, self.log_path = f"http://127.0.0.1:{port}", Path(log_path)
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout_s: float = 600.0):
        """None once ``/health`` answers 200, else why not (the process exited, or time ran out)."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
                return f"exited with code {self.proc.returncode}: {' | '.join(tail)}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return None
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        return f"no answer on /health within {timeout_s:.0f} s"

    def stop(self, timeout_s: float = 60.0):
        """SIGTERM, then the exit code (None if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = None
        self.log.close()
        return code


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


@contextmanager
def served_model(*, num_blocks: int, max_batch_tokens: int, max_num_seqs: int, **settings):
    """The server's app on a private copy of the default model, in a ``ServerThread``:
    ``settings`` are ``ServerSettings`` fields (model_name, api_key, max_waiting, ...). The
    engine runs the PyTorch backend (a test session sets TRITON_INTERPRET=1, and interpreted
    kernels would take minutes); the thread carries ``engine``, ``tokenizer`` and ``model``."""
    from cbkernels import BatchConfig, Engine

    from .app import ServerSettings, create_app

    model, tok = serving_model()
    engine = Engine(model, BatchConfig(num_blocks=num_blocks, block_size=16, max_batch_tokens=max_batch_tokens,
                                       max_num_seqs=max_num_seqs, backend="torch"))
    with ServerThread(create_app(engine, tok, ServerSettings(**settings))) as srv:
        srv.engine, srv.tokenizer, srv.model = engine, tok, model
        yield srv


def chat_ids(tokenizer, question: str) -> list[int]:
    """Token ids of one user message through the chat template, as the server builds them."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def engine_greedy(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """The engine's own greedy tokens for these prompts (``cbkernels.generate_batch`` on the
    process-wide default model, EOS as the server sets it)."""
    return [out.generated_tokens for out in engine_outputs(prompts, max_new_tokens)]


def engine_outputs(prompts: list[list[int]], max_new_tokens: int, *, top_logprobs=None) -> list:
    """The engine's own greedy ``RequestOutput`` for these prompts; with ``top_logprobs``
    (an int), with the log-probabilities of every token and its alternatives."""
    import cbkernels
    from cbkernels.models import cached_default_model
    from transformers import GenerationConfig

    model, tokenizer = cached_default_model()
    gc = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=[tokenizer.eos_token_id],
                          pad_token_id=tokenizer.eos_token_id)
    config = cbkernels.BatchConfig(num_blocks=256, block_size=16, backend="torch")
    extra = {} if top_logprobs is None else {"return_logprobs": True, "top_logprobs": top_logprobs}
    return cbkernels.generate_batch(model, prompts, gc, config, **extra)
