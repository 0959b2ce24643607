"""The shifted domains of benchmarks/bench_finetune.py render what they claim.

The fine-tuning benchmark's figures are only as good as its shifted data, so
its scene transforms are checked here on single frames rendered by the
generator: the integrating readout yields float32 ADU frames (offset,
gain, read noise, NaN in the module gaps) with labels recomputed from the
shifted scene; the exposure shift only scales intensities.
"""

from __future__ import annotations

import numpy as np
import pytest

from bluesky_xsml.sim.generator import SceneGenerator, render_scene, scene_labels
from bluesky_xsml.tags import TAG_NAMES

from .conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_finetune.py")


def _first_with_gaps(gen):
    for i in range(50):
        scene, _, _ = gen.scene_at(i)
        if scene["detector"]["gaps"]["rows"] and scene["beam_on"]:
            return i, scene
    raise AssertionError("no beam-on scene with module gaps in the first 50")


def test_integrating_readout_is_float_adu_with_nan_gaps(bench):
    shift = bench.SHIFTS["integrating"]
    gen = SceneGenerator(seed=shift["seed"], size=256, detectors=shift["detectors"])
    i, scene = _first_with_gaps(gen)
    photons = render_scene(scene, np.random.default_rng(1))
    sc = bench.apply_shift(scene, np.random.default_rng([shift["seed"], 7, i]), shift)
    adu = render_scene(sc, np.random.default_rng(1))
    noise = sc["noise"]
    assert shift["gain"][0] <= noise["gain"] <= shift["gain"][1]
    assert shift["offset"][0] <= noise["offset"] <= shift["offset"][1]
    assert shift["read_sigma"][0] <= noise["read_sigma"] <= shift["read_sigma"][1]
    assert photons.dtype.kind in "iu" and adu.dtype == np.float32
    assert adu.shape == photons.shape
    a, z = sc["detector"]["gaps"]["rows"][0]
    assert np.isnan(adu[a:z]).all()
    valid = adu[np.isfinite(adu)]
    # every valid pixel sits on the pedestal (less a few read-noise sigmas) or above it
    assert valid.min() > noise["offset"] - 6 * noise["read_sigma"]
    assert np.median(valid) > noise["offset"] - 3 * noise["read_sigma"]
    assert (scene_labels(scene) == scene_labels(sc)).sum() >= len(TAG_NAMES) - 2
    assert scene_labels(sc)[TAG_NAMES.index("detector_gaps")] == 1
    # the original scene is left as it was
    assert scene["detector"]["family"] in ("pilatus", "eiger")


def test_exposure_shift_scales_intensities_only(bench):
    shift = bench.SHIFTS["exposure"]
    gen = SceneGenerator(seed=shift["seed"], size=256, detectors=shift["detectors"])
    _, scene = _first_with_gaps(gen)
    sc = bench.apply_shift(scene, np.random.default_rng(3), shift)
    k = sc["exposure_scale"]
    assert shift["k_lo"] <= k <= shift["k_hi"]
    assert sc["detector"] == scene["detector"] and sc["noise"] == scene["noise"]
    assert sc["background"]["level"] == pytest.approx(scene["background"]["level"] * k)


def test_renderb_shift_labels_one_seed_and_tests_on_another(bench, tmp_path):
    from bluesky_xsml.preprocess import PreprocessConfig
    from bluesky_xsml.render_b import render_scene

    cfg = PreprocessConfig()
    x, y, xt, yt, raw = bench.renderb_data(3, "renderb:seed=100,n=2", cfg, workers=1,
                                           cache_dir=tmp_path)
    assert x.shape == (3, *xt.shape[1:]) and len(xt) == 2
    assert y.shape == (3, len(TAG_NAMES)) and yt.shape == (2, len(TAG_NAMES))
    # the pool is frames 0-2 of seed 1, with renderer B's own labels
    _, labels, _ = render_scene(1, 2)
    np.testing.assert_array_equal(np.nan_to_num(y[2], nan=-1), np.nan_to_num(labels, nan=-1))
    np.testing.assert_array_equal(raw[0], render_scene(1, 0)[0])
    assert not np.array_equal(x[:2], xt)
    with pytest.raises(ValueError, match="share a seed"):
        bench.renderb_data(3, "renderb:seed=1,n=2,start=10", cfg, workers=1, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="scene shifts only"):
        bench.experiment_setup(None, "renderb", 4, threads=1)
