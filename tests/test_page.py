"""The live page in headless Chromium, with a real RunEngine and TaggingCallback.

Debian's chromium (``/usr/bin/chromium``) is driven by Playwright (its own
browser download is not used). With fine-tuning on, the test loads the page,
runs scans over ``ophyd.sim.SynAxis`` motors, sees the tags arrive over the
live feed with the scan id, plan, run state and motor position of each frame,
reads the newest frame's probability bars and the decisions with their ages
and policy, moves a threshold (confirmed, then reset to the model's defaults)
and corrects one frame. With fine-tuning off, it checks the model controls are
hidden behind one notice and nothing asks for them, that the newest frame's
picture is never blank while the next one loads (thumbnails slowed by
Chromium's network emulation), and that the threshold grid's labels do not
overlap at 1400 and 900 px.
"""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest
from bluesky import RunEngine
from bluesky.plans import count, scan
from ophyd.sim import SynAxis

from bluesky_xsml import Tagger, TaggingCallback
from bluesky_xsml.api.serve import serve
from bluesky_xsml.model import TaggerNetConfig
from bluesky_xsml.steering.policy import Policy, PolicyEngine, Rule
from bluesky_xsml.tags import TAG_NAMES

from .conftest import make_image_detector

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")

CHROMIUM = os.environ.get("XSML_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
TINY = TaggerNetConfig(widths=(8,), depths=(1,), stem_width=8)


@pytest.fixture
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no chromium at {CHROMIUM} (Debian package 'chromium'; or set XSML_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield b
        b.close()


def _watch(page) -> list:
    """Collect page errors and every 4xx/5xx answer the page gets."""
    errors: list = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400
            else None)
    return errors


def _records(service) -> list[dict]:
    return service.app.state.service.latest(1000)


def test_page_shows_live_tags_and_sends_a_correction(browser, tmp_path):
    tagger = Tagger.untrained(seed=3, config=TINY)
    xsml = TaggingCallback(tagger, threads=1, max_wait=0.01)
    xsml.enable_finetuning(tmp_path / "ft", auto=False, synthetic=None, synthetic_val=None)
    RE = RunEngine({}, call_returns_result=False)
    RE.subscribe(xsml)
    # every tagged frame asks to refine: decisions (and their history) are certain
    engine = PolicyEngine(Policy(name="refine-everything", rules=[
        Rule(name="any_tag", kind="latest", tags=list(TAG_NAMES), action="refine")]))
    service = serve(xsml, port=0, announce=False, policy_engine=engine)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = _watch(page)
    answers: list[bool] = []  # what to answer the page's confirm() dialogs, in order
    dialogs: list[str] = []

    def on_dialog(d):
        dialogs.append(d.message)
        d.accept() if answers.pop(0) else d.dismiss()

    page.on("dialog", on_dialog)
    try:
        RE(count([make_image_detector(shape=(64, 80), seed=5)], 2))  # before the page opens
        assert xsml.flush(60)
        page.goto(service.page_url)
        page.wait_for_selector("body[data-ready='1']", timeout=20_000)
        assert page.inner_text("#frame-count") == "2"  # what the timeline shows
        assert page.inner_text("#live-count") == "0"
        assert page.locator("#thresholds input[type=range]").count() == len(tagger.tags)
        assert "#key=" not in page.url  # the key is taken out of the address bar
        # fine-tuning is on: its controls are there and no notice says otherwise
        assert page.is_visible("#retrain") and page.is_visible("#rollback")
        assert not page.is_visible("#ft-notice")

        # live tags arrive while the page is open, each saying where it was taken
        sx = SynAxis(name="sample_x")
        RE(scan([make_image_detector(shape=(64, 80), seed=1)], sx, 0.0, 1.4, 8))
        assert xsml.flush(60)
        start_uid = service.app.state.service.runbook.uids()[-1]
        run = service.app.state.service.run(start_uid)
        scan_id = run["scan_id"]
        page.wait_for_function("() => document.querySelector('#frame-count').textContent === "
                               "'10'", timeout=20_000)
        assert page.inner_text("#live-count") == "8"
        cards = page.locator(".frame-card")
        assert cards.count() == 10
        page.wait_for_function(
            "() => [...document.querySelectorAll('.frame-card img')].length === 10 && "
            "[...document.querySelectorAll('.frame-card img')].every(i => i.complete "
            "&& i.naturalWidth > 0)", timeout=20_000)
        card5 = page.locator(f".frame-card[data-seq='5'][data-run='{start_uid}']")
        assert card5.locator(".scan").inner_text() == f"scan {scan_id} · scan · primary #5"
        assert "sample_x 0.800" in card5.locator(".where").inner_text()
        card5.locator(".runstate", has_text="finished").wait_for(timeout=10_000)
        assert "frames/s" in page.inner_text("#status")

        # the newest frame: picture, where, and one bar per tag as wide as its probability
        newest = _records(service)[-1]
        page.wait_for_selector(f"#current-view[data-frame-id='{newest['id']}']", timeout=10_000)
        assert page.inner_text("#current-title").startswith(f"scan {scan_id} · scan · primary #8")
        assert "sample_x 1.400" in page.inner_text("#current-where")
        bars = page.evaluate("""() => [...document.querySelectorAll('#current-probs .prob')]
            .map(r => ({tag: r.dataset.tag, on: r.classList.contains('on'),
                        frac: r.querySelector('.fill').getBoundingClientRect().width /
                              r.querySelector('.bar').getBoundingClientRect().width}))""")
        assert {b["tag"] for b in bars} == set(tagger.tags)
        for b in bars:
            assert b["frac"] == pytest.approx(newest["probs"][b["tag"]], abs=0.01), b
            assert b["on"] == (b["tag"] in newest["tags"])

        # decisions: the current one with its policy, rule, age and where; the earlier ones
        current = engine.current
        page.wait_for_selector(f"#decision-box[data-uid='{current.uid}']", timeout=10_000)
        assert page.inner_text("#decision-action") == current.action == "refine"
        assert page.inner_text("#decision-policy") == "policy refine-everything · rule any_tag"
        assert re.search(r"made \d+ s ago \(\d\d:\d\d:\d\d\)", page.inner_text("#decision-age"))
        assert f"scan {scan_id}" in page.inner_text("#decision-where")
        x = 0.2 * (current.evidence[-1].seq_num - 1)  # the scan's points: 0, 0.2, ... 1.4
        assert f"sample_x {x:.3f}" in page.inner_text("#decision-where")
        evidence = page.locator("#decision-evidence li").all_inner_texts()
        assert evidence and all(f"scan {scan_id}" in e and "sample_x" in e for e in evidence)
        past = page.locator("#decision-history li.past")
        expected = [h for h in engine.history if h.uid != current.uid][-10:]
        assert len(expected) >= 1 and past.count() == len(expected)
        assert all(re.search(r"\d\d:\d\d:\d\d, \d+ s ago", t) for t in
                   past.locator(".age").all_inner_texts())
        # the decision's run has ended: the page says the decision is stale
        page.wait_for_function("() => document.querySelector('#decision-age').textContent"
                               ".includes('stale: its run finished')", timeout=10_000)

        # a threshold change needs a confirmation; the timeline and chips keep past tags
        counts = {t: sum(t in r["tags"] for r in _records(service)) for t in tagger.tags}
        tag = max(counts, key=counts.get)  # a tag some frames were given
        assert counts[tag] > 0
        default = float(tagger.thresholds[tagger.tags.index(tag)])
        slider = page.locator(f"#thresholds input[data-tag='{tag}']")
        answers.append(False)
        slider.fill("0.99")
        page.wait_for_function("t => document.querySelector('#threshold-result').textContent"
                               ".includes(t + ' threshold left at')", arg=tag, timeout=10_000)
        assert dialogs[-1].startswith(f"Set the {tag} threshold from {default:.2f} to 0.99")
        assert float(tagger.thresholds[tagger.tags.index(tag)]) == pytest.approx(default)
        assert float(slider.input_value()) == pytest.approx(default)

        before = page.evaluate("() => document.querySelector('#timeline').toDataURL()")
        chips = page.locator(".frame-card .chips").all_inner_texts()
        answers.append(True)
        slider.fill("0.99")
        page.wait_for_function("t => document.querySelector('#threshold-result').textContent"
                               ".includes(t + ' threshold is now 0.99')", arg=tag, timeout=10_000)
        assert float(tagger.thresholds[tagger.tags.index(tag)]) == pytest.approx(0.99)
        page.evaluate("() => drawTimeline()")  # as any frame arriving would
        assert page.evaluate("() => document.querySelector('#timeline').toDataURL()") == before
        assert page.locator(".frame-card .chips").all_inner_texts() == chips
        assert page.locator(f"label.threshold.moved[data-tag='{tag}']").count() == 1

        # reset to the checkpoint's thresholds (confirmed too)
        answers.append(True)
        page.click("#reset-thresholds")
        page.wait_for_function("() => document.querySelector('#threshold-result').textContent"
                               ".startsWith('reset ')", timeout=10_000)
        assert "to the model's defaults" in dialogs[-1]
        np.testing.assert_allclose(tagger.thresholds, tagger.default_thresholds, atol=1e-6)
        assert float(slider.input_value()) == pytest.approx(default)
        assert page.locator("label.threshold.moved").count() == 0

        # correct one frame: flip ring_oriented on event 5
        card5.click()
        assert page.inner_text("#current-mode") == "pinned"
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
        row = dict(zip(ft.replay.tags, labels[0], strict=True))
        assert row["ring_oriented"] == float(not was)
        card_tags = card5.locator(".chip").all_inner_texts()
        shown = set(card_tags) - {"ring_oriented"}  # the other tags are sent as shown
        assert all(row[t] == (1.0 if t in shown else 0.0) for t in tagger.tags
                   if t != "ring_oriented")
        assert np.isfinite(labels[0]).all()

        # the model section lists the checkpoint
        page.wait_for_selector(f"#checkpoints tr[data-id='{tagger.checkpoint_id}']",
                               timeout=15_000)
        assert not answers
        assert not errors, errors
    finally:
        page.close()
        service.stop()
        xsml.close()


SAMPLER = """() => {
  window.__samples = [];
  window.__sampler = setInterval(() => {
    const img = document.querySelector('#current-img');
    const view = document.querySelector('#current-view');
    const cards = [...document.querySelectorAll('.frame-card img')];
    window.__samples.push({
      id: img ? img.dataset.frameId || '' : null,
      shown: !!img && !img.hidden && img.complete && img.naturalWidth > 0,
      view: view ? view.dataset.frameId || '' : null,
      cards: cards.length, cardsLoaded: cards.every(i => i.complete && i.naturalWidth > 0),
    });
  }, 10);
}"""


def _no_overlap(page) -> list[str]:
    """Problems with the threshold grid's layout: overlapping or truncated parts."""
    return page.evaluate("""() => {
      const out = [];
      const boxes = [];
      for (const lab of document.querySelectorAll('#thresholds label.threshold')) {
        const parts = ['.name', 'input', '.value'].map(s => lab.querySelector(s)
          .getBoundingClientRect());
        const [name, input, value] = parts;
        const t = lab.dataset.tag;
        if (name.right > input.left + 0.5) out.push(`${t}: name runs into its slider`);
        if (input.right > value.left + 0.5) out.push(`${t}: slider runs into its value`);
        const n = lab.querySelector('.name');
        if (n.scrollWidth > n.clientWidth) out.push(`${t}: name cut short`);
        if (input.width < 40) out.push(`${t}: slider only ${input.width}px`);
        for (const p of parts) boxes.push([t, p]);
      }
      for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
        const [ta, a] = boxes[i], [tb, b] = boxes[j];
        if (ta === tb) continue;
        if (a.left < b.right - 0.5 && b.left < a.right - 0.5 && a.top < b.bottom - 0.5
            && b.top < a.bottom - 0.5) out.push(`${ta} overlaps ${tb}`);
      }
      return out;
    }""")


def test_page_without_fine_tuning_never_shows_a_blank_frame(browser, tmp_path):
    tagger = Tagger.untrained(seed=4, config=TINY)
    xsml = TaggingCallback(tagger, threads=1, max_wait=0.01)
    RE = RunEngine({}, call_returns_result=False)
    RE.subscribe(xsml)
    service = serve(xsml, port=0, announce=False)
    det = make_image_detector(shape=(64, 80), seed=2)
    RE(count([det], 5))  # before the page opens
    assert xsml.flush(60)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = _watch(page)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    try:
        # every request waits 300 ms (Chromium's network emulation): thumbnails load slowly
        cdp = page.context.new_cdp_session(page)
        cdp.send("Network.enable")
        cdp.send("Network.emulateNetworkConditions", {
            "offline": False, "latency": 300, "downloadThroughput": -1,
            "uploadThroughput": -1})
        page.goto(service.page_url)
        page.wait_for_selector("body[data-ready='1']", timeout=20_000)

        # a fresh page counts the frames its timeline shows
        assert page.inner_text("#frame-count") == "5"
        assert page.inner_text("#live-count") == "0"
        assert page.locator("#timeline-axis .run-mark").count() == 1

        # fine-tuning is off: one notice, no model controls, nothing asked of the model routes
        assert page.is_visible("#ft-notice")
        assert "Fine-tuning is off" in page.inner_text("#ft-notice")
        for sel in ("#retrain", "#rollback", "#checkpoints"):
            assert not page.is_visible(sel), sel
        assert "show it above" in page.inner_text("#frames-hint")
        assert "correct" not in page.inner_text("#frames-hint")

        # frames arrive while thumbnails are slow: the newest picture is never blank
        page.evaluate(SAMPLER)
        RE(count([det], 12, delay=0.15))
        RE(count([det], 20))
        assert xsml.flush(60)
        last = _records(service)[-1]["id"]
        page.wait_for_selector(f"#current-img[data-frame-id='{last}']", timeout=20_000)
        samples = page.evaluate("() => { clearInterval(window.__sampler); "
                                "return window.__samples; }")
        assert len(samples) > 100
        shown = [s for s in samples if s["id"]]
        assert shown and all(s["shown"] for s in shown), [s for s in shown if not s["shown"]][:3]
        assert len({s["id"] for s in shown}) >= 3  # it did move on as frames came
        assert all(s["cardsLoaded"] for s in samples)  # card pictures appear only once loaded
        # while a picture loads its place is a grey placeholder, not black (beam_off)
        bg = page.evaluate("""() => { const d = document.createElement('div');
            d.className = 'thumb placeholder'; document.body.append(d);
            const s = getComputedStyle(d).backgroundImage; d.remove(); return s; }""")
        assert "gradient" in bg and "rgb(0, 0, 0)" not in bg

        # the timeline: every frame counted, every run's start marked with its scan id
        assert page.inner_text("#frame-count") == "37"
        assert page.inner_text("#live-count") == "32"
        runs = service.app.state.service.runs()
        marks = page.locator("#timeline-axis .run-mark")
        assert marks.count() == 3
        assert sorted(int(m.get_attribute("data-scan-id")) for m in marks.all()) == sorted(
            r["scan_id"] for r in runs)
        assert page.locator("#timeline-axis .tick").count() >= 1
        assert all(re.fullmatch(r"#\d+", t) for t in
                   page.locator("#timeline-axis .tick").all_inner_texts())

        # clicking a frame shows it (pinned) and opens no editor
        page.locator(".frame-card").nth(3).click()
        assert page.inner_text("#current-mode") == "pinned"
        assert not page.is_visible("#editor")
        page.click("#current-live")
        assert page.inner_text("#current-mode") == "live"

        # the threshold grid reads at both widths
        for width in (1400, 900):
            page.set_viewport_size({"width": width, "height": 1000})
            page.wait_for_timeout(100)
            assert _no_overlap(page) == [], width
        page.wait_for_timeout(2500)  # a status poll or two
        assert not [u for u in requests if "/api/checkpoints" in u or "/api/finetune" in u]
        assert not errors, errors
    finally:
        page.close()
        service.stop()
        xsml.close()


def test_pinned_frame_lists_frames_like_it(browser, tmp_path):
    """Clicking a frame card shows the frames most like it (the /similar route)."""
    from bluesky_xsml.training.novelty_fit import fit_novelty

    tagger = Tagger.untrained(seed=4, config=TINY, precision="fp32")
    rng = np.random.default_rng(0)
    fit_novelty(tagger, [rng.poisson(4, (64, 80)).astype(np.uint32) for _ in range(60)],
                [rng.poisson(4, (64, 80)).astype(np.uint32) for _ in range(40)],
                embedding_dim=8)
    xsml = TaggingCallback(tagger, threads=1, max_wait=0.01)
    RE = RunEngine({}, call_returns_result=False)
    RE.subscribe(xsml)
    service = serve(xsml, port=0, announce=False)
    RE(count([make_image_detector(shape=(64, 80), seed=2)], 6))
    assert xsml.flush(60)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = _watch(page)
    try:
        page.goto(service.page_url)
        page.wait_for_selector("body[data-ready='1']", timeout=20_000)
        assert not page.is_visible("#similar")
        card = page.locator("#frames .frame-card").nth(2)
        seq = card.get_attribute("data-seq")
        card.click()
        page.wait_for_selector("#similar-list .similar-item", timeout=20_000)
        items = page.locator("#similar-list .similar-item")
        assert items.count() == 5  # the run's other frames
        assert seq not in [i.get_attribute("data-seq") for i in items.all()]
        sims = [float(i.locator(".sim").inner_text()) for i in items.all()]
        assert sims == sorted(sims, reverse=True)
        assert f"#{seq}" in page.inner_text("#similar-title")
        page.click("#current-live")
        assert not page.is_visible("#similar")
        assert not errors, errors
    finally:
        page.close()
        service.stop()
        xsml.close()


def test_a_frame_without_a_thumbnail_says_why(browser, tmp_path):
    """A frame whose thumbnail is gone shows the thumbnail route's reason (its 404 detail),
    on its card (the title) and in the current view when pinned."""
    from bluesky_xsml.api.settings import ServiceSettings

    tagger = Tagger.untrained(seed=4, config=TINY)
    xsml = TaggingCallback(tagger, threads=1, max_wait=0.01)
    RE = RunEngine({}, call_returns_result=False)
    RE.subscribe(xsml)
    service = serve(xsml, port=0, announce=False, settings=ServiceSettings(thumbnails=3))
    RE(count([make_image_detector(shape=(64, 80), seed=2)], 6))
    assert xsml.flush(60)
    reason = service.app.state.service.no_thumbnail_reason()
    assert reason == "only the last 3 tagged frames have one"
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors = _watch(page)
    try:
        page.goto(service.page_url)
        page.wait_for_selector("body[data-ready='1']", timeout=20_000)
        cards = page.locator("#frames .frame-card")
        assert cards.count() == 6
        # the newest three have pictures; the older three say why they have none
        page.wait_for_function("() => document.querySelectorAll("
                               "'#frames .frame-card .thumb[title]').length === 3",
                               timeout=20_000)
        for i in range(6):
            thumb = cards.nth(i).locator(".thumb")
            if i < 3:
                assert thumb.locator("img").count() == 1, i
                assert thumb.get_attribute("title") is None, i
            else:
                assert thumb.inner_text() == "no preview", i
                assert thumb.get_attribute("title") == f"no preview: {reason}", i
        # pinned, the current view says it in words
        cards.nth(4).click()
        page.wait_for_function("() => document.querySelector('#current-note').textContent"
                               ".startsWith('no preview kept')", timeout=20_000)
        assert page.inner_text("#current-note") == f"no preview kept for this frame: {reason}"
        detail = page.get_attribute("#current-view", "title")
        assert detail.startswith("no thumbnail for frame 0 of event") and detail.endswith(reason)
        # back to live: the newest frame's picture, and no reason left over
        page.click("#current-live")
        page.wait_for_selector("#current-img:not([hidden])", timeout=20_000)
        assert page.inner_text("#current-note") == ""
        assert page.get_attribute("#current-view", "title") in (None, "")
        # the only errors are the missing thumbnails' 404s
        assert errors and all(e.startswith("404 ") and "/thumbnail.png" in e for e in errors), \
            errors
    finally:
        page.close()
        service.stop()
        xsml.close()
