"""The run summary accumulator (``bluesky_xsml.summary.RunSummary``): one place for it."""

from __future__ import annotations

import math

from bluesky_xsml.documents.compose import FrameResult
from bluesky_xsml.summary import SUMMARY_KEYS, RunSummary, skip_slug


def _tagged(tags, checkpoint="c1", novel=False, seq=0):
    return FrameResult("primary", seq, "", "img", 0, [0.9], tags=tuple(tags),
                       checkpoint=checkpoint, novel=novel)


def _skipped(reason, checkpoint="c1", seq=0):
    return FrameResult("primary", seq, "", "img", 0, None, skip_reason=reason,
                       checkpoint=checkpoint, latency=math.nan)


def test_counts_tags_skips_models_and_novel_frames():
    s = RunSummary()
    s.add([_tagged(["ring", "halo"]), _tagged(["ring"], novel=True)])
    s.add([_skipped("read_error: file gone"), _skipped("read_error: again"),
           _skipped("overflow"), _tagged([], checkpoint="c2")])
    out = s.as_dict(stream_name="xsml_tags", checkpoint_id="c0", novel=True)
    assert out == {
        "xsml_stream": "xsml_tags",
        "xsml_tags": ["halo", "ring"],
        "xsml_tag_counts": {"halo": 1, "ring": 2},
        "xsml_model": "c2",                  # the checkpoint that tagged last
        "xsml_models": ["c1", "c2"],         # in order, each once
        "xsml_frames": 6,                    # tagged and skipped
        "xsml_skipped": {"overflow": 1, "read_error": 2},
        "xsml_novel": 1,
    }
    assert list(out)[:len(SUMMARY_KEYS)] == list(SUMMARY_KEYS)
    assert s.tagged == 3


def test_skipped_frames_name_no_model_and_count_no_tags_or_novelty():
    s = RunSummary()
    # a skip's checkpoint is the model that would have tagged it: not one that tagged
    s.add([_skipped("stop_timeout", checkpoint="c9")])
    out = s.as_dict(stream_name="t", checkpoint_id="c0")
    assert out["xsml_model"] == "c0" and out["xsml_models"] == []
    assert out["xsml_tags"] == [] and out["xsml_frames"] == 1
    assert "xsml_novel" not in out            # only live tagging writes it


def test_empty_summary_and_json_types():
    out = RunSummary().as_dict(stream_name="s", checkpoint_id="c0", novel=True)
    assert out["xsml_frames"] == 0 and out["xsml_skipped"] == {} and out["xsml_novel"] == 0
    assert out["xsml_model"] == "c0"
    s = RunSummary()
    s.add([_tagged(["ring"])] * 3)
    counts = s.as_dict(stream_name="s", checkpoint_id="c")["xsml_tag_counts"]
    assert type(counts["ring"]) is int        # not a numpy or Counter type


def test_skip_slug():
    assert skip_slug("read_error: OSError: gone") == "read_error"
    assert skip_slug("overflow") == "overflow"


def test_bus_and_retag_summaries_are_the_accumulators():
    """``scaleout.worker.summarize`` is the accumulator's summary (no second copy)."""
    from bluesky_xsml.scaleout.worker import summarize

    results = [_tagged(["ring"]), _skipped("no_data"), _tagged(["halo"], checkpoint="c2")]
    s = RunSummary()
    s.add(results)
    assert summarize(results, stream_name="x", checkpoint_id="c0") == s.as_dict(
        stream_name="x", checkpoint_id="c0")
