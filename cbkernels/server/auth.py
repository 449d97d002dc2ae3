"""Who may call the server, and how much they may send: one ASGI middleware in front of
every route.

* With an API key, every ``/v1/*`` request (and ``/metrics`` unless it is public) needs
  ``Authorization: Bearer <key>``; the key is compared in constant time
  (``hmac.compare_digest``). ``/health`` stays open. A refusal is 401 with an error object.
* A body announced (``Content-Length``) as larger than the limit is refused with 413 before
  it is read; a body without a length is counted while it is read (``read_body``).
* Every answer is counted in the ``http_requests`` metric by route and status code.
"""
from __future__ import annotations

import hmac
from typing import Optional

from .errors import APIError, send_json

OPEN_PATHS = ("/health",)
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


def key_matches(header: Optional[str], key: str) -> bool:
    """``Authorization: Bearer <key>``, compared without leaking where the first difference is."""
    scheme, _, token = (header or "").partition(" ")
    given = token.strip().encode("utf-8") if scheme.lower() == "bearer" else b""
    return hmac.compare_digest(given, key.encode("utf-8"))


class GateMiddleware:
    def __init__(self, app, *, api_key: Optional[str], metrics_public: bool, max_body_bytes: int, metrics=None):
        self.app = app
        self.api_key = api_key
        self.metrics_public = metrics_public
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    def _needs_key(self, path: str) -> bool:
        if self.api_key is None or path in OPEN_PATHS:
            return False
        return path.startswith("/v1/") or path == "/v1" or (path == "/metrics" and not self.metrics_public)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope.get("path", ""), scope.get("method", "")
        status = {"code": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope, path)
            if refusal is not None:
                await send_json(counting_send, refusal.status, refusal.body(), refusal.headers)
            else:
                await self.app(scope, receive, counting_send)
        finally:
            if self.metrics is not None:
                self.metrics.observe_http(method, path if path in ROUTES else "other", status["code"])

    def _refusal(self, scope, path: str) -> Optional[APIError]:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self._needs_key(path) and not key_matches(headers.get("authorization"), self.api_key):
            return APIError(401, "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
                            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return APIError(400, f"Content-Length is not a number: {length!r}")
            if int(length) > self.max_body_bytes:
                return too_large(self.max_body_bytes)
        return None


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than the limit of {limit} bytes", code="request_too_large")


async def read_body(request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it passes ``limit`` bytes."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)

