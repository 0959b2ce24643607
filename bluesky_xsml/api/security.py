"""Host checks, API-key checks, request-body limits and security headers (pure ASGI).

Every check runs before a request body is read or parsed, so a request for a
foreign host, an unauthenticated or an oversized request is refused without the
application ever seeing it.
"""

from __future__ import annotations

import hmac
import json
import re

from .settings import API_KEY_HEADER

__all__ = ["GuardMiddleware", "STATE_CHANGING", "check_key", "key_from_headers", "host_name"]

#: Methods that change state and need the API key.
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})

_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


_DIGITS = re.compile(rb"[0-9]{1,19}")
#: Authorization schemes that carry the API key.
_SCHEMES = (b"bearer", b"apikey")


def key_from_headers(headers) -> str | None:
    """The API key a request carries: ``X-API-Key``, else ``Authorization: Bearer|ApiKey <key>``.

    ``headers`` are ASGI ``(name, value)`` byte pairs (names lower-case) or a
    mapping of them. Returns ``None`` when neither is there (or is empty).

    >>> key_from_headers([(b"x-api-key", b"k1")])
    'k1'
    >>> key_from_headers([(b"authorization", b"Bearer k2")])
    'k2'
    >>> key_from_headers({b"authorization": b"apikey k3"})
    'k3'
    >>> key_from_headers([(b"authorization", b"Basic a")]) is None
    True
    """
    pairs = headers.items() if hasattr(headers, "items") else headers
    direct = auth = None
    for name, value in pairs:
        name = name.lower()
        if name == API_KEY_HEADER.lower().encode() and direct is None:
            direct = value
        elif name == b"authorization" and auth is None:
            auth = value
    if direct:
        return direct.decode("latin-1")
    if auth:
        scheme, _, token = auth.strip().partition(b" ")
        if scheme.lower() in _SCHEMES and token.strip():
            return token.strip().decode("latin-1")
    return None


def check_key(given: str | None, expected: str) -> tuple[int, str] | None:
    """None when ``given`` is the key, else ``(status, message)`` (401 missing, 403 wrong).

    The comparison takes the same time wherever the first difference is
    (:func:`hmac.compare_digest`).

    >>> check_key(None, "secret")[0], check_key("nope", "secret")[0], check_key("secret", "secret")
    (401, 403, None)
    """
    if not given:
        return 401, (f"missing API key: send it in the {API_KEY_HEADER} header or as "
                     "'Authorization: Bearer <key>' (the key is printed when the service "
                     "starts with a generated one, or set XSML_API_KEY)")
    if not hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8")):
        return 403, "wrong API key"
    return None


def host_name(value: bytes | None) -> str | None:
    """The host of a ``Host`` header, lower-case, without port or brackets (None: unusable).

    >>> host_name(b"127.0.0.1:8765"), host_name(b"[::1]:80"), host_name(b"LocalHost.")
    ('127.0.0.1', '::1', 'localhost')
    """
    if not value:
        return None
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        return text[1:end]
    host = text.rsplit(":", 1)[0] if text.count(":") == 1 else text
    return host.rstrip(".") or None


async def _send_problem(send, status: int, detail: str, headers=()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Host check, API key, a body-size cap and security headers.

    Parameters
    ----------
    app : ASGI app
    api_key : str
        Needed by state-changing ``/api/`` requests (and by every ``/api/``
        request when ``keyed_reads``).
    max_body_bytes : int
    allowed_hosts : iterable of str, optional
        ``Host`` names answered (lower-case, no port); ``"*"`` or None: any.
    keyed_reads : bool
        Reads under ``/api/`` need the key too.
    """

    def __init__(self, app, *, api_key: str, max_body_bytes: int, allowed_hosts=None,
                 keyed_reads: bool = False):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = int(max_body_bytes)
        hosts = None if allowed_hosts is None else frozenset(allowed_hosts)
        self.allowed_hosts = None if hosts is None or "*" in hosts else hosts
        self.keyed_reads = bool(keyed_reads)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for k, v in scope.get("headers", []):
            headers.setdefault(k.lower(), v)
        if self.allowed_hosts is not None:
            host = host_name(headers.get(b"host"))
            if host not in self.allowed_hosts:
                shown = headers.get(b"host", b"").decode("latin-1")[:100]
                return await _send_problem(
                    send, 400, f"host {shown!r} is not served here; the service answers "
                               f"{sorted(self.allowed_hosts)} (setting trusted_hosts, "
                               "XSML_TRUSTED_HOSTS)")
        method = scope.get("method", "GET").upper()
        if scope.get("path", "").startswith("/api/") and (
                self.keyed_reads or method in STATE_CHANGING):
            problem = check_key(key_from_headers(headers), self.api_key)
            if problem is not None:
                extra = [(b"www-authenticate", b"Bearer")] if problem[0] == 401 else []
                return await _send_problem(send, *problem, headers=extra)
        limit = self.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None:
            if _DIGITS.fullmatch(length.strip()) is None:  # ASCII digits only (not "²")
                return await _send_problem(send, 400, "Content-Length is not a number")
            n = int(length)
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

