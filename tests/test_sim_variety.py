"""Generator profiles: classic frames unchanged; wide families labelled by what shows."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

from bluesky_xsml.errors import ConfigurationError
from bluesky_xsml.preprocess import PreprocessConfig
from bluesky_xsml.sim import physics as ph
from bluesky_xsml.sim.generator import SceneGenerator, render_scene, sample_scene, scene_labels
from bluesky_xsml.sim.variety import (
    FORM_ANISO_MAX_CONTRAST,
    FORM_ISO_MIN_CONTRAST,
    PROFILES,
    WIDE,
    apply_readout,
    resolve_variety,
)
from bluesky_xsml.tags import TAG_NAMES
from bluesky_xsml.training.data import SynthSpec, _cache_key

T = {n: i for i, n in enumerate(TAG_NAMES)}


def _digest(gen: SceneGenerator, n: int) -> str:
    d = hashlib.sha256()
    for i in range(n):
        f, y, p = gen.frame_at(i)
        d.update(f.tobytes())
        d.update(str(f.dtype).encode())
        d.update(y.tobytes())
        d.update(json.dumps(p, sort_keys=True).encode())
    return d.hexdigest()


# Recorded from the generator before profiles existed (commit 27f6874): the classic
# profile must keep rendering these frames, labels and scenes bit for bit.
CLASSIC_128_SEED2_40 = "173343e89e969a342f5b00bad668ffaef8c3d68522303a260c4de16c2c8e443c"
CLASSIC_64_SEED5_ALL_20 = "f8f69eca399800babb4bf678b7e629268ffe832620b82205dc9c41b50b873542"


def test_classic_profile_is_bit_identical_to_the_generator_before_profiles():
    assert _digest(SceneGenerator(seed=2, size=128), 40) == CLASSIC_128_SEED2_40
    gen = SceneGenerator(seed=5, size=64, detectors="all", variety="classic")
    assert _digest(gen, 20) == CLASSIC_64_SEED5_ALL_20


# Recorded from the wide profile before the sampler became a declared dataclass (commit
# 12a18c5): refactors of sampling must keep drawing the same numbers in the same order.
WIDE_128_SEED2_40 = "3f1e8deac6cdd61cd99163be47ee15c9dd20d4b776dff14fbc44271bf20cb478"
WIDE_64_SEED5_ALL_20 = "70e01fcfac6c91e822faa7fc734bdc1fb6aadb44a9b97f67d7558767916d74cf"


def test_wide_profile_is_bit_identical_to_the_recorded_frames():
    assert _digest(SceneGenerator(seed=2, size=128, variety="wide"), 40) == WIDE_128_SEED2_40
    gen = SceneGenerator(seed=5, size=64, detectors="all", variety="wide")
    assert _digest(gen, 20) == WIDE_64_SEED5_ALL_20


def test_sampler_state_is_declared_and_changes_through_its_methods():
    from dataclasses import fields

    from bluesky_xsml.sim.geometry import DETECTORS
    from bluesky_xsml.sim.sampler import Sampler

    S = Sampler.start(np.random.default_rng(0), DETECTORS["pilatus_1m"], 128, {}, WIDE)
    assert S.L == max(S.h, S.w) == 128 and S.p > 0
    assert S.sc["detector"] is S.detector and S.profile is WIDE
    assert {"lam", "D", "cx", "cy", "gi", "ctx", "r_lo", "r_hi", "regime", "ring_budget",
            "rings_left"} <= {f.name for f in fields(Sampler)}
    with pytest.raises(AttributeError):
        S.undeclared = 1.0          # no state outside the declared fields
    S.plan_rings(4)
    S.begin_ring_style(1)           # one more style follows: keep a ring for it
    assert S.ring_allowance() == 3
    S.spend_rings(2)
    S.begin_ring_style(0)
    assert S.ring_allowance() == 2


def test_wide_differs_and_is_reproducible():
    a = SceneGenerator(seed=2, size=64, variety="wide")
    b = SceneGenerator(seed=2, size=64, variety="wide")
    assert _digest(a, 6) == _digest(b, 6)
    assert _digest(a, 6) != _digest(SceneGenerator(seed=2, size=64), 6)
    assert a.frame_at(0)[2]["variety"] == "wide"
    assert "variety" not in SceneGenerator(seed=2, size=64).frame_at(0)[2]


def test_unknown_variety_is_a_clear_error():
    with pytest.raises(ConfigurationError, match="unknown generator variety"):
        SceneGenerator(seed=0, variety="huge")
    with pytest.raises(ConfigurationError):
        sample_scene(np.random.default_rng(0), variety="huge")
    assert resolve_variety(None).name == "classic" and set(PROFILES) == {"classic", "wide"}


# --------------------------------------------------------------------- specs and cache


def test_synth_spec_variety_parsing_and_cache_key():
    cfg = PreprocessConfig()
    classic = SynthSpec.parse("synth:seed=2,n=10,sizes=256")
    wide = SynthSpec.parse("synth:seed=2,n=10,sizes=256,variety=wide")
    assert classic.variety == "classic" and wide.variety == "wide"
    # classic specs print as before (the model card's data strings and cache keys)
    assert str(classic) == "synth:seed=2,n=10,sizes=256,detectors=train,start=0"
    assert str(wide).endswith(",variety=wide")
    assert SynthSpec.parse(str(wide)) == wide
    assert SynthSpec.parse("synth:seed=2,n=10,variety=classic") == classic
    assert _cache_key(str(classic), cfg) != _cache_key(str(wide), cfg)
    assert all(s.variety == "wide" for s in wide.shards(3))
    with pytest.raises(ValueError, match="unknown variety"):
        SynthSpec.parse("synth:n=10,variety=huge")


# --------------------------------------------------------------------- anisotropy


@pytest.mark.parametrize("n", [2, 4, 6])
@pytest.mark.parametrize("form", [{"form": "cos_n", "p": 2.5}, {"form": "von_mises", "kappa": 3.0}])
def test_fold_tables_match_the_form(n, form):
    """The renderer's table over cos 2 dphi holds the n-fold form exactly."""
    az = {**form, "n": n, "depth": 0.9}
    table = ph.azimuth_form_table(az)
    dphi = np.linspace(0, np.pi, 181)
    idx = np.round((np.cos(2 * dphi) + 1) * 0.5 * (len(table) - 1)).astype(int)
    want = ph.azimuth_form_weight(az, 0.0, dphi)
    assert np.allclose(table[idx], want, atol=0.02)
    assert want.max() == pytest.approx(1.0) and want.min() < 0.2


def _halo_scene(az):
    return {"detector": "ccd_1k", "size": 256, "geometry": {"q_max": 3.0},
            "background": {"level": 2.0}, "noise": {"read_sigma": 1.0},
            "features": [{"type": "halo", "q0": 1.5, "fwhm_rel": 0.3, "amp": 400.0,
                          "orient_deg": 30.0, "azimuth": az}]}


def _azimuthal_contrast(frame, scene, r0):
    h, w = frame.shape
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy = (w - 1) / 2, (h - 1) / 2
    r = np.hypot(xx - cx, yy - cy)
    phi = np.arctan2(cy - yy, xx - cx)
    band = np.abs(r - r0) < 3
    bins = ((phi[band] + np.pi) / (2 * np.pi) * 36).astype(int) % 36
    v = np.bincount(bins, frame[band] - 10.0, 36) / np.bincount(bins, None, 36)
    return v.min() / v.max()


@pytest.mark.parametrize("n", [2, 4, 6])
def test_smooth_cos2_like_halo_is_anisotropic_weak_modulation_isotropic(n):
    strong = _halo_scene({"form": "cos_n", "n": n, "p": 1.0, "depth": 0.95})
    lab = scene_labels(strong)
    assert lab[T["halo_anisotropic"]] == 1 and lab[T["halo_isotropic"]] == 0
    weak = _halo_scene({"form": "cos_n", "n": n, "p": 1.0, "depth": 0.3})
    lab = scene_labels(weak)
    assert lab[T["halo_isotropic"]] == 1 and lab[T["halo_anisotropic"]] == 0
    # ... and the pixels agree: strong modulation around the halo, weak one not
    from bluesky_xsml.sim.generator import SceneGeometry, complete_scene

    ctx = SceneGeometry(complete_scene(strong))
    r0 = float(ctx.r(1.5))
    assert _azimuthal_contrast(render_scene(strong, 0), strong, r0) < 0.25
    assert _azimuthal_contrast(render_scene(weak, 0), weak, r0) > 0.5
    # in between the thresholds: neither tag (an ambiguous frame is not a positive)
    mid = scene_labels(_halo_scene({"form": "cos_n", "n": n, "p": 1.0, "depth": 0.65}))
    assert mid[T["halo_isotropic"]] == 0 and mid[T["halo_anisotropic"]] == 0


def test_oriented_ring_with_von_mises_arcs():
    sc = {"detector": "pilatus_1m", "size": 256, "geometry": {"q_max": 4.0},
          "background": {"level": 1.0},
          "features": [{"type": "rings", "q": [2.0], "amp": [300.0], "fwhm_rel": 0.01,
                        "orient_deg": 0.0,
                        "azimuth": {"form": "von_mises", "n": 4, "kappa": 4.0, "depth": 1.0}}]}
    lab = scene_labels(sc)
    assert lab[T["ring_oriented"]] == 1 and lab[T["ring_isotropic"]] == 0
    sc["features"][0]["azimuth"]["depth"] = 0.2
    lab = scene_labels(sc)
    assert lab[T["ring_isotropic"]] == 1 and lab[T["ring_oriented"]] == 0


def test_wide_sampler_draws_every_fold_and_labels_by_contrast():
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(40):
        sc = sample_scene(rng, detector="ccd_1k", size=128, variety="wide",
                          tags={"halo_anisotropic": True, "grazing": False})
        for f in sc["features"]:
            if f["type"] == "halo" and f.get("azimuth"):
                az = f["azimuth"]
                w = ph.azimuth_form_weight(az, 0.0, np.linspace(0, 2 * np.pi, 721))
                contrast = w.min() / w.max()
                # clearly one or the other by the label rule, never in between
                assert contrast <= FORM_ANISO_MAX_CONTRAST or contrast >= FORM_ISO_MIN_CONTRAST
                if contrast <= FORM_ANISO_MAX_CONTRAST:
                    seen.add((az["form"], az["n"]))
    assert {n for _, n in seen} == {2, 4, 6} and {f for f, _ in seen} == {"cos_n", "von_mises"}


# --------------------------------------------------------------------- thin and small


def test_one_pixel_streak_on_a_1024_frame_is_tagged_and_shows():
    sc = {"detector": "ccd_1k", "size": 1024, "geometry": {"distance_m": 1.0},
          "background": {"level": 1.0}, "noise": {"read_sigma": 1.0, "offset": 10.0},
          "features": [{"type": "streaks", "angles_deg": [90.0], "amp": 200.0, "r0_px": 20.0,
                        "decay": 0.5, "width_px": 1.0 / 2.3548}]}    # FWHM 1 px
    assert scene_labels(sc)[T["streaks"]] == 1
    frame = render_scene(sc, 1)
    col = int(round((1024 - 1) / 2))
    line = frame[100:400, col] - 10.0
    beside = frame[100:400, col + 4] - 10.0
    assert np.median(line) > 8 * max(np.median(beside), 1.0)
    # too faint to see: not tagged
    sc["features"][0]["amp"] = 2.0
    assert scene_labels(sc)[T["streaks"]] == 0


def test_wide_streaks_are_1_to_5_px_at_1024():
    rng = np.random.default_rng(0)
    widths = []
    for _ in range(12):
        sc = sample_scene(rng, detector="ccd_1k", size=1024, variety="wide",
                          tags={"streaks": True, "grazing": False})
        widths += [2.3548 * f["width_px"] for f in sc["features"] if f["type"] == "streaks"]
    assert widths and min(widths) >= 1.0 - 1e-6 and max(widths) <= 5.0 + 1e-6
    assert min(widths) < 2.0 < max(widths)


def test_wide_isolated_spots_vary_in_size_count_and_stay_visible():
    rng = np.random.default_rng(1)
    counts, fwhm, tagged = [], [], []
    for _ in range(25):
        sc = sample_scene(rng, detector="eiger_1m", size=512, variety="wide",
                          tags={"peaks_isolated": True, "grazing": False})
        for f in sc["features"]:
            if f["type"] == "spots":
                counts.append(len(f["xy"]))
                fwhm += [2.3548 * s for s in f["sigma_px"]]
                # (a smooth feature brightened afterwards can bury them: then untagged)
                tagged.append(scene_labels(sc)[T["peaks_isolated"]] == 1)
    assert np.mean(tagged) >= 0.8
    assert max(counts) >= 6 and min(counts) <= 3
    assert min(fwhm) < 2.0 and max(fwhm) > 4.0 and max(fwhm) <= 6.0 + 1e-6


# --------------------------------------------------------------------- readouts


def _pilatus_scene(readout=None):
    sc = {"detector": "pilatus_1m", "size": 256, "geometry": {"q_max": 3.0},
          "background": {"level": 5.0},
          "features": [{"type": "halo", "q0": 1.2, "fwhm_rel": 0.3, "amp": 300.0}]}
    if readout:
        sc["readout"] = readout
    return sc


def _gap_rows(sc):
    from bluesky_xsml.sim.generator import complete_scene

    return complete_scene(sc)["detector"]["gaps"]["rows"]


def test_interpolated_gaps_are_not_detector_gaps():
    plain = _pilatus_scene()
    assert scene_labels(plain)[T["detector_gaps"]] == 1
    a, z = _gap_rows(plain)[0]
    assert (render_scene(plain, 0)[a:z] == -1).all()
    filled = _pilatus_scene({"kind": "counting", "gaps": "interpolated"})
    assert scene_labels(filled)[T["detector_gaps"]] == 0     # the label follows the pixels
    frame = render_scene(filled, 0)
    assert frame.dtype == np.int32 and frame.min() >= 0
    above, below = frame[a - 1].astype(float), frame[z].astype(float)
    assert np.allclose(frame[a], np.floor(above + (below - above) / (z - a + 1) + 0.5), atol=1)
    # zero-filled gaps stay gaps
    zero = _pilatus_scene({"kind": "integrating_adu", "dtype": "uint16", "gain": 2.0,
                           "offset": 50.0, "read_counts": 1.0, "gaps": "zero"})
    assert scene_labels(zero)[T["detector_gaps"]] == 1
    f = render_scene(zero, 0)
    assert f.dtype == np.uint16 and (f[a:z] == 0).all() and np.median(f) > 50


def test_ccd_16bit_saturated_blob_reads_65535_and_is_saturation():
    sc = {"detector": "ccd_1k", "size": 256, "geometry": {"q_max": 2.0},
          "background": {"level": 3.0}, "noise": {"read_sigma": 1.5, "offset": 20.0},
          "features": [{"type": "direct_beam", "amp": 5e6, "sigma_px": 2.5}],
          "readout": {"kind": "ccd_16bit", "dtype": "uint16", "gaps": "zero"}}
    assert scene_labels(sc)[T["saturation"]] == 1
    frame = render_scene(sc, 0)
    assert frame.dtype == np.uint16
    sat = np.argwhere(frame == 65535)
    assert len(sat) >= 12
    centre = np.array([(256 - 1) / 2] * 2)
    assert np.abs(sat - centre).max() < 12          # one compact plateau at the beam
    sc["features"][0]["amp"] = 2e4                  # below full scale: no saturation
    assert scene_labels(sc)[T["saturation"]] == 0 and render_scene(sc, 0).max() < 65535


def test_8bit_adu_readout_saturates_at_255_in_counts_it_can_hold():
    ro = {"kind": "integrating_adu", "dtype": "uint8", "gain": 0.5, "offset": 4.0,
          "read_counts": 1.0, "gaps": "interpolated"}
    sc = _pilatus_scene(ro)
    sc["features"][0]["amp"] = 2000.0          # 1000 ADU >> 255: clipped
    lab = scene_labels(sc)
    assert lab[T["saturation"]] == 1 and lab[T["detector_gaps"]] == 0
    f = render_scene(sc, 0)
    assert f.dtype == np.uint8 and (f == 255).sum() >= 12
    sc["features"][0]["amp"] = 200.0           # 100 ADU: fits
    assert scene_labels(sc)[T["saturation"]] == 0 and (render_scene(sc, 0) == 255).sum() == 0


def test_float_corrected_readout_scales_and_masks_with_nan():
    ro = {"kind": "float_corrected", "dtype": "float32", "scale": 1e-3, "flat_sigma": 0.0,
          "gaps": "sentinel"}
    sc = _pilatus_scene(ro)
    f = render_scene(sc, 7)
    counts = render_scene(_pilatus_scene(), 7)
    a, z = _gap_rows(sc)[0]
    assert f.dtype == np.float32 and np.isnan(f[a:z]).all()
    ok = counts >= 0
    assert np.allclose(f[ok], counts[ok] * 1e-3, rtol=1e-6)
    assert scene_labels(sc)[T["detector_gaps"]] == 1


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_wide_labels_follow_the_stored_gaps():
    gen = SceneGenerator(seed=11, size=96, detectors="all", variety="wide")
    kinds = set()
    for i in range(80):
        frame, lab, sc = gen.frame_at(i)
        ro = sc.get("readout") or {}
        kinds.add((ro.get("kind"), str(frame.dtype)))
        rows = sc["detector"]["gaps"]["rows"]
        if not rows:
            continue
        a, z = rows[0]
        flat = frame[a:z].astype(np.float64)
        filled = ro.get("gaps") == "interpolated"
        assert lab[T["detector_gaps"]] == (0 if filled else 1)
        if filled:       # finite counts from the neighbours, no sentinel left
            assert np.isfinite(flat).all() and flat.min() >= 0
            if frame.dtype.kind == "u":
                assert flat.max() < np.iinfo(frame.dtype).max
        if not filled:   # sentinel, NaN, 0 or the dtype maximum in the whole gap
            v = flat[~np.isnan(flat)]
            assert np.isnan(flat).all() or len(np.unique(v)) == 1
    assert {k for k, _ in kinds} >= {"counting", "integrating_adu", "float_corrected", "ccd_16bit"}


def test_apply_readout_without_one_is_the_frame():
    f = np.arange(12, dtype=np.int32).reshape(3, 4)
    assert apply_readout(f, {"detector": {}}, 0) is f


# --------------------------------------------------------------------- geometry, intensities


def test_wide_beam_centres_go_far_off_the_detector_and_horizons_low_contrast():
    rng = np.random.default_rng(5)
    far, below = 0, []
    for _ in range(150):
        sc = sample_scene(rng, detector="pilatus_1m", size=64, variety="wide")
        h, w = sc["detector"]["shape"]
        x, y = sc["geometry"]["beam_center"]
        if min(x, y, w - 1 - x, h - 1 - y) < -0.3 * max(h, w):
            far += 1
        if sc.get("grazing"):
            below.append(sc["grazing"]["below"])
    assert far >= 3
    assert max(below) > 0.02 and min(below) < 0.01
    assert WIDE.low_contrast_below[1] <= 0.3       # 'strongly attenuated' still: >= 3x


def test_float_scales_span_six_decades():
    rng = np.random.default_rng(9)
    scales = []
    for _ in range(200):
        sc = sample_scene(rng, detector="eiger_1m", size=32, variety="wide")
        ro = sc.get("readout") or {}
        if ro.get("kind") == "float_corrected":
            scales.append(ro["scale"])
    assert math.log10(max(scales) / min(scales)) >= 4.5   # of a 1e-3..1e3 (6 decade) range


def test_wide_dataset_round_trip(tmp_path):
    from bluesky_xsml.sim.dataset import open_dataset, write_dataset

    path = tmp_path / "w.zarr"
    write_dataset(str(path), 10, size=48, seed=4, workers=1, progress=False, variety="wide")
    ds = open_dataset(str(path))
    gen = SceneGenerator(seed=4, size=48, variety="wide")
    for i in range(10):
        frame, lab, _ = gen.frame_at(i)
        got = ds.frame(i)
        assert got.dtype == frame.dtype
        assert np.array_equal(got.view(np.uint8), frame.view(np.uint8))
        assert np.array_equal(ds.labels[i], lab)


def test_wide_gisaxs_scenes_usually_have_a_beamstop_of_either_shape():
    def shapes(variety):
        rng = np.random.default_rng(8)
        out = []
        for _ in range(60):
            sc = sample_scene(rng, detector="pilatus_1m", size=64, variety=variety,
                              tags={"horizon": True})
            out.append((sc.get("beamstop") or {}).get("type"))
        return out

    wide, classic = shapes("wide"), shapes("classic")
    assert {"circular", "linear"} <= set(wide)
    assert sum(t is not None for t in wide) > sum(t is not None for t in classic) + 5


def test_a_one_pixel_spot_is_judged_by_its_brightest_pixel():
    def scene(x, y, amp):
        return {"detector": "ccd_1k", "size": 256, "geometry": {"q_max": 2.0},
                "background": {"level": 1.0}, "noise": {"read_sigma": 1.0},
                "features": [{"type": "spots", "xy": [[x, y]], "amp": amp,
                              "sigma_px": 1.0 / 2.3548}]}

    # threshold about 8.7 counts here: 14 at the centre shows on a pixel centre ...
    on = scene(60.0, 70.0, 14.0)
    assert scene_labels(on)[T["peaks_isolated"]] == 1
    # ... but not half-way between four pixels, where the brightest pixel gets a quarter
    between = scene(60.5, 70.5, 14.0)
    assert scene_labels(between)[T["peaks_isolated"]] == 0
    f = render_scene(scene(60.5, 70.5, 14.0), 0).astype(float) - 10.0
    assert f[69:73, 59:63].max() < 14.0 * 0.6 + 4 * 1.0


def test_a_store_of_one_profile_is_not_resumed_as_the_other(tmp_path):
    from bluesky_xsml.sim.dataset import write_dataset

    path = str(tmp_path / "c.zarr")
    write_dataset(path, 2, size=32, seed=1, workers=1, progress=False)
    with pytest.raises(ConfigurationError, match="variety: 'classic' != 'wide'"):
        write_dataset(path, 2, size=32, seed=1, workers=1, progress=False, variety="wide")
    assert write_dataset(path, 2, size=32, seed=1, workers=1, progress=False) == 2


def test_n_fold_forms_render_where_the_labels_put_them():
    """The brightest azimuths of the rendered frame are the form's maxima (y up, from +x)."""
    for n in (2, 4, 6):
        sc = _halo_scene({"form": "von_mises", "n": n, "kappa": 4.0, "depth": 1.0})
        sc["background"]["level"] = 0.0
        sc["features"][0]["amp"] = 2000.0
        frame = render_scene(sc, 0).astype(float) - 10.0
        h, w = frame.shape
        yy, xx = np.mgrid[0:h, 0:w]
        phi = np.degrees(np.arctan2((h - 1) / 2 - yy, xx - (w - 1) / 2)) % 360
        r = np.hypot(xx - (w - 1) / 2, yy - (h - 1) / 2)
        band = (r > 30) & (r < 120)
        bins = (phi[band] // 5).astype(int)
        prof = np.bincount(bins, frame[band], 72) / np.maximum(np.bincount(bins, None, 72), 1)
        peak = (np.argmax(prof) + 0.5) * 5
        lobes = (30.0 + np.arange(n) * 360.0 / n) % 360
        assert np.min(np.abs((peak - lobes + 180) % 360 - 180)) <= 7.5


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_interpolation_fills_a_bad_pixel_beside_a_gap_first():
    frame = np.full((10, 8), 100, np.int32)
    frame[6:] = 160
    frame[4:6] = -1                      # gap rows
    frame[3, 2] = -2                     # bad pixel right above the gap
    sc = {"detector": {"gaps": {"rows": [[4, 6]], "cols": []}, "bad_pixels": [[3, 2]]},
          "readout": {"kind": "counting", "gaps": "interpolated"}}
    out = apply_readout(frame, sc, 0)
    assert out.dtype == np.int32 and out.min() >= 100
    assert out[3, 2] == 100
    assert list(out[4:6, 2]) == [120, 140]     # linear between rows 3 and 6, bad pixel included


@pytest.mark.parametrize("readout", [
    {"kind": "float_corrected", "dtype": "float32", "scale": 0.01, "flat_sigma": 0.03,
     "gaps": "sentinel"},
    {"kind": "integrating_adu", "dtype": "int32", "gain": 3.0, "offset": 20.0,
     "read_counts": 2.0, "gaps": "zero"},
])
def test_a_full_well_stays_one_plateau_under_every_readout(readout):
    sc = {"detector": {"name": "pilatus_1m", "count_cutoff": 5000}, "size": 256,
          "geometry": {"q_max": 2.0}, "background": {"level": 2.0},
          "features": [{"type": "direct_beam", "amp": 1e6, "sigma_px": 2.5}],
          "readout": readout}
    assert scene_labels(sc)[T["saturation"]] == 1
    frame = render_scene(sc, 3)
    top = np.nanmax(frame)
    assert (frame == top).sum() >= 12          # a plateau, not a noisy cap
    expect = 5000 * readout.get("scale", readout.get("gain", 1.0)) + readout.get("offset", 0.0)
    assert top == pytest.approx(expect, rel=1e-6)


def test_classic_cache_keys_follow_the_pinned_frames_and_wide_ones_the_source(monkeypatch):
    """Cached classic frames stay valid while the digests above hold; a wide key changes
    with any change to the generator's source."""
    from pathlib import Path

    from bluesky_xsml.preprocess import PreprocessConfig
    from bluesky_xsml.training import data

    classic = "synth:seed=4,n=2000,sizes=256+512,detectors=train,start=2000"
    wide = classic + ",variety=wide"
    before = _cache_key(classic, PreprocessConfig()), _cache_key(wide, PreprocessConfig())
    assert data.generator_fingerprint("classic") == data.CLASSIC_FINGERPRINT
    read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes",
                        lambda self: read(self) + (b"# edit" if self.parent.name == "sim" else b""))
    after = _cache_key(classic, PreprocessConfig()), _cache_key(wide, PreprocessConfig())
    assert after[0] == before[0]
    assert after[1] != before[1]
