"""The live page when reads need the API key (``keyed_reads=True``), in headless Chromium.

The service runs on loopback with a real RunEngine and TaggingCallback, as in
``test_page.py``. Opened with ``#key=...`` the page must show live frames:
feed, pictures and all, although ``EventSource`` and ``<img>`` cannot send the
key header (they ride on the read cookie). Opened without a key it must show
one notice instead of a stream of failed requests, and start once a key is
entered. With open reads and a wrong key it shows the data and says the key
was refused. Set ``XSML_PAGE_SHOTS=DIR`` to keep a screenshot of the notice there.
"""

from __future__ import annotations

import os

import httpx
import pytest
from bluesky import RunEngine
from bluesky.plans import count

from bluesky_xsml import Tagger, TaggingCallback
from bluesky_xsml.api.security import read_cookie_name, read_token
from bluesky_xsml.api.serve import serve
from bluesky_xsml.api.settings import ServiceSettings

from .conftest import make_image_detector
from .test_page import TINY, _watch, browser  # noqa: F401  (browser: the fixture)

NOTICE = "This service needs the API key to show data; enter it above."

ALL_PICTURES = ("n => [...document.querySelectorAll('.frame-card img')].length === n && "
                "[...document.querySelectorAll('.frame-card img')].every(i => i.complete "
                "&& i.naturalWidth > 0)")


@pytest.fixture
def keyed(tmp_path):
    """A tagging callback, a RunEngine and a service whose reads need the key."""
    tagger = Tagger.untrained(seed=5, config=TINY)
    xsml = TaggingCallback(tagger, threads=1, max_wait=0.01)
    RE = RunEngine({}, call_returns_result=False)
    RE.subscribe(xsml)
    service = serve(xsml, port=0, announce=False,
                         settings=ServiceSettings(keyed_reads=True))
    try:
        yield RE, xsml, service
    finally:
        service.stop()
        xsml.close()


def test_page_with_the_key_shows_live_frames_with_keyed_reads(browser, keyed):  # noqa: F811
    RE, xsml, service = keyed
    det = make_image_detector(shape=(64, 80), seed=3)
    RE(count([det], 2))  # before the page opens
    assert xsml.flush(180)
    # reads are keyed: without the key the API answers nothing
    assert httpx.get(f"{service.url}/api/status").status_code == 401

    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors = _watch(page)
    try:
        page.goto(service.page_url)
        page.wait_for_selector("body[data-ready='1']", timeout=20_000)
        assert "#key=" not in page.url
        assert page.inner_text("#frame-count") == "2"
        assert "frames/s" in page.inner_text("#status")
        assert not page.is_visible("#key-notice")

        # the live feed (EventSource) and the pictures (<img>) get through
        RE(count([det], 4))
        assert xsml.flush(180)
        page.wait_for_function("() => document.querySelector('#live-count').textContent "
                               "=== '4'", timeout=20_000)
        assert page.inner_text("#frame-count") == "6"
        page.wait_for_function(ALL_PICTURES, arg=6, timeout=20_000)
        last = service.app.state.service.latest(10)[-1]["id"]
        page.wait_for_selector(f"#current-img[data-frame-id='{last}']", timeout=20_000)

        # the read cookie: HttpOnly (the page's script cannot see it), Strict, not the key
        cookies = {c["name"]: c for c in context.cookies()}
        c = cookies[read_cookie_name(service.api_key)]
        assert c["httpOnly"] and c["sameSite"] == "Strict" and c["path"] == "/api/"
        assert c["value"] == read_token(service.api_key) != service.api_key
        assert page.evaluate("() => document.cookie") == ""
        page.wait_for_timeout(2500)  # a status poll or two, all answered
        assert not errors, errors
    finally:
        context.close()


def test_page_without_the_key_shows_one_notice_then_starts(browser, keyed):  # noqa: F811
    RE, xsml, service = keyed
    det = make_image_detector(shape=(64, 80), seed=4)
    RE(count([det], 3))
    assert xsml.flush(180)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors = _watch(page)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    try:
        page.goto(f"{service.url}/page/")
        page.wait_for_selector("body[data-ready='1']", timeout=20_000)
        assert page.is_visible("#key-notice")
        assert page.inner_text("#key-notice") == NOTICE
        assert page.inner_text("#status") == "waiting for the API key"
        assert page.inner_text("#frame-count") == "0"
        page.wait_for_timeout(4500)  # two status polls' worth: nothing more is asked
        assert errors == [f"401 {service.url}/api/status"], errors
        assert not [u for u in requests if "/api/feed" in u or "thumbnail" in u]
        shots = os.environ.get("XSML_PAGE_SHOTS")
        shot = page.screenshot(full_page=False)
        assert len(shot) > 1000
        if shots:
            os.makedirs(shots, exist_ok=True)
            with open(os.path.join(shots, "page-needs-key.png"), "wb") as f:
                f.write(shot)

        # a wrong key: still the notice, which now says the key was refused
        page.fill("#key-input", service.api_key[:-1] + "?")
        page.press("#key-input", "Enter")
        page.wait_for_function("() => document.querySelector('#key-notice').textContent"
                               ".includes('The key this page has was refused')", timeout=10_000)
        assert page.inner_text("#key-notice").startswith(NOTICE)
        assert page.inner_text("#frame-count") == "0"

        # the right key: the notice goes, the frames, pictures and live feed come
        page.fill("#key-input", service.api_key)
        page.press("#key-input", "Enter")
        page.wait_for_function("() => document.querySelector('#frame-count').textContent "
                               "=== '3'", timeout=20_000)
        assert not page.is_visible("#key-notice")
        page.wait_for_function(ALL_PICTURES, arg=3, timeout=20_000)
        RE(count([det], 2))
        assert xsml.flush(180)
        page.wait_for_function("() => document.querySelector('#live-count').textContent "
                               "=== '2'", timeout=20_000)
        page.wait_for_function(ALL_PICTURES, arg=5, timeout=20_000)
        assert "frames/s" in page.inner_text("#status")
        # the failed requests are the first status read and the wrong key's two tries
        assert sorted(errors) == sorted([f"401 {service.url}/api/status",
                                         f"403 {service.url}/api/session",
                                         f"403 {service.url}/api/status"]), errors
    finally:
        context.close()


def test_page_with_a_wrong_key_and_open_reads_says_so(browser, tmp_path):  # noqa: F811
    """Loopback, reads open: the page shows data, and that its key will not change anything."""
    xsml = TaggingCallback(Tagger.untrained(seed=6, config=TINY), threads=1, max_wait=0.01)
    service = serve(xsml, port=0, announce=False)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = _watch(page)
    try:
        page.goto(f"{service.url}/page/#key=not-the-key-0123456789")
        page.wait_for_selector("body[data-ready='1']", timeout=20_000)
        assert "frames/s" in page.inner_text("#status")
        assert page.is_visible("#key-notice")
        assert page.inner_text("#key-notice") == ("The API key entered was refused: changes "
                                                  "made here will be refused too.")
        assert errors == [f"403 {service.url}/api/session"], errors
        page.fill("#key-input", service.api_key)
        page.press("#key-input", "Enter")
        page.wait_for_selector("#key-notice", state="hidden", timeout=10_000)
    finally:
        page.close()
        service.stop()
        xsml.close()
