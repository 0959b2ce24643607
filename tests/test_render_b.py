"""Renderer B: frames, labels against the tag definitions, determinism, independence."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from dataclasses import FrozenInstanceError, replace
from pathlib import Path

import numpy as np
import pytest

from bluesky_xsml.render_b import SceneSampler, render_scene
from bluesky_xsml.render_b import shapes as S
from bluesky_xsml.render_b.compose import expected_photons
from bluesky_xsml.render_b.detectors import DETECTORS, detector, gap_mask
from bluesky_xsml.render_b.sampler import Choice
from bluesky_xsml.tags import TAG_NAMES, tag_index

PKG = Path(__file__).resolve().parent.parent / "bluesky_xsml" / "render_b"
SCATTERING = [t for t in TAG_NAMES[:15]]


def lab(y, name):
    return bool(y[tag_index(name)])


def sampler(**kw) -> SceneSampler:
    return replace(SceneSampler(), **kw)


# ---------------------------------------------------------------- frames and metadata
@pytest.mark.parametrize("index", range(12))
def test_frame_shape_dtype_labels_and_metadata(index):
    frame, y, scene = render_scene(5, index)
    assert frame.shape == tuple(scene["detector"]["shape"])
    assert frame.dtype.name in ("int32", "uint32", "uint16", "float32")
    assert 256 <= max(frame.shape) <= 1500
    assert y.shape == (23,) and y.dtype == np.float32 and set(np.unique(y)) <= {0.0, 1.0}
    x0, y0 = scene["geometry"]["beam_center"]
    assert isinstance(x0, float) and isinstance(y0, float)
    conv = scene["detector"]["convention"]
    assert {"masked", "saturated", "rule", "dtype"} <= set(conv)
    json.dumps(scene)


def test_detectors_cover_sizes_shapes_and_readouts():
    shapes = [d.shape for d in DETECTORS]
    assert min(max(s) for s in shapes) <= 260 and max(max(s) for s in shapes) >= 1400
    assert any(h != w for h, w in shapes)
    assert {d.readout for d in DETECTORS} == {"counting", "integrating", "float"}
    assert {"pilatus", "eiger", "ccd"} <= {d.family for d in DETECTORS}
    assert sum(d.modular for d in DETECTORS) >= 4


def test_sentinel_conventions_by_family():
    seen = set()
    for i in range(60):
        _, _, scene = render_scene(8, i)
        conv = scene["detector"]["convention"]
        fam = scene["detector"]["family"]
        if fam == "eiger":  # 2^n-1 marks masked pixels, not saturation
            assert conv["masked"] == np.iinfo(conv["dtype"]).max != conv["saturated"]
        if fam == "ccd":  # the ADC's 2^bits-1 is saturation
            assert conv["saturated"] == 2 ** conv["bits"] - 1
        seen.add(conv["dtype"])
    assert {"int32", "uint16", "float32"} <= seen


# ---------------------------------------------------------------- labels vs definitions
def test_beam_off_frames_hold_no_scattering():
    smp = sampler(p_beam_off=1.0, detectors=("b_pilatus_300k", "b_eiger_1m_bin2"))
    for i in range(4):
        frame, y, scene = render_scene(1, i, smp)
        assert lab(y, "beam_off") and not any(lab(y, t) for t in SCATTERING)
        assert not lab(y, "saturation") and not lab(y, "beamstop_circular")
        conv = scene["detector"]["convention"]
        active = np.ones(frame.shape, bool)
        gaps = gap_mask(detector(scene["detector"]["name"]))
        if gaps is not None:
            active &= ~gaps
        for r, c in conv["dead"]:
            active[r, c] = False
        for r, c, _ in conv["hot"]:
            active[r, c] = False
        assert np.all(frame[active] == 0)  # photon counting, no beam: nothing counted


def test_beam_off_integrating_is_offset_and_read_noise():
    smp = sampler(p_beam_off=1.0, detectors=("b_ccd_512",))
    frame, y, scene = render_scene(2, 0, smp)
    conv = scene["detector"]["convention"]
    vals = frame.astype(float)
    assert lab(y, "beam_off")
    assert abs(np.median(vals) - conv["offset"]) <= 3 * conv["read_noise"] + 1


def test_saturation_frames_hold_a_plateau_at_the_sentinel():
    smp = sampler(p_saturation=1.0, p_beam_off=0.0)
    n_sat = 0
    for i in range(10):
        frame, y, scene = render_scene(3, i, smp)
        level = scene["detector"]["convention"]["saturated"]
        at = np.count_nonzero(frame == np.asarray(level, frame.dtype))
        if lab(y, "saturation"):
            n_sat += 1
            assert at >= 3, scene["detector"]["name"]
        else:
            assert at < 3
    assert n_sat >= 7


def test_unsaturated_frames_stay_below_the_ceiling():
    smp = sampler(p_saturation=0.0)
    for i in range(8):
        frame, y, scene = render_scene(4, i, smp)
        assert not lab(y, "saturation")
        level = scene["detector"]["convention"]["saturated"]
        assert np.count_nonzero(frame == np.asarray(level, frame.dtype)) < 3


def test_gap_frames_keep_unfilled_stripes_and_filled_gaps_are_not_labelled():
    names = ("b_pilatus_1m", "b_eiger_4m_bin2", "b_timepix_quad", "b_pilatus_1m_float")
    for fill in (0.0, 1.0):
        smp = sampler(p_gaps_filled=fill, detectors=names, p_beam_off=0.0)
        for i in range(6):
            frame, y, scene = render_scene(6, i, smp)
            gaps = gap_mask(detector(scene["detector"]["name"]))
            conv = scene["detector"]["convention"]
            g = frame[gaps]
            if fill:
                assert conv["gap_fill"] == "interpolate" and not lab(y, "detector_gaps")
                assert np.all(np.isfinite(g.astype(float)))
                if frame.dtype.kind == "u":
                    assert not np.any(g == np.iinfo(frame.dtype).max)
            elif conv["gap_fill"] == "nan":
                assert lab(y, "detector_gaps") and np.all(np.isnan(g))
            else:  # a stripe of one sentinel, never filled with counts
                assert np.all(g == np.asarray(conv["gap_fill"], frame.dtype))
                if conv["gap_fill"] != 0:
                    assert lab(y, "detector_gaps")


def test_grazing_frames_have_a_horizon_with_attenuation_below():
    smp = sampler(p_grazing=1.0, p_beam_off=0.0, p_weak=0.0, p_high_background=0.0)
    found = 0
    for i in range(10):
        _frame, y, scene = render_scene(9, i, smp)
        if not lab(y, "horizon"):
            continue
        found += 1
        rng = np.random.default_rng(0)
        scene2 = {k: v for k, v in scene.items() if k != "visible"}
        ph = expected_photons(scene2, rng).photons
        row = scene["geometry"]["horizon_row"]
        bx = int(round(scene["geometry"]["beam_center"][0]))
        cols = slice(max(0, bx - 150), bx + 150)
        above = ph[int(row) - 6:int(row) - 2, cols].mean()
        below = ph[int(row) + 4:int(row) + 8, cols].mean()
        att = next(c for c in scene["components"] if c["kind"] == "horizon")["attenuation"]
        assert below < above * max(2 * att, 0.5)
    assert found >= 5


def test_transmission_frames_have_no_grazing_tags():
    smp = sampler(p_grazing=0.0)
    for i in range(10):
        _, y, _ = render_scene(10, i, smp)
        assert not any(lab(y, t) for t in ("horizon", "yoneda", "specular_rod", "bragg_rods"))


def test_label_rates_over_a_small_set():
    ys = np.stack([render_scene(11, i)[1] for i in range(120)])
    rates = ys.mean(0)
    for t in ("ring_isotropic", "diffuse_low_q", "beamstop_circular", "detector_gaps"):
        assert rates[tag_index(t)] > 0.05, t
    assert 0.01 < rates[tag_index("beam_off")] < 0.25


# ---------------------------------------------------------------- shapes
@pytest.mark.parametrize("fold", [2, 4, 6])
def test_nfold_azimuth_profiles_have_n_maxima(fold):
    phi = np.linspace(-math.pi, math.pi, 3600, endpoint=False)
    for form in ("cos", "vonmises"):
        p = S.azimuth_profile(phi, form, fold=fold, phase=0.3, kappa=8, power=2)
        peaks = (p > np.roll(p, 1)) & (p >= np.roll(p, -1)) & (p > 0.5)
        assert peaks.sum() == fold, form
        assert p.min() < 0.1 and abs(p.max() - 1) < 1e-3


@pytest.mark.parametrize("width", [1.0, 3.0, 5.0])
def test_streak_profile_width(width):
    x = np.linspace(-10, 10, 20001, dtype=np.float32)
    p = S.line_profile(x, width)
    fwhm = np.ptp(x[p >= 0.5])
    assert abs(fwhm - width) < 0.05


def test_radial_peak_is_centred_with_given_fwhm():
    r = np.arange(0, 200, 0.01, dtype=np.float32)
    p = S.radial_peak(r, 100.0, 4.0)
    assert abs(r[p.argmax()] - 100) < 0.02
    assert abs(np.ptp(r[p >= 0.5]) - 4.0) < 0.05


def test_splat_spot_peak_and_position():
    img = np.zeros((64, 64), np.float32)
    S.splat_spots(img, [20.0], [30.0], [5.0], [1.5])
    assert np.unravel_index(img.argmax(), img.shape) == (30, 20)
    assert abs(img.max() - 5.0) < 1e-4


# ---------------------------------------------------------------- determinism and storage
def test_same_seed_same_frame_other_index_other_frame():
    a = render_scene(21, 4)
    b = render_scene(21, 4)
    c = render_scene(21, 5)
    assert np.array_equal(a[0], b[0], equal_nan=a[0].dtype.kind == "f")
    assert np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert a[2]["seed"] != c[2]["seed"]
    assert not (a[0].shape == c[0].shape and np.array_equal(a[0], c[0]))


def test_store_round_trips_through_the_project_reader(tmp_path):
    from bluesky_xsml.render_b.store import write
    from bluesky_xsml.sim.dataset import open_dataset  # the reader, as xsml evaluate uses it

    smp = sampler(detectors=("b_timepix_single", "b_ccd_512", "b_cmos_float_small"))
    path = tmp_path / "b.zarr"
    assert write(path, 5, seed=2, block=2, sampler=smp) == 5
    ds = open_dataset(str(path))
    assert len(ds) == 5 and ds.complete
    for i in range(5):
        frame, y, scene = render_scene(2, i, smp)
        got = ds.frames(i)
        assert got.dtype == frame.dtype
        assert np.array_equal(got, frame, equal_nan=frame.dtype.kind == "f")
        assert np.array_equal(ds.labels[i], y)
        assert ds.params(i)["geometry"]["beam_center"] == scene["geometry"]["beam_center"]
    # same settings resume (nothing to do); other settings refuse
    assert write(path, 5, seed=2, block=2, sampler=smp) == 5
    with pytest.raises(ValueError):
        write(path, 5, seed=3, block=2, sampler=smp)


def test_sampler_is_declared_and_frozen():
    smp = SceneSampler()
    with pytest.raises(FrozenInstanceError):
        smp.p_grazing = 0.5  # distributions change by building a new sampler
    assert isinstance(smp.ring_texture, Choice)


# ---------------------------------------------------------------- independence
def test_render_b_imports_nothing_from_the_project_generator():
    for f in PKG.glob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = ("." * node.level) + (node.module or "")
                assert "sim" not in mod.split("."), (f.name, mod)
                assert not mod.startswith("..sim"), (f.name, mod)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    assert not a.name.startswith("bluesky_xsml.sim"), (f.name, a.name)


def test_rendering_does_not_load_the_project_generator():
    code = ("import sys; from bluesky_xsml.render_b import render_scene; render_scene(0, 1); "
            "print(sorted(m for m in sys.modules if m.startswith('bluesky_xsml.sim')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_zero_gap_stripes_are_labelled_only_where_they_cut_through_counts():
    from bluesky_xsml.render_b.labels import gaps_visible

    det = detector("b_timepix_quad")
    gaps = gap_mask(det)
    conv = {"gap_fill": 0}
    frame = np.zeros(det.shape, np.uint16)
    assert not gaps_visible(frame, gaps, conv)  # a dark frame: nothing to tell the gaps by
    frame[200:320, 200:320] = 7  # counts across the gap cross
    frame[gaps] = 0
    assert gaps_visible(frame, gaps, conv)
    assert not gaps_visible(frame, gaps, {"gap_fill": "interpolate"})
    assert gaps_visible(np.zeros(det.shape, np.uint16), gaps, {"gap_fill": 65535})
