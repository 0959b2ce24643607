"""The service's guard (``bluesky_xsml.api.security``) called directly, one rule at a time.

``test_service_edges.py`` and ``test_api_session.py`` hold the guard to its rules through
HTTP requests to the real app. These tests call the functions and the ASGI middleware
themselves (no server, no app), so that each rule is pinned where it is decided: the exact
status and message of each refusal, the edges of the body limit, which of two headers
counts, and the headers added to every answer. They were written against the mutants that
the HTTP tests let through (``tools/mutation.sh security``); each fails on at least one.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json

import pytest

from bluesky_xsml.api.security import (
    COOKIE_READS,
    STATE_CHANGING,
    GuardMiddleware,
    check_key,
    host_name,
    key_from_headers,
    read_cookie_name,
    read_cookies,
    read_token,
    request_key_problem,
)

pytestmark = pytest.mark.security

KEY = "guard-key-0123456789abcdef"
MISSING = ("missing API key: send it in the X-API-Key header or as 'Authorization: Bearer "
           "<key>' (the key is printed when the service starts with a generated one, or set "
           "XSML_API_KEY)")
WRONG_COOKIE = ("wrong read cookie: enter the API key on the page again (the service's key "
                "may have changed)")
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy",
     (b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
      b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")),
]


# ------------------------------------------------------------------ keys
def test_method_sets():
    assert STATE_CHANGING == {"POST", "PUT", "PATCH", "DELETE"}
    assert COOKIE_READS == {"GET", "HEAD"}


def test_key_from_headers_takes_the_first_of_each_and_prefers_x_api_key():
    assert key_from_headers([(b"X-API-KEY", b"a"), (b"x-api-key", b"b")]) == "a"
    assert key_from_headers([(b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")]
                            ) == "a"
    both = [(b"authorization", b"Bearer viaauth"), (b"x-api-key", b"direct")]
    assert key_from_headers(both) == "direct"
    # an empty X-API-Key falls back to Authorization, and the reverse
    assert key_from_headers([(b"x-api-key", b""), (b"authorization", b"ApiKey k")]) == "k"
    assert key_from_headers([(b"authorization", b""), (b"x-api-key", b"k")]) == "k"
    assert key_from_headers({b"Authorization": b"  BEARER   tok  "}) == "tok"
    assert key_from_headers([(b"authorization", b"Bearer \xe9")]) == "\xe9"  # latin-1
    for value in (b"Bearer", b"Bearer    ", b"Basic abc", b"Token abc", b"bearer-abc x",
                  b"abc"):
        assert key_from_headers([(b"authorization", value)]) is None, value
    assert key_from_headers([(b"x-api-keys", b"k"), (b"cookie", b"x-api-key=k")]) is None
    assert key_from_headers([]) is None


def test_check_key_answers_exactly():
    assert check_key(None, KEY) == (401, MISSING)
    assert check_key("", KEY) == (401, MISSING)
    assert check_key(KEY, KEY) is None
    for near in (KEY[:-1], KEY + "x", KEY.upper(), " " + KEY, "\ud800"):
        assert check_key(near, KEY) == (403, "wrong API key"), near
    assert check_key("kéy", "kéy") is None  # non-ASCII keys compare as UTF-8


def test_read_token_and_cookie_name_are_hmacs_of_the_key():
    mac = hmac.new(KEY.encode(), b"xsml read cookie v1", hashlib.sha256).hexdigest()
    assert read_token(KEY) == mac and KEY not in mac
    name = hmac.new(KEY.encode(), b"xsml read cookie name", hashlib.sha256).hexdigest()[:8]
    assert read_cookie_name(KEY) == "xsml_read_" + name
    assert read_token("kéy") == hmac.new("kéy".encode(), b"xsml read cookie v1",
                                         hashlib.sha256).hexdigest()


def test_read_cookies_finds_the_named_cookie_in_every_cookie_header():
    headers = [(b"host", b"x"), (b"cookie", b"a=1; want = v1 ;b=2"),
               (b"Cookie", b"want=v2;want"), (b"x-cookie", b"want=no"), (b"cookie", b"want=")]
    assert read_cookies(headers, "want") == [b"v1", b"v2", b""]
    assert read_cookies({b"cookie": b"want=v=w"}, "want") == [b"v=w"]
    assert read_cookies([(b"cookie", b"wanted=1; awant=2; want")], "want") == []
    many = [(b"cookie", b"; ".join(b"want=%d" % i for i in range(7)))]
    assert read_cookies(many, "want") == [b"0", b"1", b"2", b"3"]  # at most four looked at
    split = [(b"cookie", b"want=0; want=1; want=2"), (b"cookie", b"want=3; want=4")]
    assert read_cookies(split, "want") == [b"0", b"1", b"2", b"3"]


def test_request_key_problem_reads_with_a_cookie_only():
    token, name = read_token(KEY), read_cookie_name(KEY)
    good = [(b"cookie", f"{name}={token}".encode())]
    for method in ("GET", "get", "HEAD", "head"):
        assert request_key_problem(method, good, KEY) is None, method
    for method in ("POST", "put", "OPTIONS", "DELETE", "PATCH"):
        assert request_key_problem(method, good, KEY) == (401, MISSING), method
    assert request_key_problem("GET", [], KEY) == (401, MISSING)
    assert request_key_problem("GET", [(b"cookie", b"other=1")], KEY) == (401, MISSING)
    bad = [(b"cookie", f"{name}={token[:-1]}".encode())]
    assert request_key_problem("GET", bad, KEY) == (403, WRONG_COOKIE)
    # several cookies of the name: one good one is enough, wherever it is
    for values in ((token, "x"), ("x", token), ("x", token, "y")):
        cookie = "; ".join(f"{name}={v}" for v in values).encode()
        assert request_key_problem("GET", [(b"cookie", cookie)], KEY) is None, values
    # a header key decides alone, for reads too
    assert request_key_problem("GET", [*good, (b"x-api-key", b"no")], KEY) == (
        403, "wrong API key")
    assert request_key_problem("POST", [(b"x-api-key", KEY.encode())], KEY) is None


@pytest.mark.parametrize("value, host", [
    (b"127.0.0.1:8765", "127.0.0.1"), (b"[::1]:80", "::1"), (b"[::1]", "::1"),
    (b" LocalHost. ", "localhost"), (b"example.org", "example.org"), (b"::1", "::1"),
    (b"fe80::1:8765", "fe80::1:8765"), (b"host:", "host"), (b"a.b:1", "a.b"),
    (b"[::1", None), (b"", None), (None, None), (b".", None), (b":80", None),
    (b"h\xe9:1", "h\xe9"), (b"[::1]:80]", "::1"),
])
def test_host_name(value, host):
    assert host_name(value) == host


# ------------------------------------------------------------ the middleware
def call(guard, scope, messages=(), *, extra=None):
    """Run one ASGI request through ``guard``; returns (status, headers, body, app_saw).

    The scope has no method unless ``scope`` gives one (ASGI's default is GET)."""
    sent, saw = [], {}
    queue = list(messages) or [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive():
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def run():
        await guard({"type": "http", "path": "/api/x", "headers": [], **scope}, receive, send)

    guard.app = app(saw)
    asyncio.run(run())
    if not sent:
        return None, None, None, saw
    start = sent[0]
    assert start["type"] == "http.response.start"
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], start["headers"], body, saw


def app(saw):
    async def inner(scope, receive, send):
        saw["scope"] = scope
        chunks, saw["messages"] = [], []
        while True:
            m = await receive()
            saw["messages"].append(m)
            chunks.append(m.get("body", b""))
            if not m.get("more_body"):
                break
        saw["body"] = b"".join(chunks)
        saw["next"] = await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"reached"})
    return inner


def guard(**kw):
    return GuardMiddleware(None, api_key=KEY, max_body_bytes=kw.pop("max_body_bytes", 10), **kw)


def problem(status, headers, body):
    detail = json.loads(body)["detail"]
    assert headers[:2] == [(b"content-type", b"application/json"),
                           (b"content-length", str(len(body)).encode())]
    return status, detail


def test_answers_carry_the_security_headers_and_reach_the_app_unchanged():
    status, headers, body, saw = call(guard(), {"headers": [(b"host", b"x")]})
    assert (status, body) == (200, b"reached")
    assert headers == [(b"content-type", b"text/plain"), *SECURITY_HEADERS]
    assert saw["body"] == b"" and saw["next"] == {"type": "http.disconnect"}
    assert saw["scope"]["path"] == "/api/x"


def test_non_http_scopes_pass_untouched():
    seen = []

    async def lifespan(scope, receive, send):
        seen.append(scope["type"])

    g = GuardMiddleware(lifespan, api_key=KEY, max_body_bytes=1, allowed_hosts=["a"],
                        keyed_reads=True)
    asyncio.run(g({"type": "lifespan"}, None, None))
    asyncio.run(g({"type": "websocket", "path": "/api/x", "headers": []}, None, None))
    assert seen == ["lifespan", "websocket"]


def test_foreign_hosts_are_refused_with_the_served_names():
    g = guard(allowed_hosts=["b.example", "a.example"])
    status, headers, body, saw = call(g, {"headers": [(b"host", b"evil.example:1")]})
    assert problem(status, headers, body) == (
        400, ("host 'evil.example:1' is not served here; the service answers ['a.example', "
              "'b.example'] (setting trusted_hosts, XSML_TRUSTED_HOSTS)"))
    assert "scope" not in saw
    long = b"x" * 150
    status, headers, body, _ = call(g, {"headers": [(b"host", long)]})
    assert f"host '{'x' * 100}' is not served" in problem(status, headers, body)[1]
    status, headers, body, _ = call(g, {"headers": []})  # no Host at all
    assert problem(status, headers, body)[1].startswith("host '' is not served")
    # the first Host header decides; names compare without port and case
    assert call(g, {"headers": [(b"Host", b"A.example:8"), (b"host", b"evil")]})[0] == 200
    assert call(g, {"headers": [(b"host", b"evil"), (b"host", b"a.example")]})[0] == 400
    assert call(guard(allowed_hosts=["*", "a.example"]), {"headers": [(b"host", b"z")]})[0] \
        == 200
    assert call(guard(allowed_hosts=None), {"headers": [(b"host", b"z")]})[0] == 200
    assert call(guard(allowed_hosts=[]), {"headers": [(b"host", b"z")]})[0] == 400


def test_the_key_is_asked_for_state_changes_under_api_only():
    g = guard()
    for method in ("POST", "put", "PATCH", "DELETE"):
        status, headers, body, saw = call(g, {"method": method})
        assert problem(status, headers, body) == (401, MISSING), method
        assert headers[2:] == [(b"www-authenticate", b"Bearer")] and "scope" not in saw
        status, headers, body, _ = call(g, {"method": method,
                                            "headers": [(b"x-api-key", b"nope")]})
        assert problem(status, headers, body) == (403, "wrong API key")
        assert headers[2:] == []  # no challenge on a wrong key
        ok = call(g, {"method": method, "headers": [(b"x-api-key", KEY.encode())]})
        assert ok[0] == 200
    for path in ("/page/", "/api", "/healthz", "/apix/y"):
        assert call(g, {"method": "POST", "path": path})[0] == 200, path
    assert call(g, {"method": "GET"})[0] == 200
    assert call(g, {"method": "OPTIONS"})[0] == 200
    assert call(g, {})[0] == 200  # no method: a read


def test_keyed_reads_need_the_key_or_the_read_cookie():
    g = guard(keyed_reads=True)
    status, headers, body, _ = call(g, {"method": "GET"})
    assert problem(status, headers, body) == (401, MISSING)
    cookie = f"{read_cookie_name(KEY)}={read_token(KEY)}".encode()
    assert call(g, {"headers": [(b"cookie", cookie)]})[0] == 200  # no method: a GET
    assert call(g, {"method": "get", "headers": [(b"cookie", cookie)]})[0] == 200
    assert call(g, {"method": "HEAD", "headers": [(b"cookie", cookie)]})[0] == 200
    assert call(g, {"method": "POST", "headers": [(b"cookie", cookie)]})[0] == 401
    assert call(g, {"headers": [(b"x-api-key", KEY.encode())]})[0] == 200
    assert call(g, {"path": "/page/"})[0] == 200
    status, headers, body, _ = call(g, {"headers": [(b"cookie", cookie[:-1])]})
    assert problem(status, headers, body) == (403, WRONG_COOKIE)
    assert guard(keyed_reads=1).keyed_reads is True and guard().keyed_reads is False


def _with_length(value: bytes, method="GET"):
    return {"method": method, "path": "/page/", "headers": [(b"content-length", value)]}


def test_content_length_is_checked_before_the_body_is_read():
    g = guard(max_body_bytes="10")
    assert g.max_body_bytes == 10
    body = [{"type": "http.request", "body": b"0123456789", "more_body": False}]
    status, _, _, saw = call(g, _with_length(b"10"), body)
    assert status == 200 and saw["body"] == b"0123456789"
    assert call(g, _with_length(b" 10 "), body)[0] == 200
    status, headers, body_, saw = call(g, _with_length(b"11"), body)
    assert problem(status, headers, body_) == (
        413, "request body of 11 bytes is over the limit of 10 bytes")
    assert "scope" not in saw
    for bad in (b"\xc2\xb2", b"-1", b"1e3", b"", b"0x10", b"1" * 20, b"+1"):
        status, headers, body_, saw = call(g, _with_length(bad), body)
        assert problem(status, headers, body_) == (400, "Content-Length is not a number"), bad
    assert call(g, _with_length(b"1" * 19))[0] == 413  # 19 digits: a number, too large
    # the first Content-Length header counts
    two = {"path": "/page/",
           "headers": [(b"content-length", b"1"), (b"content-length", b"99")]}
    assert call(g, two, body)[0] == 200


def test_a_body_without_length_is_read_bounded_then_replayed():
    g = guard(max_body_bytes=10)
    parts = [{"type": "http.request", "body": b"01234", "more_body": True},
             {"type": "http.request", "body": b"56789", "more_body": True},
             {"type": "http.request", "more_body": False}]
    status, _, _, saw = call(g, {"path": "/page/"}, parts)
    assert status == 200 and saw["body"] == b"0123456789"
    assert saw["messages"] == [{"type": "http.request", "body": b"0123456789",
                                "more_body": False}]  # replayed as one complete message
    # after the replayed body, the app reads the client's own next message
    assert saw["next"] == {"type": "http.disconnect"}
    over = [{"type": "http.request", "body": b"0123456", "more_body": True},
            {"type": "http.request", "body": b"7890", "more_body": False}]
    status, headers, body, saw = call(g, {"path": "/page/"}, over)
    assert problem(status, headers, body) == (413, "request body is over the limit of 10 bytes")
    assert "scope" not in saw
    # a client that goes away mid-body gets no answer, and the app never runs
    gone = [{"type": "http.request", "body": b"01", "more_body": True},
            {"type": "http.disconnect"}]
    assert call(g, {"path": "/page/"}, gone) == (None, None, None, {})


def test_minimal_scopes_and_messages_are_understood():
    """ASGI leaves some keys out: a scope without headers or path, a request message without
    ``more_body`` (the body is complete), a response start without headers."""
    g = guard(keyed_reads=True)
    for scope in ({"type": "http"}, {"type": "http", "path": "/api/x"},
                  {"type": "http", "method": "POST", "path": "/api/x"}):
        sent = []

        async def send(message, sent=sent):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b"abc"}  # no more_body: complete

        async def bare(scope, receive, send):
            assert (await receive()) == {"type": "http.request", "body": b"abc",
                                         "more_body": False}
            await send({"type": "http.response.start", "status": 204})  # no headers
            await send({"type": "http.response.body", "body": b""})

        g.app = bare
        asyncio.run(g(scope, receive, send))
        status = sent[0]["status"]
        if scope.get("path") == "/api/x":   # keyed: refused with a challenge, not a crash
            assert status == 401 and sent[0]["headers"][2:] == [(b"www-authenticate",
                                                                 b"Bearer")]
        else:
            assert status == 204 and sent[0]["headers"] == SECURITY_HEADERS
