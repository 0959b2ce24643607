"""Pictures (bluesky_xsml.plots) and the live terminal view (bluesky_xsml.liveview).

Figures are rendered for real with matplotlib's Agg canvas and saved to
tmp_path; the stored-run path (`xsml plot`) is tested on the demo's catalog in
test_demo.py.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from bluesky_xsml.documents.compose import FrameResult
from bluesky_xsml.liveview import LiveTagView
from bluesky_xsml.plots import (
    display_image,
    frame_montage,
    phase_label,
    phase_map,
    save_figure,
    tag_heatmap,
)
from bluesky_xsml.sim.sample import CombinatorialSample


def _png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    return data


def test_heatmap_outlines_frames_at_or_above_threshold(tmp_path):
    probs = np.zeros((4, 3))
    probs[1, 2] = 0.9
    probs[3] = np.nan                                   # a skipped frame
    fig = tag_heatmap(probs, tags=["a", "b", "c"], thresholds=[0.5, 0.5, 0.95],
                      frame_labels=[10, 11, 12, 13], only_seen=False)
    ax = fig.axes[0]
    outlined = ax.collections[0].get_offsets()
    assert len(outlined) == 0                           # 0.9 < 0.95
    fig = tag_heatmap(probs, tags=["a", "b", "c"], only_seen=True)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["c"]
    assert ax.collections[0].get_offsets().tolist() == [[1.0, 0.0]]
    _png(save_figure(fig, tmp_path / "sub" / "h.png"))
    with pytest.raises(ValueError, match=r"shape \(frames, 3\)"):
        tag_heatmap(np.zeros((2, 4)), tags=["a", "b", "c"])


def test_montage_masks_sentinels_and_captions_frames(tmp_path):
    sample = CombinatorialSample(size=64)
    frames = [sample.frame_at(x, 2.0) for x in (1.0, 5.0, 9.6)]
    img = display_image(frames[0])
    assert np.isnan(img[frames[0] < 0]).all() and np.isfinite(img[frames[0] >= 0]).all()
    u16 = display_image(np.array([[0, 65535, 99]], np.uint16))
    assert np.isnan(u16[0, 1]) and u16[0, 2] == pytest.approx(2.0)
    fig = frame_montage(frames, captions=["halo", "rings", "beam off"], title="t")
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles == ["halo", "rings", "beam off"]
    _png(save_figure(fig, tmp_path / "m.png"))
    fig = frame_montage(frames * 10, max_frames=5)
    assert sum(1 for ax in fig.axes if ax.images) == 5
    with pytest.raises(ValueError, match="2 captions for 3 frames"):
        frame_montage(frames, captions=["a", "b"])
    with pytest.raises(ValueError, match="at least one frame"):
        frame_montage([])


def test_phase_map_groups_frames_by_structure(tmp_path):
    sample = CombinatorialSample(size=64)
    xs, ys = np.meshgrid(np.linspace(0.5, 9.8, 5), np.linspace(0.5, 9.5, 4))
    xs, ys = xs.ravel(), ys.ravel()
    tags = [sample.tags_at(x, y) for x, y in zip(xs, ys)]
    probs = np.array([sample.labels_at(x, y) for x, y in zip(xs, ys)])
    fig = phase_map(xs, ys, tags, probs=probs, truth=sample.region_at, xlabel="x", ylabel="y")
    main = fig.axes[0]
    legend = [t.get_text() for t in main.get_legend().get_texts()]
    assert any(t.startswith("beam_off (") for t in legend)
    assert any(t.startswith("halo_isotropic (") for t in legend)
    assert sum(int(t.rsplit("(", 1)[1].rstrip(")")) for t in legend) == len(xs)
    panel_titles = {ax.get_title() for ax in fig.axes[1:]}
    assert "halo_isotropic" in panel_titles and "detector_gaps" not in panel_titles
    assert {t.get_text() for t in main.texts} >= {"amorphous", "blank"}   # true regions
    _png(save_figure(fig, tmp_path / "p.png"))
    assert phase_label("ring_isotropic,detector_gaps") == "ring_isotropic"
    with pytest.raises(ValueError, match="one entry per frame"):
        phase_map([1, 2], [1], [[], []])


def test_live_view_shows_progress_and_latest_frames():
    from rich.console import Console

    console = Console(file=io.StringIO(), width=120, force_terminal=False)
    view = LiveTagView(positions=["sample_x"], rows=2, console=console)
    view.document("start", {"uid": "u1", "scan_id": 7, "plan_name": "scan", "num_points": 3})
    view.document("descriptor", {"uid": "d1", "name": "primary"})
    for seq, x in ((1, 0.5), (2, 1.5), (3, 2.5)):
        view.document("event", {"descriptor": "d1", "seq_num": seq,
                                "data": {"sample_x": x, "img": None}})
    view.document("event", {"descriptor": "unknown", "seq_num": 1})   # malformed: ignored
    with view:
        view.results("u1", [FrameResult("primary", 1, "e1", "img", 0, [0.1], tags=("beam_off",),
                                         latency=0.02)])
        view.results("u1", [
            FrameResult("primary", 2, "e2", "img", 0, [0.9], tags=("ring_isotropic",
                                                                   "detector_gaps")),
            FrameResult("primary", 3, "e3", "img", 0, None, skip_reason="read_error: gone")])
    text = console.file.getvalue()
    assert "scan 7 scan" in text and "3/3" in text
    assert "ring_isotropic" in text and "skipped: read_error: gone" in text
    assert "detector_gaps" not in text                 # hidden instrument tag
    assert "beam_off" not in text                      # only the 2 latest rows are kept
    assert "1.50" in text and "2.50" in text
    assert view.frames == 3 and view.skipped == 1
