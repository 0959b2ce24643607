"""The live page in headless Chromium, with a real RunEngine and TaggingCallback.

Debian's chromium (``/usr/bin/chromium``) is driven by Playwright (its own
browser download is not used). The test loads the page, runs a scan, sees the
tags arrive over the live feed, moves a threshold slider, corrects one frame
and checks the label reached the callback's fine-tuner.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.plans import count

from bluesky_xsml import Tagger, TaggingCallback
from bluesky_xsml.model import TaggerNetConfig

from .conftest import make_image_detector

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

CHROMIUM = os.environ.get("XSML_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM} (Debian package 'chromium'; or set XSML_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield b
        b.close()


def test_page_shows_live_tags_and_sends_a_correction(browser, tmp_path):
    tagger = Tagger.untrained(seed=3, config=TaggerNetConfig(widths=(8,), depths=(1,),
                                                              stem_width=8))
    xsml = TaggingCallback(tagger, threads=1, max_wait=0.01)
    xsml.enable_finetuning(tmp_path / "ft", auto=False, synthetic=None, synthetic_val=None)
    RE = RunEngine({}, call_returns_result=False)
    RE.subscribe(xsml)
    service = xsml.serve(port=0, announce=False)
    page = browser.new_page()
    errors: list = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400
            else None)
    try:
        page.goto(service.page_url)
        page.wait_for_selector("body[data-ready='1']", timeout=20_000)
        assert page.inner_text("#frame-count") == "0"
        assert page.locator("#thresholds input[type=range]").count() == len(tagger.tags)
        assert "#key=" not in page.url  # the key is taken out of the address bar

        # live tags arrive while the page is open
        RE(count([make_image_detector(shape=(64, 80), seed=1)], 8))
        assert xsml.flush(60)
        page.wait_for_function("() => document.querySelector('#frame-count').textContent === '8'",
                               timeout=20_000)
        cards = page.locator(".frame-card")
        assert cards.count() == 8
        page.wait_for_function(
            "() => [...document.querySelectorAll('.frame-card img')].every(i => i.complete "
            "&& i.naturalWidth > 0)", timeout=20_000)
        assert page.inner_text("#decision-action") == service.app.state.service.engine \
            .current.action
        assert "frames/s" in page.inner_text("#status")

        # a threshold slider changes the live tagger
        slider = page.locator("#thresholds input[data-tag='streaks']")
        slider.fill("0.2")
        page.wait_for_function("() => document.querySelector('#threshold-result').textContent"
                               ".includes('streaks threshold is now 0.20')", timeout=10_000)
        assert float(tagger.thresholds[tagger.tags.index("streaks")]) == pytest.approx(0.2)

        # correct one frame: flip ring_oriented on event 5
        page.locator(".frame-card[data-seq='5']").click()
        toggle = page.locator("#editor-tags input[data-tag='ring_oriented']")
        was = toggle.is_checked()
        toggle.set_checked(not was)
        page.click("#send-labels")
        page.wait_for_function("() => document.querySelector('#label-result').textContent"
                               ".startsWith('stored')", timeout=20_000)
        ft = xsml.finetuner
        assert ft.status()["labels"] == 1
        _, labels, prov = ft.replay.merged()
        assert prov[0]["seq_num"] == 5 and prov[0]["source"] == "label"
        row = dict(zip(ft.replay.tags, labels[0]))
        assert row["ring_oriented"] == float(not was)
        card_tags = page.locator(".frame-card[data-seq='5'] .chip").all_inner_texts()
        shown = set(card_tags) - {"ring_oriented"}  # the other tags are sent as shown
        assert all(row[t] == (1.0 if t in shown else 0.0) for t in tagger.tags
                   if t != "ring_oriented")
        assert np.isfinite(labels[0]).all()

        # the model section lists the checkpoint
        page.wait_for_selector(f"#checkpoints tr[data-id='{tagger.checkpoint_id}']",
                               timeout=15_000)
        assert not errors, errors
    finally:
        page.close()
        service.stop()
        xsml.close()
