"""Values exactly on a threshold or on ``min_prob``: the documented inclusive rules.

Every rule here is "at or above": a tag is decided when its probability is at or above its
threshold (:meth:`Tagger.decide`, the live worker), a frame is indexed when a probability
reaches the index's ``min_prob``, and :func:`find_frames` returns frames whose probability
is at least ``min_prob``, from the stop-document index and from the stream alike. A model
with a zero-weight head gives every frame the same, known probabilities, so the tests can
put thresholds and ``min_prob`` exactly on them (and one float32 step above), on a real
RunEngine and after the Tiled round trip.
"""

from __future__ import annotations

import numpy as np
import pytest
from bluesky.plans import count

from bluesky_xsml import TaggingCallback

from .conftest import DocumentRecorder, make_distinct_tagger, make_image_detector, validate_all

FRAMES = 3


@pytest.fixture(scope="module")
def constant():
    """A tagger whose probabilities do not depend on the frame, and those probabilities."""
    t = make_distinct_tagger(spread=0.0)
    frames = [make_image_detector(seed=s).get() for s in range(2)]
    p = t.predict(frames)
    assert (p[0] == p[1]).all(), "a zero-weight head should ignore the frame"
    return t, p[0]


def on_and_above(tagger, probs, on):
    """A copy of ``tagger`` with thresholds exactly on ``probs`` for tags ``on`` and one
    float32 step above them for the rest."""
    from bluesky_xsml import Tagger

    up = np.nextafter(probs, np.float32(2), dtype=np.float32)
    thresholds = np.where(np.isin(np.arange(len(probs)), on), probs, up).astype(np.float32)
    return Tagger(tagger.net, tagger.tags, thresholds=thresholds,
                  metadata={"untrained": True})


def test_decide_is_inclusive(constant):
    tagger, p = constant
    on = [0, 5, 11]
    t = on_and_above(tagger, p, on)
    assert t.decide(p) == [[tagger.tags[i] for i in on]]
    below = np.nextafter(p, np.float32(-1), dtype=np.float32)
    assert on_and_above(tagger, p, range(len(p))).decide(below) == [[]]


def test_live_tags_at_threshold_and_not_one_step_below(RE, constant):
    tagger, p = constant
    on = [1, 4, 9, 20]
    t = on_and_above(tagger, p, on)
    rec = DocumentRecorder()
    xsml = TaggingCallback(t, downstream=[rec])
    RE.subscribe(xsml)
    RE(count([make_image_detector()], FRAMES))
    assert xsml.flush(60)
    xsml.close(10)
    validate_all(rec.docs)
    want = [t.tags[i] for i in on]
    events = rec.tag_events()
    assert len(events) == FRAMES
    for ev in events:
        assert [ev["data"][k] for k in t.tags] == [float(x) for x in p]   # exactly on it
        assert ev["data"]["tags"] == ",".join(want)
    stop = rec.of("stop")[0]
    assert stop["xsml_tag_counts"] == {k: FRAMES for k in want}
    assert stop["xsml_tags"] == sorted(want)


def test_frame_index_and_find_frames_include_min_prob(RE, constant, tmp_path):
    """On ``min_prob`` a frame matches; one step above it, none does; on both query paths."""
    pytest.importorskip("tiled.server", reason="needs tiled[server]")
    from bluesky_xsml.catalog.embedded import EmbeddedCatalog, make_writer
    from bluesky_xsml.query import find_frames

    tagger, p = constant
    k = int(np.argmax(p))                       # the highest tag: it is in the index
    j = int(np.argsort(p)[-2])                  # the index's min_prob sits on this one
    tag, p_k, p_j = tagger.tags[k], float(p[k]), float(p[j])
    with EmbeddedCatalog(tmp_path / "cat") as cat:
        writer = make_writer(cat.catalog)
        xsml = TaggingCallback(tagger, downstream=[writer], index_min_prob=p_j)
        RE.subscribe(xsml)
        (uid,) = RE(count([make_image_detector()], FRAMES))
        assert xsml.flush(60)
        xsml.close(10)
        run = cat.catalog[uid]
        idx = run.metadata["stop"]["xsml_index"]
        assert idx["complete"] and idx["min_prob"] == p_j
        # the index keeps frames whose probability reaches its min_prob, with every such tag
        assert idx["frames"]["seq_num"] == list(range(1, FRAMES + 1))
        assert idx["hits"][tagger.tags[j]]["prob"] == [p_j] * FRAMES
        assert sorted(idx["hits"]) == sorted([tag, tagger.tags[j]])

        for use_index in (True, False):
            at = find_frames(run, tag, min_prob=p_k, use_index=use_index)
            assert list(at["seq_num"]) == list(range(1, FRAMES + 1)), use_index
            assert list(at["probability"]) == [p_k] * FRAMES
            up = float(np.nextafter(np.float32(p_k), np.float32(2)))
            assert find_frames(run, tag, min_prob=up, use_index=use_index).empty, use_index
            # on the index's own min_prob the index answers, for its other tag too
            on_j = find_frames(run, tagger.tags[j], min_prob=p_j, use_index=use_index)
            assert list(on_j["seq_num"]) == list(range(1, FRAMES + 1)), use_index
