"""Positions of motors a run did not move, in find_frames, load_run_tags and `xsml plot`.

Real parts: a RunEngine with ophyd sim motors, bluesky's ``SupplementalData``
putting the fixed motor in the ``baseline`` stream, the live TaggingCallback,
bluesky-tiled-plugins' TiledWriter into an embedded Tiled catalog (SQLite).
"""

from __future__ import annotations

import types

import numpy as np
import pytest

pytest.importorskip("tiled.server", reason="needs tiled[server,client]")
pytest.importorskip("bluesky_tiled_plugins", reason="needs bluesky-tiled-plugins")

from .conftest import make_image_detector

LINE_Y = 3.5


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tagger):
    """A 2 x 3 grid over (sample_y, sample_x); then a line over sample_x at a fixed sample_y
    that only the baseline records; then a line over sample_x whose start document holds a
    fixed `th`; then a scan of th (units: deg) with sample_x and sample_y both fixed; then a
    scan of sample_x and sample_y together, sample_y staying at 2."""
    from bluesky import RunEngine
    from bluesky.plans import grid_scan, scan
    from bluesky.preprocessors import SupplementalData
    from ophyd import SoftPositioner
    from ophyd.sim import SynAxis

    from bluesky_xsml import TaggingCallback
    from bluesky_xsml.catalog.embedded import EmbeddedCatalog

    x, y = SynAxis(name="sample_x"), SynAxis(name="sample_y")
    th = SoftPositioner(name="th", egu="deg", init_pos=0.0)
    det = make_image_detector(name="img", shape=(64, 64))
    with EmbeddedCatalog(tmp_path_factory.mktemp("fixed_positions")) as cat:
        RE = RunEngine({}, call_returns_result=False)
        xsml = TaggingCallback(tagger, downstream=[cat.writer()])
        RE.subscribe(xsml)
        try:
            (grid,) = RE(grid_scan([det], y, 1.0, 2.0, 2, x, 0.0, 1.0, 3), sample="film")
            y.set(LINE_Y).wait(5)
            sd = SupplementalData(baseline=[y])
            RE.preprocessors.append(sd)
            (line,) = RE(scan([det], x, 0.0, 1.0, 4), sample="film")
            RE.preprocessors.remove(sd)
            (md_line,) = RE(scan([det], x, 0.0, 1.0, 3), sample="film", th=12.5)
            RE.preprocessors.append(SupplementalData(baseline=[x, y]))
            (th_scan,) = RE(scan([det], th, -1.0, 1.0, 5), sample="film")
            RE.preprocessors.clear()
            # two motors, one of them at the same place throughout: a line scan too
            (const,) = RE(scan([det], x, 0.0, 2.0, y, 2.0, 2.0, 3), sample="film")
            assert xsml.flush(60)
        finally:
            xsml.close(10)
        yield types.SimpleNamespace(catalog=cat.catalog, grid=grid, line=line, md_line=md_line,
                                    th_scan=th_scan, const=const)


def _frames(catalog, **kwargs):
    from bluesky_xsml.query import find_frames

    # min_prob 0: every tagged frame (the untrained tagger's tags are arbitrary)
    return find_frames(catalog, "beam_off", min_prob=0.0, narrow=False, **kwargs)


def test_find_frames_gives_a_fixed_motor_its_baseline_position(runs):
    df = _frames(runs.catalog)
    line = df[df["uid"] == runs.line]
    assert len(line) == 4
    assert line["sample_y"].tolist() == [LINE_Y] * 4          # was NaN: not in primary
    assert line["sample_x"].tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    grid = df[df["uid"] == runs.grid]                          # scanned: per event
    assert sorted(set(grid["sample_y"])) == [1.0, 2.0] and len(grid) == 6
    # the th scan: both sample motors from its baseline (read as the run opened)
    th = df[df["uid"] == runs.th_scan]
    assert th["sample_x"].tolist() == [1.0] * 5 and th["sample_y"].tolist() == [LINE_Y] * 5
    # a run that recorded sample_y nowhere keeps NaN: nothing is made up
    assert df[df["uid"] == runs.md_line]["sample_y"].isna().all()


def test_the_stop_index_answer_gets_the_fixed_motor_too(runs):
    """At the default min_prob the rows come from the run's stop index (no stream read)."""
    from bluesky_xsml.query import find_frames

    run = runs.catalog[runs.line]
    counts = run.metadata["stop"]["xsml_tag_counts"]
    assert counts, "the tagger tagged nothing at 0.5 in this run"
    tag = max(counts, key=counts.get)
    both = [find_frames([runs.catalog[runs.grid], run], tag, strict=False, use_index=u)
            for u in (True, False)]
    for df in both:
        line = df[df["uid"] == runs.line]
        assert len(line) == counts[tag] and (line["sample_y"] == LINE_Y).all()
    assert both[0].equals(both[1])


def test_find_frames_fields_from_the_baseline_or_the_start_document(runs):
    from bluesky_xsml.query import find_frames

    one = find_frames(runs.catalog[runs.line], "beam_off", min_prob=0.0, fields=["sample_y"])
    assert one["sample_y"].tolist() == [LINE_Y] * 4
    for use_index in (True, False):
        md = _frames([runs.catalog[runs.md_line]], fields=["th"], use_index=use_index)
        assert md["th"].tolist() == [12.5] * 3, use_index
    # a field no run recorded is no column at all
    assert "nowhere" not in _frames(runs.catalog, fields=["nowhere"]).columns


def test_fixed_positions_says_where_it_read_them(runs):
    from bluesky_xsml.catalog.positions import fixed_positions

    got = fixed_positions(runs.catalog[runs.line], ["sample_y", "sample_x", "nowhere"])
    assert got == {"sample_y": LINE_Y}         # sample_x was scanned, not in the baseline
    assert got["sample_y"].source == "baseline" and got["sample_y"].units is None
    md = fixed_positions(runs.catalog[runs.md_line], ["th", "sample"])
    assert md == {"th": 12.5} and md["th"].source == "start"   # strings are no position


def test_load_run_tags_fills_fixed_motors_and_units(runs):
    from bluesky_xsml.plots import load_run_tags

    rt = load_run_tags(runs.catalog[runs.line], fields=["sample_y"])
    assert rt.positions["sample_y"].tolist() == [LINE_Y] * 4
    assert np.ptp(rt.positions["sample_x"]) == pytest.approx(1.0)
    th = load_run_tags(runs.catalog[runs.th_scan])
    assert th.units == {"th": "deg"}


@pytest.fixture
def drawn(monkeypatch):
    """The figures `plot_run` saves, by file name (it still writes the files)."""
    from bluesky_xsml import plots

    figures = {}
    save = plots.save_figure

    def keep(fig, path, **kwargs):
        figures[str(path).rsplit("-", 1)[1]] = fig
        return save(fig, path, **kwargs)

    monkeypatch.setattr(plots, "save_figure", keep)
    return figures


@pytest.mark.parametrize("which, motor", [("line", "sample_x"), ("const", "sample_x"),
                                          ("th_scan", "th (deg)")])
def test_xsml_plot_of_a_line_scan_is_a_line_plot_against_its_motor(runs, tmp_path, drawn,
                                                                   which, motor):
    from bluesky_xsml.plots import plot_run

    files = plot_run(runs.catalog[getattr(runs, which)], tmp_path)
    assert sorted(f.name.rsplit("-", 1)[1] for f in files) == ["frames.png", "line.png",
                                                                "tags.png"]
    ax = drawn["line.png"].axes[0]
    assert ax.get_xlabel() == motor and ax.get_ylabel() == "probability"
    lo, hi = ax.get_ylim()
    assert lo < 0 < 1 < hi and hi - lo < 1.2                 # not +-3e-11
    n = {"line": 4, "const": 3, "th_scan": 5}[which]
    assert all(len(line.get_xdata()) == n for line in ax.get_lines())
    xs = ax.get_lines()[0].get_xdata()
    assert list(xs) == sorted(xs) and np.ptp(xs) > 0.9       # along the motor, in order


def test_xsml_plot_of_a_grid_is_still_a_map(runs, tmp_path, drawn):
    from bluesky_xsml.plots import plot_run

    files = plot_run(runs.catalog[runs.grid], tmp_path)
    assert sorted(f.name.rsplit("-", 1)[1] for f in files) == ["frames.png", "map.png",
                                                                "tags.png"]
    ax = drawn["map.png"].axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("sample_x", "sample_y")
