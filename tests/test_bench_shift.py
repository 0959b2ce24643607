"""The shifted domains of benchmarks/bench_finetune.py render what they claim.

The fine-tuning benchmark's figures are only as good as its shifted data, so
its scene transforms are checked here on single frames rendered by the
generator: the integrating readout yields float32 ADU frames (offset,
gain, read noise, NaN in the module gaps) with labels recomputed from the
shifted scene; the exposure shift only scales intensities.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from bluesky_xsml.sim.generator import SceneGenerator, render_scene, scene_labels
from bluesky_xsml.tags import TAG_NAMES

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_finetune.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_finetune", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
