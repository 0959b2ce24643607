"""The synthetic scattering generator: physics, sentinels, labels, reproducibility."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bluesky_xsml.errors import ConfigurationError
from bluesky_xsml.sim import physics as ph
from bluesky_xsml.sim.generator import (
    SceneGenerator,
    complete_scene,
    render_scene,
    sample_scene,
    scene_labels,
)
from bluesky_xsml.sim.geometry import DETECTORS, HELDOUT, q_from_r, r_from_q, resolve_detectors
from bluesky_xsml.tags import TAG_NAMES, tag_index

SCATTERING = [t for t in TAG_NAMES if t not in (
    "beam_off", "detector_gaps", "beamstop_circular", "beamstop_linear")]


def tags_of(labels) -> set[str]:
    return {TAG_NAMES[i] for i in np.flatnonzero(labels)}


def same_frame(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def sample_256():
    """300 frames of the default training mix at 256 (frames, labels, scenes)."""
    return SceneGenerator(seed=2024, size=256).batch(300)


def radial_mean(frame, cx, cy, r, half=0.7):
    yy, xx = np.indices(frame.shape)
    rr = np.hypot(xx - cx, yy - cy)
    sel = (np.abs(rr - r) <= half) & np.isfinite(frame.astype(float)) & (frame >= 0)
    return float(frame[sel].astype(float).mean())


# -- reproducibility ----------------------------------------------------------

def test_same_seed_same_frames_labels_and_params():
    f1, l1, p1 = SceneGenerator(seed=7, size=96).batch(6)
    f2, l2, p2 = SceneGenerator(seed=7, size=96).batch(6)
    assert all(same_frame(a, b) for a, b in zip(f1, f2, strict=True))
    assert np.array_equal(l1, l2) and l1.dtype == np.float32 and l1.shape == (6, 23)
    assert p1 == p2
    f3, _, _ = SceneGenerator(seed=8, size=96).batch(6)
    assert not all(same_frame(a, b) for a, b in zip(f1, f3, strict=True))


def test_frame_at_is_independent_of_stream_position():
    gen = SceneGenerator(seed=3, size=96)
    stream = [gen.one() for _ in range(4)]
    frame, labels, params = SceneGenerator(seed=3, size=96).frame_at(3)
    assert same_frame(frame, stream[3][0])
    assert np.array_equal(labels, stream[3][1]) and params == stream[3][2]


def test_params_are_json_and_rerender_exactly():
    _frame, labels, params = SceneGenerator(seed=11, size=128).frame_at(5)
    again = json.loads(json.dumps(params))
    rng_a = np.random.default_rng(99)
    rng_b = np.random.default_rng(99)
    assert same_frame(render_scene(again, rng_a), render_scene(params, rng_b))
    assert np.array_equal(scene_labels(again), labels)


# -- detector families, shapes, sentinels ---------------------------------------

def test_pilatus_int32_gaps_minus_one_bad_pixels_minus_two():
    scene = {"detector": "pilatus_1m", "size": 512, "background": {"level": 20.0},
             "features": []}
    sc = complete_scene(scene)
    sc["detector"]["bad_pixels"] = [[3, 4], [60, 50]]
    frame = render_scene(sc, 0)
    assert frame.dtype == np.int32 and frame.shape == (512, 482)
    rows, cols = sc["detector"]["gaps"]["rows"], sc["detector"]["gaps"]["cols"]
    assert len(rows) == 4 and len(cols) == 1
    for a, b in rows:
        assert (frame[a:b] == -1).all()
    assert (frame[:, cols[0][0]:cols[0][1]] == -1).all()
    assert frame[3, 4] == -2 and frame[60, 50] == -2
    valid = frame[frame >= 0]
    assert 15 < valid.mean() < 25          # background counts survive outside the gaps


@pytest.mark.parametrize("dtype,mask", [("uint32", 2**32 - 1), ("uint16", 2**16 - 1)])
def test_eiger_masked_pixels_hold_dtype_max(dtype, mask):
    sc = complete_scene({"detector": {"name": "eiger_1m", "dtype": dtype}, "size": 256,
                         "background": {"level": 3.0}})
    frame = render_scene(sc, 1)
    assert frame.dtype == np.dtype(dtype)
    (a, b), = sc["detector"]["gaps"]["rows"]
    assert (frame[a:b] == mask).all()
    assert (frame[:a] != mask).all() and frame[:a].max() < sc["detector"]["count_cutoff"]


def test_ccd_float32_nan_in_module_seams_and_no_negative_values():
    sc = complete_scene({"detector": "adsc_q210", "size": 128,
                         "noise": {"read_sigma": 3.0, "offset": 1.0}})
    frame = render_scene(sc, 2)
    assert frame.dtype == np.float32
    (a, b), = sc["detector"]["gaps"]["rows"]
    assert np.isnan(frame[a:b]).all()
    valid = frame[~np.isnan(frame)]
    assert valid.min() >= 0.0 and 0.3 < valid.std() < 10


def test_reduced_size_keeps_aspect_ratio_and_physics():
    gen = SceneGenerator(seed=0, size=256, detectors=["pilatus_300kw"])
    frame, _, params = gen.one()
    assert frame.shape == (34, 256)
    det = DETECTORS["pilatus_300kw"]
    # same physical width: render pixel x render width == native pixel x native width
    assert math.isclose(params["detector"]["pixel_size_m"] * 256, det.pixel_size_m * 1475,
                        rel_tol=1e-4)


def test_detector_selection_and_heldout():
    scenes = [sample_scene(np.random.default_rng(i), size=64) for i in range(200)]
    names = {s["detector"]["name"] for s in scenes}
    assert not names & set(HELDOUT) and len(names) > 8
    held = SceneGenerator(seed=1, size=64, detectors=["619x1475", "2167x2070"])
    assert {held.one()[2]["detector"]["name"] for _ in range(20)} == set(HELDOUT)
    assert [d.name for d in resolve_detectors("eiger")][:2] == ["eiger_500k", "eiger_1m"]
    with pytest.raises(ConfigurationError, match=r"unknown detector 'nope'.*pilatus_1m"):
        SceneGenerator(detectors=["nope"])


# -- physics ------------------------------------------------------------------

def test_q_r_round_trip_and_reflection_rules():
    r = np.array([10.0, 200.0, 900.0])
    q = q_from_r(r, 172e-6, 0.3, 1.0)
    assert np.allclose(r_from_q(q, 172e-6, 0.3, 1.0), r)
    q, _, hkl = ph.crystal_reflections("LaB6", 3.5)
    assert hkl[:4] == ((1, 0, 0), (1, 1, 0), (1, 1, 1), (2, 0, 0))
    assert np.isclose(q[0], 2 * np.pi / 4.1569)
    _, _, si = ph.crystal_reflections("Si", 5.0)
    assert si[:3] == ((1, 1, 1), (2, 2, 0), (3, 1, 1))          # diamond: no 200, 222
    assert (2, 2, 2) not in si and (2, 0, 0) not in si
    _, _, ceo2 = ph.crystal_reflections("CeO2", 3.5)
    assert ceo2[:3] == ((1, 1, 1), (2, 0, 0), (2, 2, 0))         # fcc: mixed parity absent


def test_agbh_rings_land_at_their_d_spacing_and_are_labelled():
    scene = {"detector": "pilatus_1m", "size": 512,
             "geometry": {"distance_m": 0.6, "wavelength_A": 1.0, "beam_center": [240, 250]},
             "background": {"level": 1.0},
             "features": [{"type": "rings", "material": "AgBH", "amp": 400.0,
                           "fwhm_rel": 0.004}]}
    labels = scene_labels(scene)
    got = tags_of(labels)
    assert {"ring_isotropic", "many_rings", "higher_orders", "detector_gaps"} <= got
    assert not got & {"halo_isotropic", "ring_oriented", "beam_off", "weak_scattering"}
    sc = complete_scene(scene)
    frame = render_scene(sc, 0)
    p = sc["detector"]["pixel_size_m"]
    r1 = float(r_from_q(2 * np.pi / 58.38, p, 0.6, 1.0))
    on = radial_mean(frame, 240, 250, r1)
    off = radial_mean(frame, 240, 250, 1.5 * r1)
    assert on > 100 and off < 10
    assert radial_mean(frame, 240, 250, 2 * r1) > 20            # second order at 2 q1


def test_ring_orientation_and_halo_rules():
    base = {"detector": "ccd_1k", "size": 256, "noise": {"read_sigma": 1.0, "offset": 5},
            "geometry": {"distance_m": 0.2, "wavelength_A": 1.0, "beam_center": [128, 128]}}
    q = float(q_from_r(80, complete_scene(base)["detector"]["pixel_size_m"], 0.2, 1.0))
    ring = {"type": "rings", "q": [q], "amp": [300.0], "fwhm_rel": 0.005}
    assert tags_of(scene_labels({**base, "features": [ring]})) == {"ring_isotropic"}
    arcs = {**ring, "kappa": 6.0, "orient_deg": 90.0}
    assert tags_of(scene_labels({**base, "features": [arcs]})) == {"ring_oriented"}
    halo = {"type": "halo", "q0": q, "fwhm_rel": 0.3, "amp": 300.0}
    assert tags_of(scene_labels({**base, "features": [halo]})) == {"halo_isotropic"}
    assert tags_of(scene_labels({**base, "features": [{**halo, "kappa": 3.0}]})) == \
        {"halo_anisotropic"}
    # the rendered arcs really are concentrated along the director (up/down)
    frame = render_scene({**base, "features": [arcs]}, 0)
    up, side = frame[128 - 80, 128], frame[128, 128 + 80]
    assert up > 100 > 20 > side


def test_invisible_or_off_detector_features_are_not_labelled():
    base = {"detector": "pilatus_1m", "size": 256, "background": {"level": 100.0},
            "geometry": {"distance_m": 1.0, "wavelength_A": 1.0, "beam_center": [120, 128]}}
    spots = {"type": "spots", "xy": [[60.0, 60.0]], "amp": [400.0], "sigma_px": 1.2}
    assert "peaks_isolated" in tags_of(scene_labels({**base, "features": [spots]}))
    faint = {**spots, "amp": [20.0]}                    # < 6 sigma of a 100-count background
    assert "peaks_isolated" not in tags_of(scene_labels({**base, "features": [faint]}))
    outside = {**spots, "xy": [[400.0, 60.0]]}          # beyond the 241-px wide frame
    assert "peaks_isolated" not in tags_of(scene_labels({**base, "features": [outside]}))
    gap_row = complete_scene(base)["detector"]["gaps"]["rows"][0][0]
    in_gap = {**spots, "xy": [[60.0, float(gap_row)]]}
    assert "peaks_isolated" not in tags_of(scene_labels({**base, "features": [in_gap]}))


def test_beam_off_has_only_dark_noise_and_no_scattering_tags():
    gen = SceneGenerator(seed=5, size=128, tags={"beam_off": True})
    for _ in range(5):
        frame, labels, params = gen.one()
        got = tags_of(labels)
        assert "beam_off" in got and not got & set(SCATTERING)
        assert got <= {"beam_off", "detector_gaps"}
        assert params["beam_on"] is False
        valid = frame[np.isfinite(frame.astype(float)) & (frame >= 0)].astype(float)
        if params["detector"]["family"] != "ccd":
            valid = valid[valid < params["detector"]["count_cutoff"]]
            assert valid.mean() < 0.05                       # dark counts only


def test_poisson_counting_statistics():
    for level in (0.7, 5.0, 300.0):
        sc = {"detector": "pilatus_100k", "size": 487, "background": {"level": level},
              "geometry": {"distance_m": 50.0}}
        frame = render_scene(sc, 4).astype(float)
        v = frame[frame >= 0]
        assert abs(v.mean() / level - 1) < 0.02
        assert abs(v.var() / level - 1) < 0.05


def test_saturation_clips_at_the_counter_maximum():
    scene = {"detector": "pilatus_300k", "size": 256,
             "features": [{"type": "direct_beam", "amp": 5e8, "sigma_px": 2.0}],
             "background": {"level": 2.0}}
    frame = render_scene(scene, 0)
    cutoff = complete_scene(scene)["detector"]["count_cutoff"]
    assert cutoff == 1048575 and frame.max() == cutoff
    assert (frame == cutoff).sum() >= 10
    assert "saturation" in tags_of(scene_labels(scene))
    assert "saturation" not in tags_of(scene_labels({**scene, "features": []}))


def test_generated_saturation_labels_match_clipped_pixels(sample_256):
    frames, labels, params = sample_256
    js = tag_index("saturation")
    n_sat = 0
    for frame, lab, p in zip(frames, labels, params, strict=True):
        cut = p["detector"]["count_cutoff"]
        at_cut = int((frame == cut).sum())
        if lab[js]:
            n_sat += 1
            assert at_cut >= 4, p["detector"]["name"]
        else:
            assert at_cut == 0, p["detector"]["name"]
    assert n_sat >= 10


def test_weak_and_high_background_frames_look_like_it(sample_256):
    frames, labels, params = sample_256
    jw, jh = tag_index("weak_scattering"), tag_index("high_background")
    for frame, lab, p in zip(frames, labels, params, strict=True):
        if p["detector"]["family"] == "ccd" or not p["beam_on"]:
            continue
        valid = frame[(frame >= 0) & (frame < p["detector"]["count_cutoff"])].astype(float)
        if lab[jw]:
            assert np.percentile(valid, 99.9) < 120
        if lab[jh]:
            assert np.median(valid) > 50


def test_tag_frequencies(sample_256):
    _, labels, _ = sample_256
    freq = labels.mean(axis=0)
    assert (freq > 0).all(), [t for t, f in zip(TAG_NAMES, freq, strict=True) if f == 0]
    assert (freq < 0.7).all(), [t for t, f in zip(TAG_NAMES, freq, strict=True) if f >= 0.7]
    # most tags within the 5-45 % band of a balanced multi-label set
    assert ((freq > 0.05) & (freq < 0.45)).sum() >= 20
    assert labels.sum(axis=1).mean() > 2.5                  # many tags per frame


def test_beam_off_excludes_scattering_tags_in_the_random_mix(sample_256):
    _, labels, _ = sample_256
    off = labels[:, tag_index("beam_off")] > 0
    assert off.any()
    scat = [tag_index(t) for t in SCATTERING]
    assert labels[off][:, scat].sum() == 0
    assert (labels[~off][:, scat].sum(axis=1) > 0).all()     # beam on: something is seen


def test_forced_tags_and_bad_scenes():
    gen = SceneGenerator(seed=4, size=256, tags={"ring_isotropic": True, "beam_off": False})
    hits = sum(gen.one()[1][tag_index("ring_isotropic")] for _ in range(10))
    assert hits >= 7
    with pytest.raises(ConfigurationError, match="unknown feature type 'blob'"):
        render_scene({"features": [{"type": "blob"}]}, 0)
    with pytest.raises(ConfigurationError, match="cannot ask for"):
        SceneGenerator(tags={"rings": True}).one()
    with pytest.raises(ConfigurationError, match="size must be"):
        SceneGenerator(size=4)


@pytest.mark.parametrize("variety", ["classic", "wide"])
def test_diffuse_low_q_asked_for_in_a_weak_frame_is_drawn_weak(variety):
    """Forcing diffuse_low_q into a weak frame used to fail on most scenes (TypeError:
    no typical amplitude in the weak regime); the diffuse scattering now stays weak."""
    rng = np.random.default_rng(0)
    want = {"diffuse_low_q": True, "weak_scattering": True}
    labels = np.stack([scene_labels(sample_scene(rng, size=128, tags=want, variety=variety))
                       for _ in range(30)])
    both = labels[:, tag_index("diffuse_low_q")] * labels[:, tag_index("weak_scattering")]
    assert both.sum() >= 2
