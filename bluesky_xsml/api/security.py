"""Host checks, API-key checks, request-body limits and security headers (pure ASGI).

Every check runs before a request body is read or parsed, so a request for a
foreign host, an unauthenticated or an oversized request is refused without the
application ever seeing it.

The key travels in a header. A browser cannot add headers to ``EventSource``
or ``<img>`` requests, so for ``GET``/``HEAD`` reads only, a *read cookie*
works too: ``POST /api/session`` (key in the header) sets it, HttpOnly and
``SameSite=Strict``. Its value is not the key but an HMAC of it
(:func:`read_token`), so it opens reads and nothing else: a state-changing
request with the cookie alone is refused, and the cookie sent as a key header
is refused too. Both key layers (the guard here and the routes' dependency)
decide with :func:`request_key_problem`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re

from .settings import API_KEY_HEADER

__all__ = ["GuardMiddleware", "STATE_CHANGING", "COOKIE_READS", "check_key", "key_from_headers",
           "host_name", "read_token", "read_cookie_name", "read_cookies",
           "request_key_problem"]

#: Methods that change state and need the API key.
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: Methods for which the read cookie stands in for the key (never a state-changing one).
COOKIE_READS = frozenset({"GET", "HEAD"})
#: Most cookies of the read cookie's name looked at in one request.
_MAX_COOKIES = 4

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


def read_token(api_key: str) -> str:
    """The read cookie's value for ``api_key``: an HMAC of it, never the key itself.

    It changes with the key, needs no server-side session store, and cannot be
    turned back into the key or used as one.

    >>> t = read_token("k" * 20)
    >>> len(t), t == read_token("k" * 20), t == read_token("k" * 19 + "l")
    (64, True, False)
    """
    return hmac.new(api_key.encode("utf-8"), b"xsml read cookie v1", hashlib.sha256).hexdigest()


def read_cookie_name(api_key: str) -> str:
    """The read cookie's name: ``xsml_read_`` and 8 hex digits that depend on the key.

    Browsers do not keep cookies apart by port, so two services on one machine
    (different ports and keys) each get their own cookie instead of replacing
    each other's.

    >>> read_cookie_name("k" * 20).startswith("xsml_read_"), len(read_cookie_name("k" * 20))
    (True, 18)
    """
    tag = hmac.new(api_key.encode("utf-8"), b"xsml read cookie name", hashlib.sha256)
    return "xsml_read_" + tag.hexdigest()[:8]


def read_cookies(headers, name: str) -> list[bytes]:
    """The values of cookie ``name`` in the ``Cookie`` headers (at most a few).

    ``headers`` as for :func:`key_from_headers`.

    >>> read_cookies([(b"cookie", b"a=1; xsml_read_x=v; b=2")], "xsml_read_x")
    [b'v']
    >>> read_cookies([(b"cookie", b"xsml_read_xy=v")], "xsml_read_x")
    []
    """
    pairs = headers.items() if hasattr(headers, "items") else headers
    want = name.encode("latin-1")
    out = []
    for hname, value in pairs:
        if hname.lower() != b"cookie":
            continue
        for part in value.split(b";"):
            cname, eq, cvalue = part.strip().partition(b"=")
            if eq and cname.strip() == want:
                out.append(cvalue.strip())
                if len(out) >= _MAX_COOKIES:
                    return out
    return out


def request_key_problem(method: str, headers, api_key: str) -> tuple[int, str] | None:
    """None when a request may pass the key check, else ``(status, message)``.

    A key in a header (:func:`key_from_headers`) decides alone. Without one,
    a ``GET`` or ``HEAD`` may carry the read cookie instead (its name and value
    from :func:`read_cookie_name`, :func:`read_token`); any other method gets
    401 however good its cookies are, so a cookie never makes a state-changing
    request (cross-site request forgery) possible.

    >>> k = "k" * 20
    >>> cookie = [(b"cookie", f"{read_cookie_name(k)}={read_token(k)}".encode())]
    >>> request_key_problem("GET", cookie, k), request_key_problem("POST", cookie, k)[0]
    (None, 401)
    >>> request_key_problem("GET", [(b"x-api-key", read_token(k).encode())], k)[0]
    403
    """
    given = key_from_headers(headers)
    if given is not None or method.upper() not in COOKIE_READS:
        return check_key(given, api_key)
    values = read_cookies(headers, read_cookie_name(api_key))
    if not values:
        return check_key(None, api_key)
    token = read_token(api_key).encode()
    ok = False
    for value in values:  # every one compared, in constant time each
        ok |= hmac.compare_digest(value, token)
    return None if ok else (403, "wrong read cookie: enter the API key on the page again "
                                 "(the service's key may have changed)")


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
        request when ``keyed_reads``; ``GET``/``HEAD`` reads may carry the
        read cookie instead, see :func:`request_key_problem`).
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
            problem = request_key_problem(method, scope.get("headers", []), self.api_key)
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

