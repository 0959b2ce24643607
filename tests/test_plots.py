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


def _drawn(fig):
    """Draw ``fig`` on an Agg canvas (as ``savefig`` does); return the renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    return fig.canvas.get_renderer()


def _inside_figure(fig, artist, renderer) -> bool:
    """Whether ``artist`` lies within the figure's area (what a PNG of it shows)."""
    box, page = artist.get_window_extent(renderer), fig.bbox
    return (box.x0 >= page.x0 - 0.5 and box.y0 >= page.y0 - 0.5
            and box.x1 <= page.x1 + 0.5 and box.y1 <= page.y1 + 0.5)


def _assert_every_axis_labelled(fig):
    """Every drawn axis has an x and a y label; every colour bar has a label."""
    for ax in fig.axes:
        bar = getattr(ax, "_colorbar", None)
        if bar is not None:
            assert (ax.get_ylabel() or ax.get_xlabel()).strip(), "a colour bar without a label"
        elif ax.axison:
            assert ax.get_xlabel().strip() and ax.get_ylabel().strip(), \
                f"axes {ax.get_title()!r}: xlabel {ax.get_xlabel()!r}, ylabel {ax.get_ylabel()!r}"


def _legends(fig) -> list:
    """The figure's legends and its axes' legends."""
    return [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]


#: The demo's eight phases (structure tags of a frame), the longest names included.
PHASES = ["halo_isotropic", "peaks_lattice", "beam_off", "peaks_on_ring+ring_textured",
          "ring_oriented", "halo_isotropic+peaks_on_ring+ring_isotropic",
          "peaks_on_ring+ring_isotropic", "ring_textured"]


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
    tags = [sample.tags_at(x, y) for x, y in zip(xs, ys, strict=True)]
    probs = np.array([sample.labels_at(x, y) for x, y in zip(xs, ys, strict=True)])
    fig = phase_map(xs, ys, tags, probs=probs, truth=sample.region_at, xlabel="x", ylabel="y")
    main = fig.axes[0]
    legend = [t.get_text() for t in _legends(fig)[0].get_texts()]
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
    import event_model
    from rich.console import Console

    console = Console(file=io.StringIO(), width=120, force_terminal=False)
    view = LiveTagView(positions=["sample_x"], rows=2, console=console)
    run = event_model.compose_run(metadata={"scan_id": 7, "plan_name": "scan", "num_points": 3})
    desc = run.compose_descriptor(name="primary", data_keys={
        "sample_x": {"dtype": "number", "shape": [], "source": "sim"},
        "img": {"dtype": "array", "shape": [2, 2], "source": "sim"}})
    # a second run, interleaved, at the same seq_nums: its positions must not leak into run 1
    other = event_model.compose_run(metadata={"scan_id": 8, "plan_name": "scan"})
    other_desc = other.compose_descriptor(name="primary", data_keys={
        "sample_x": {"dtype": "number", "shape": [], "source": "sim"}})
    view.document("start", run.start_doc)
    view.document("descriptor", desc.descriptor_doc)
    view.document("start", other.start_doc)
    view.document("descriptor", other_desc.descriptor_doc)
    for seq, x in ((1, 0.5), (2, 1.5), (3, 2.5)):
        view.document("event", desc.compose_event(data={"sample_x": x, "img": None},
                                                  timestamps={"sample_x": 0, "img": 0},
                                                  seq_num=seq))
        view.document("event", other_desc.compose_event(data={"sample_x": 90 + x},
                                                        timestamps={"sample_x": 0}, seq_num=seq))
    view.document("event", {"descriptor": "unknown", "seq_num": 1})   # malformed: ignored
    uid = run.start_doc["uid"]
    with view:
        view.results(uid, [FrameResult("primary", 1, "e1", "img", 0, [0.1], tags=("beam_off",),
                                       latency=0.02)])
        view.results(uid, [
            FrameResult("primary", 2, "e2", "img", 0, [0.9], tags=("ring_isotropic",
                                                                   "detector_gaps")),
            FrameResult("primary", 3, "e3", "img", 0, None, skip_reason="read_error: gone")])
    text = console.file.getvalue()
    assert "scan 7 scan" in text and "3/3" in text
    assert "ring_isotropic" in text and "skipped: read_error: gone" in text
    assert "detector_gaps" not in text                 # hidden instrument tag
    assert "beam_off" not in text                      # only the 2 latest rows are kept
    assert "1.50" in text and "2.50" in text
    assert "91.50" not in text and "92.50" not in text  # run 8's positions stay with run 8
    assert view.frames == 3 and view.skipped == 1


def test_phase_map_legend_names_every_phase_inside_the_figure(tmp_path):
    """The demo's 8 phases on a 9 x 9 grid, with the per-tag panels: no entry is cut off."""
    from bluesky_xsml.tags import TAG_NAMES

    rng = np.random.default_rng(0)
    xs, ys = (v.ravel() for v in np.meshgrid(np.linspace(0.3, 9.9, 9), np.linspace(0.3, 9.9, 9)))
    tags = [PHASES[i % len(PHASES)].split("+") for i in range(len(xs))]
    probs = rng.random((len(xs), len(TAG_NAMES)))
    fig = phase_map(xs, ys, tags, probs=probs, xlabel="sample_x (mm)", ylabel="sample_y (mm)",
                    truth=CombinatorialSample(size=64).region_at)
    renderer = _drawn(fig)
    (legend,) = _legends(fig)
    names = [t.get_text().rsplit(" (", 1)[0] for t in legend.get_texts()]
    assert sorted(names) == sorted(PHASES)
    assert _inside_figure(fig, legend, renderer)
    for text in legend.get_texts():
        assert _inside_figure(fig, text, renderer), text.get_text()
    assert len(fig.axes) > 6                      # the main map, 6 panels and colour bars
    _assert_every_axis_labelled(fig)
    _png(save_figure(fig, tmp_path / "p.png"))


def test_heatmap_has_a_legend_for_its_outlines_and_labelled_axes():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.6]])
    fig = tag_heatmap(probs, tags=["a", "b"], xlabel="sample_x (mm)")
    renderer = _drawn(fig)
    legends = _legends(fig)
    assert len(legends) == 1, "no key to the white squares"
    legend = legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["at or above the tag's threshold"]
    outlines = fig.axes[0].collections[0]
    assert legend.legend_handles[0].get_edgecolor().tolist() == \
        outlines.get_edgecolor().tolist()       # the key shows the white squares' edge
    assert _inside_figure(fig, legend, renderer)
    _assert_every_axis_labelled(fig)


def test_montage_has_one_intensity_scale_with_a_colour_bar():
    sample = CombinatorialSample(size=64)
    frames = [sample.frame_at(x, 2.0) for x in (1.0, 5.0, 9.6)]
    fig = frame_montage(frames, captions=["halo", "rings", "beam off"])
    _drawn(fig)
    bars = [ax for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]
    assert len(bars) == 1 and "log10(1 + counts)" in bars[0].get_ylabel()
    norms = {(im.norm.vmin, im.norm.vmax) for ax in fig.axes for im in ax.images}
    assert len(norms) == 1                        # the colour bar reads every frame
    top = max(np.nanpercentile(display_image(f), 99.7) for f in frames)
    assert norms.pop() == (0.0, pytest.approx(top))
    _assert_every_axis_labelled(fig)


def test_tag_profile_draws_tags_against_the_motor():
    from bluesky_xsml.plots import tag_profile

    x = np.array([2.0, 0.0, 1.0, np.nan])
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.1, 0.0], [np.nan] * 3, [0.5, 0.5, 0.5]])
    fig = tag_profile(x, probs, tags=["a", "b", "c"], xlabel="th (deg)")
    ax = fig.axes[0]
    assert [ln.get_label() for ln in ax.get_lines()] == ["a"]        # only tags seen
    line = ax.get_lines()[0]
    assert line.get_xdata().tolist() == [0.0, 1.0, 2.0]              # sorted, NaN x dropped
    assert np.isnan(line.get_ydata()[1])                             # skipped frame: a gap
    renderer = _drawn(fig)
    assert all(_inside_figure(fig, leg, renderer) for leg in fig.legends)
    _assert_every_axis_labelled(fig)
    with pytest.raises(ValueError, match=r"shape \(4, 2\)"):
        tag_profile(x, probs, tags=["a", "b"])
