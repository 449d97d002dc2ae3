"""The FastAPI application: routes, request checks, and the engine's life cycle.

``create_app(engine, tokenizer, settings)`` serves one ``cbkernels.Engine`` (its own serving
loop, started and stopped with the app). Routes: ``POST /v1/chat/completions``,
``POST /v1/completions`` (whole or streamed), ``GET /v1/models``, ``GET /health``,
``GET /metrics``. Every refusal is an OpenAI-style error object (``errors.py``).
"""
from __future__ import annotations

import asyncio
import math
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol, schemas
from .auth import GateMiddleware, read_body
from .bridge import EngineBridge, LogprobRequest
from .errors import APIError, bad_request, error_body
from .generation import ClientGone, EventStream, choice_texts, collect, completion_tokens, sse_stream, until_disconnect
from .logprobs import ChoiceLogprobs, TokenTexts
from .metrics import ServerMetrics

ATTENTION = "cbkernels"
# Prompts up to this many characters are tokenised on the event loop (well under a millisecond
# for a chat turn: cheaper than two thread hops); longer ones on a worker thread.
INLINE_TOKENIZE_CHARS = 4096


@dataclass
class ServerSettings:
    model_name: str = "SmolLM2-135M-Instruct"
    api_key: Optional[str] = None
    metrics_public: bool = False
    max_waiting: int = 256  # sequences that may wait beyond the engine's max_num_seqs; more get 429
    max_body_bytes: int = 4 << 20
    drain_timeout_s: float = 30.0  # on shutdown: how long running requests may take before they are cancelled


class ServerState:
    """What the routes share: the engine bridge, the tokenizer, limits and metrics."""

    def __init__(self, engine, tokenizer, settings: ServerSettings):
        self.engine, self.tokenizer, self.settings = engine, tokenizer, settings
        self.model = engine.model
        self.metrics = ServerMetrics(engine.metrics, lambda: self.bridge.in_flight)
        self.bridge = EngineBridge(engine, max_waiting=settings.max_waiting, metrics=self.metrics)
        cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        positions = getattr(cfg, "max_position_embeddings", None) or (1 << 31)
        self.vocab_size = getattr(cfg, "vocab_size", None)
        self.context_len = min(positions, engine.cache.num_blocks * engine.config.block_size)
        # Every token decodes to at most this many characters, so a text of more than
        # context_len * max_token_chars characters cannot fit without being tokenised.
        self.max_token_chars = max((len(t) for t in tokenizer.get_vocab()), default=1) or 1
        eos = self.model.generation_config.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        self.eos = eos
        self.token_texts = TokenTexts(tokenizer)
        self.created = schemas.now()
        self._saved_attention: Optional[str] = None

    # ------------------------------------------------------------ life cycle
    def start(self, loop) -> None:
        # Private engines (seeded requests) share the model with the main engine, so it stays
        # on the paged attention for the server's lifetime instead of being switched per engine.
        current = self.model.config._attn_implementation
        if current != ATTENTION:
            self._saved_attention = current
            self.model.set_attn_implementation(ATTENTION)
        self.bridge.bind(loop)  # starts the serving thread that runs the engine's steps

    def stop(self) -> None:
        self.bridge.shutdown()
        self.engine.stop()
        if self._saved_attention is not None:
            self.model.set_attn_implementation(self._saved_attention)
            self._saved_attention = None

    # ------------------------------------------------------------ prompts
    def precheck_chars(self, chars: int, param: str) -> None:
        if math.ceil(chars / self.max_token_chars) > self.context_len:
            raise APIError(400, f"the prompt ({chars} characters) cannot fit this model's context of "
                                f"{self.context_len} tokens", param=param, code="context_length_exceeded")

    def chat_ids(self, messages: list[dict]) -> list[int]:
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # a template that rejects the conversation (e.g. role order)
            raise bad_request(f"the chat template rejected the messages: {exc}", "messages") from None
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def text_ids(self, prompts: list) -> list[list[int]]:
        out = []
        for i, prompt in enumerate(prompts):
            ids = list(self.tokenizer(prompt)["input_ids"]) if isinstance(prompt, str) else prompt
            bad = next((t for t in ids if self.vocab_size is not None and not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise bad_request(f"prompt[{i}] holds token id {bad}, outside the vocabulary [0, {self.vocab_size})",
                                  "prompt")
            if not ids:
                raise bad_request(f"prompt[{i}] is empty", "prompt")
            out.append(ids)
        return out

    def max_new_tokens(self, prompts: list[list[int]], requested: Optional[int], prompt_param: str, param: str) -> int:
        longest = max(len(p) for p in prompts)
        if longest >= self.context_len:
            raise APIError(400, f"this model's maximum context length is {self.context_len} tokens; the {prompt_param} "
                                f"has {longest}", param=prompt_param, code="context_length_exceeded")
        if requested is None:
            return self.context_len - longest
        if longest + requested > self.context_len:
            raise APIError(400, f"this model's maximum context length is {self.context_len} tokens; you requested "
                                f"{longest + requested} ({longest} in the {prompt_param}, {requested} in {param})",
                           param=param, code="context_length_exceeded")
        return requested

    def generation_config(self, opts: protocol.SamplingOptions, max_new_tokens: int):
        from transformers import GenerationConfig

        pad = self.eos[0] if self.eos else 0
        if opts.greedy:
            return GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=self.eos, pad_token_id=pad,
                                    do_sample=False)
        return GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=self.eos, pad_token_id=pad, do_sample=True,
                                temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k)

    # ------------------------------------------------------------ answers
    async def answer(self, request: Request, prompts: list[list[int]], opts: protocol.SamplingOptions, *,
                     chat: bool, model: str, max_tokens_param: str):
        max_new = self.max_new_tokens(prompts, opts.max_tokens, "messages" if chat else "prompt", max_tokens_param)
        gc = self.generation_config(opts, max_new)
        seed = None if opts.seed is None or opts.greedy else opts.seed
        want = None if opts.logprobs is None else LogprobRequest(top=opts.logprobs)
        group = await self.bridge.submit([p for p in prompts for _ in range(opts.n)], gc, seed=seed, logprobs=want)
        texts = choice_texts(group, self.tokenizer, opts.stop)
        books = None if want is None else [ChoiceLogprobs(self.token_texts, want.top) for _ in texts]
        obj_id, created = schemas.new_id("chatcmpl" if chat else "cmpl"), schemas.now()
        prompt_tokens = sum(len(p) for p in prompts)
        if opts.stream:
            chunks = sse_stream(group, texts, chat=chat, obj_id=obj_id, created=created, model=model,
                                prompt_tokens=prompt_tokens, include_usage=opts.include_usage, logprobs=books)
            return EventStream(chunks, group.close)
        try:
            choices = await until_disconnect(request.receive, collect(group, texts, books))
        except ClientGone:
            return Response(status_code=499)  # nobody is left to read it
        finally:
            group.close()
        use = schemas.usage(prompt_tokens, completion_tokens(texts))
        build = schemas.chat_completion if chat else schemas.completion
        logprobs = None if books is None else [b.chat() if chat else b.completion() for b in books]
        return JSONResponse(build(obj_id, created, model, choices, use, logprobs))


def _api_error(_request, exc: APIError):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _http_error(_request, exc: StarletteHTTPException):
    err = APIError(exc.status_code, str(exc.detail))
    return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))


def _server_error(_request, exc: Exception):
    return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)


def create_app(engine, tokenizer, settings: Optional[ServerSettings] = None) -> FastAPI:
    settings = settings or ServerSettings()
    state = ServerState(engine, tokenizer, settings)
    names = [settings.model_name]

    @asynccontextmanager
    async def lifespan(_app):
        state.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await state.bridge.drain(0.0)
            await asyncio.get_running_loop().run_in_executor(None, state.stop)

    app = FastAPI(title="cbkernels", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _server_error)
    app.add_middleware(GateMiddleware, api_key=settings.api_key, metrics_public=settings.metrics_public,
                       max_body_bytes=settings.max_body_bytes, metrics=state.metrics)
    loop_run = asyncio.get_running_loop

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = protocol.parse_json(await read_body(request, settings.max_body_bytes))
        req = protocol.parse_chat(body)
        protocol.check_model(req.model, names)
        chars = sum(len(m["content"]) for m in req.messages)
        state.precheck_chars(chars, "messages")
        ids = (state.chat_ids(req.messages) if chars <= INLINE_TOKENIZE_CHARS
               else await loop_run().run_in_executor(None, state.chat_ids, req.messages))
        return await state.answer(request, [ids], req.options, chat=True, model=req.model,
                                  max_tokens_param="max_completion_tokens" if body.get("max_completion_tokens")
                                  is not None else "max_tokens")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = protocol.parse_json(await read_body(request, settings.max_body_bytes))
        req = protocol.parse_completion(body)
        protocol.check_model(req.model, names)
        for prompt in req.prompts:
            state.precheck_chars(len(prompt), "prompt")
        chars = sum(len(p) for p in req.prompts if isinstance(p, str))
        prompts = (state.text_ids(req.prompts) if chars <= INLINE_TOKENIZE_CHARS
                   else await loop_run().run_in_executor(None, state.text_ids, req.prompts))
        return await state.answer(request, prompts, req.options, chat=False, model=req.model,
                                  max_tokens_param="max_tokens")

    @app.get("/v1/models")
    async def models():
        return schemas.model_list(names, state.created, state.context_len)

    @app.get("/health")
    async def health():
        if state.bridge.closing:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if state.bridge.error is not None:
            return JSONResponse({"status": f"engine loop failed: {state.bridge.error!r}"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        data = await loop_run().run_in_executor(None, state.metrics.exposition)
        return Response(data, media_type=state.metrics.content_type)

    return app
