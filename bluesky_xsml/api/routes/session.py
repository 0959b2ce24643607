"""``POST /api/session``: trade the API key (in a header) for the read cookie.

A browser page cannot put the key in a header of its live feed
(``EventSource``) or of its pictures (``<img>``). With the key in the
``X-API-Key`` header, this route sets a cookie that opens ``GET``/``HEAD``
reads under ``/api/`` and nothing else:

- HttpOnly: the page's scripts (and anything injected into them) cannot read it;
- ``SameSite=Strict``: no other site's page makes the browser send it;
- ``Path=/api/``, and ``Secure`` when the request came over https;
- its value is an HMAC of the key, not the key (:func:`~bluesky_xsml.api.security.read_token`),
  so it is refused as a key and never opens a state-changing request.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel

from ..security import read_cookie_name, read_token
from .deps import ERRORS, KEYED, require_key

router = APIRouter(prefix="/api", tags=["service"], responses=ERRORS)

#: Lifetime of the read cookie (a long shift); the page sets it again when it loads.
READ_COOKIE_MAX_AGE_S = 12 * 3600
#: Where the browser sends the read cookie.
READ_COOKIE_PATH = "/api/"


class SessionOut(BaseModel):
    """The read cookie that was set."""

    cookie: str
    max_age_s: int
    reads: str = "GET and HEAD under /api/"


@router.post("/session", response_model=SessionOut, dependencies=[Depends(require_key)],
             responses=KEYED)
def open_session(request: Request, response: Response) -> SessionOut:
    """Set the read cookie (HttpOnly, SameSite=Strict) for a page's feed and pictures."""
    key = request.app.state.api_key
    name = read_cookie_name(key)
    response.set_cookie(name, read_token(key), max_age=READ_COOKIE_MAX_AGE_S,
                        path=READ_COOKIE_PATH, secure=request.url.scheme == "https",
                        httponly=True, samesite="strict")
    response.headers["Cache-Control"] = "no-store"
    return SessionOut(cookie=name, max_age_s=READ_COOKIE_MAX_AGE_S)
