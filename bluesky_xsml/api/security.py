"""API-key checks, request-body limits and response security headers (pure ASGI).

Both checks run before a request body is read or parsed, so an unauthenticated
or oversized request is refused without the application ever seeing it.
"""

from __future__ import annotations

import json
import secrets

from .settings import API_KEY_HEADER

__all__ = ["GuardMiddleware", "STATE_CHANGING", "check_key"]

#: Methods that change state and need the API key.
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})

_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


def check_key(given: str | None, expected: str) -> tuple[int, str] | None:
    """None when ``given`` is the key, else ``(status, message)`` (401 missing, 403 wrong).

    >>> check_key(None, "secret")[0], check_key("nope", "secret")[0], check_key("secret", "secret")
    (401, 403, None)
    """
    if not given:
        return 401, (f"missing API key: send it in the {API_KEY_HEADER} header (the key is "
                     "printed when the service starts, or set XSML_API_KEY)")
    if not secrets.compare_digest(given.encode("utf-8", "replace"), expected.encode()):
        return 403, "wrong API key"
    return None


async def _send_problem(send, status: int, detail: str, headers=()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Key check for state-changing ``/api`` requests, a body-size cap, security headers.

    Parameters
    ----------
    app : ASGI app
    api_key : str
    max_body_bytes : int
    """

    def __init__(self, app, *, api_key: str, max_body_bytes: int):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = int(max_body_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        method = scope.get("method", "GET").upper()
        if method in STATE_CHANGING and scope.get("path", "").startswith("/api/"):
            raw = headers.get(API_KEY_HEADER.lower().encode())
            problem = check_key(raw.decode("latin-1") if raw is not None else None, self.api_key)
            if problem is not None:
                extra = [(b"www-authenticate", b"ApiKey")] if problem[0] == 401 else []
                return await _send_problem(send, *problem, headers=extra)
        limit = self.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await _send_problem(send, 400, "Content-Length is not a number")
            if n > limit:
                return await _send_problem(
                    send, 413, f"request body of {n} bytes is over the limit of {limit} bytes")
        else:  # chunked or no body: read it here (bounded), then replay it
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    return await _send_problem(
                        send, 413, f"request body is over the limit of {limit} bytes")
                chunks.append(chunk)
                more = message.get("more_body", False)
            body, original, replayed = b"".join(chunks), receive, False

            async def receive():  # the buffered body once, then the client's own messages
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await original()

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                extra = [(b"x-content-type-options", b"nosniff"),
                         (b"referrer-policy", b"no-referrer"),
                         (b"content-security-policy", _CSP.encode())]
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        await self.app(scope, receive, send_with_headers)

