"""The read cookie: how a browser page reads a service whose reads need the key.

``POST /api/session`` (key in the header) sets an HttpOnly, ``SameSite=Strict``
cookie whose value is an HMAC of the key. It opens ``GET``/``HEAD`` reads under
``/api/`` and nothing else. Requests go through ``httpx.ASGITransport``, to the
real app, to the ASGI guard alone and to the routes' dependency alone, so that
each key layer is held to the same rule. Without the cookie support every
"unlocks" assertion here fails (401); without the method check the "never
unlocks" ones do.
"""

from __future__ import annotations

import pytest
from fastapi import Depends, FastAPI

from bluesky_xsml.api.routes.deps import require_key
from bluesky_xsml.api.security import GuardMiddleware, read_cookie_name, read_token

from .test_service_edges import KEY, _ok, bare_app, request

TOKEN = read_token(KEY)
NAME = read_cookie_name(KEY)
GOOD = {"Cookie": f"{NAME}={TOKEN}"}

#: Cookies that are almost the read cookie: each must be refused.
NEAR_MISS_COOKIES = [
    f"{NAME}={KEY}",                                  # the key itself is not the cookie
    f"{NAME}={TOKEN[:-1]}", f"{NAME}={TOKEN}0", f"{NAME}=0{TOKEN}", f"{NAME}={TOKEN.upper()}",
    f"{NAME}={TOKEN[:-1]}{'0' if TOKEN[-1] != '0' else '1'}",
    f"{NAME}={read_token(KEY + 'x')}",                # the cookie of another key
    f"{NAME}=", f"{NAME}={TOKEN[:32]}",
    f"{NAME[:-1]}={TOKEN}", f"{NAME}x={TOKEN}", f"xsml_read={TOKEN}",  # right value, wrong name
    f"{read_cookie_name(KEY + 'x')}={TOKEN}",
    f"{NAME.upper()}={TOKEN}",
]
STATE_CHANGING = ["POST", "PUT", "PATCH", "DELETE"]


def keyed_app():
    return bare_app(keyed_reads=True)


# ----------------------------------------------------------------- the route
@pytest.mark.security
def test_session_sets_a_read_only_httponly_strict_cookie():
    app = keyed_app()
    assert request(app, "POST", "/api/session").status_code == 401
    assert "set-cookie" not in request(app, "POST", "/api/session").headers
    r = request(app, "POST", "/api/session", headers={"X-API-Key": KEY[:-1]})
    assert r.status_code == 403 and "set-cookie" not in r.headers
    assert request(app, "POST", "/api/session", headers=GOOD).status_code == 401

    r = request(app, "POST", "/api/session", headers={"X-API-Key": KEY})
    assert r.status_code == 200, r.text
    assert r.json()["cookie"] == NAME and r.headers["cache-control"] == "no-store"
    cookie = r.headers["set-cookie"]
    parts = [p.strip().lower() for p in cookie.split(";")]
    assert parts[0] == f"{NAME}={TOKEN}".lower()
    assert "httponly" in parts and "samesite=strict" in parts and "path=/api/" in parts
    assert "secure" not in parts  # plain http: a Secure cookie would not be stored
    assert KEY not in cookie
    # over https the cookie is Secure too
    r = request(app, "POST", "/api/session", base="https://127.0.0.1",
                headers={"Authorization": f"Bearer {KEY}"})
    assert "secure" in [p.strip().lower() for p in r.headers["set-cookie"].split(";")]


@pytest.mark.security
def test_the_cookie_unlocks_reads_with_keyed_reads_on():
    app = keyed_app()
    for path in ("/api/status", "/api/decision", "/api/decisions", "/api/policy",
                 "/api/frames/latest", "/api/frames/latest?n=3", "/api/runs",
                 "/api/thresholds", "/api/feed?max_s=0.1", "/api/queue/pending"):
        assert request(app, "GET", path).status_code == 401, path
        r = request(app, "GET", path, headers=GOOD)
        assert r.status_code not in (401, 403), (path, r.status_code, r.text)
    # the cookie among others, and a header key still works alone
    r = request(app, "GET", "/api/decision", headers={"Cookie": f"a=1; {NAME}={TOKEN}; b=2"})
    assert r.status_code == 200
    assert request(app, "GET", "/api/decision", headers={"X-API-Key": KEY}).status_code == 200


@pytest.mark.security
@pytest.mark.parametrize("method", STATE_CHANGING)
def test_the_cookie_never_unlocks_a_state_changing_request(method):
    app = keyed_app()
    for path in ("/api/policy", "/api/thresholds", "/api/retrain", "/api/labels",
                 "/api/checkpoints/rollback", "/api/session", "/api/decision"):
        r = request(app, method, path, headers=GOOD, json={"rules": []})
        assert r.status_code == 401, (method, path, r.status_code, r.text)
    # not with open reads either (loopback default)
    r = request(bare_app(), method, "/api/policy", headers=GOOD, json={"rules": []})
    assert r.status_code == 401


@pytest.mark.security
@pytest.mark.parametrize("cookie", NEAR_MISS_COOKIES)
def test_near_miss_cookies_are_refused(cookie):
    r = request(keyed_app(), "GET", "/api/decision", headers={"Cookie": cookie})
    assert r.status_code in (401, 403), (cookie, r.status_code)


@pytest.mark.security
def test_a_header_decides_alone_and_the_token_is_no_key():
    app = keyed_app()
    # a wrong key in a header is not rescued by a good cookie
    r = request(app, "GET", "/api/decision", headers={**GOOD, "X-API-Key": KEY[:-1]})
    assert r.status_code == 403
    # the cookie's value sent as a key is refused, for reads and for writes
    for method, path in (("GET", "/api/decision"), ("PUT", "/api/policy")):
        for headers in ({"X-API-Key": TOKEN}, {"Authorization": f"Bearer {TOKEN}"}):
            r = request(app, method, path, headers=headers, json={"rules": []})
            assert r.status_code == 403, (method, headers)


# ------------------------------------------------- each layer, the same rule
def _guard_alone():
    return GuardMiddleware(_ok, api_key=KEY, max_body_bytes=4096, keyed_reads=True)


def _dependency_alone():
    app = FastAPI()
    app.state.api_key = KEY
    for method in ["GET", "HEAD", "OPTIONS", *STATE_CHANGING]:
        app.add_api_route("/api/thing", lambda: "reached", methods=[method],
                          dependencies=[Depends(require_key)], name=f"thing_{method}")
    return app


@pytest.mark.security
@pytest.mark.parametrize("layer", [_guard_alone, _dependency_alone],
                         ids=["guard", "dependency"])
def test_each_key_layer_alone_takes_the_cookie_for_get_and_head_only(layer):
    app = layer()
    for method in ("GET", "HEAD"):
        r = request(app, method, "/api/thing", headers=GOOD)
        assert r.status_code == 200, (method, r.status_code, r.text)
        assert request(app, method, "/api/thing").status_code == 401
        for cookie in NEAR_MISS_COOKIES:
            r = request(app, method, "/api/thing", headers={"Cookie": cookie})
            assert r.status_code in (401, 403) and "reached" not in r.text, (method, cookie)
    for method in ["OPTIONS", *STATE_CHANGING]:
        r = request(app, method, "/api/thing", headers=GOOD)
        assert r.status_code == 401 and "reached" not in r.text, (method, r.status_code)
        r = request(app, method, "/api/thing", headers={"X-API-Key": KEY})
        assert r.status_code == 200, (method, r.status_code)
