"""The two polled reads, answered before FastAPI's routing.

Pages and steering agents poll ``GET /api/status`` and
``GET /api/frames/latest`` several times a second. When the service runs in
the tagging process (``xsml.serve``), every request's Python runs under the
same GIL as the RunEngine and the tagging worker, and FastAPI's routing,
dependency injection and query validation are most of a request's cost.
:class:`HotReads` answers well-formed requests for those two routes straight
from :class:`~bluesky_xsml.api.state.ServiceState` with the same bytes the
routes would send; anything else (other query parameters, values out of
range, no callback attached) goes on to the FastAPI routes, which validate it
and answer as documented in the OpenAPI schema.

Examples
--------
>>> parse_latest_query(b"n=20&tag=ring_isotropic")
(20, None, 'ring_isotropic')
>>> parse_latest_query(b"n=5000") is None        # out of range: FastAPI answers 422
True
>>> parse_latest_query(b"n=--5") is None
True
"""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qsl

__all__ = ["HotReads", "parse_latest_query"]

_LATEST_KEYS = {"n", "after", "tag"}


_INTEGER = re.compile(r"-?[0-9]{1,19}")


def _int(text: str, lo: int, hi: int) -> int | None:
    # plain ASCII digits only: anything fancier is left to the route's validation
    if _INTEGER.fullmatch(text) is None:
        return None
    value = int(text)
    return value if lo <= value <= hi else None


def parse_latest_query(query: bytes) -> tuple[int, int | None, str | None] | None:
    """``(n, after, tag)`` of a ``/api/frames/latest`` query string, or ``None``.

    ``None`` means "not plainly valid": the caller hands the request to the
    route, whose validation explains what is wrong. The limits are the
    route's: ``0 <= n <= 2000`` (default 50), ``-1 <= after <= 2**62``, and a
    tag of 1 to 64 characters.
    """
    try:
        pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True, strict_parsing=False)
    except ValueError:
        return None
    seen = {}
    for key, value in pairs:
        if key not in _LATEST_KEYS or key in seen:
            return None
        seen[key] = value
    n = _int(seen["n"], 0, 2000) if "n" in seen else 50
    after = _int(seen["after"], -1, 2**62) if "after" in seen else None
    tag = seen.get("tag")
    if n is None or ("after" in seen and after is None):
        return None
    if tag is not None and not 1 <= len(tag) <= 64:
        return None
    return n, after, tag


class HotReads:
    """ASGI middleware that serves the polled status and latest-frames reads.

    Parameters
    ----------
    app : ASGI app
        The FastAPI app (everything this middleware does not answer).
    state : ServiceState
        Where the answers come from.
    status_max_age : float
        Seconds a computed status is reused, as the status route does.
    """

    def __init__(self, app, *, state, status_max_age: float):
        self.app = app
        self.state = state
        self.status_max_age = float(status_max_age)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") == "GET":
            path = scope.get("path")
            body = None
            if path == "/api/status" and not scope.get("query_string"):
                if self.state.callback is not None:
                    body = json.dumps(self.state.status(max_age=self.status_max_age),
                                      ensure_ascii=False, allow_nan=False,
                                      separators=(",", ":")).encode()
            elif path == "/api/frames/latest":
                query = parse_latest_query(scope.get("query_string", b""))
                if query is not None:
                    n, after, tag = query
                    body = self.state.latest_json(n, after=after, tag=tag).encode()
            if body is not None:
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
