"""Calibrated probabilities: ECE maths, the Platt map, checkpoints and the two commands."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bluesky_xsml.calibration import Calibration
from bluesky_xsml.training.calibrate import fit_platt
from bluesky_xsml.training.metrics import (
    average_precision,
    calibration_errors,
    expected_calibration_error,
    reliability_bins,
)


# ------------------------------------------------------------------ ECE maths
def test_ece_of_a_perfectly_calibrated_score_is_zero():
    # in each bin the fraction of positives is exactly the probability said
    y, s = [], []
    for p, n_pos, n in [(0.1, 1, 10), (0.3, 3, 10), (0.5, 5, 10), (0.8, 8, 10), (1.0, 4, 4)]:
        y += [1] * n_pos + [0] * (n - n_pos)
        s += [p] * n
    assert expected_calibration_error(y, s) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_an_overconfident_score_is_the_known_gap():
    # 10 frames said 0.95 with 5 positive (gap 0.45), 10 said 0.05 with none (gap 0.05):
    # ECE = (10 * 0.45 + 10 * 0.05) / 20 = 0.25
    y = [1] * 5 + [0] * 5 + [0] * 10
    s = [0.95] * 10 + [0.05] * 10
    assert expected_calibration_error(y, s) == pytest.approx(0.25, abs=1e-12)
    # one bin: |mean prob - fraction positive| = |0.9 - 0.6|
    assert expected_calibration_error([1, 1, 1, 0, 0], [0.9] * 5, n_bins=1) == \
        pytest.approx(0.3, abs=1e-12)


def test_ece_leaves_unknown_labels_out_and_bins_the_edges():
    y = np.array([1, 0, 0, 0, 0, np.nan, np.nan], float)
    s = np.array([0.2] * 5 + [0.99, 0.01])
    assert expected_calibration_error(y, s) == pytest.approx(0.0, abs=1e-12)
    count, _, _ = reliability_bins(y, s, n_bins=15)
    assert count.sum() == 5                      # the two unknowns are not counted
    count, _, _ = reliability_bins([1, 0], [1.0, 0.0], n_bins=15)
    assert count[0] == 1 and count[-1] == 1      # p = 1 is in the last bin
    assert np.isnan(expected_calibration_error([np.nan], [0.5]))


def test_calibration_errors_per_tag_and_pooled():
    y = np.array([[1, 0], [0, 0], [1, np.nan], [0, 1]], float)
    s = np.array([[0.9, 0.1], [0.9, 0.1], [0.9, 0.9], [0.9, 0.1]])
    per_tag, pooled = calibration_errors(y, s)
    assert per_tag[0] == pytest.approx(0.4)       # 0.9 said, 2 of 4 positive
    assert per_tag[1] == pytest.approx(abs(0.1 - 1 / 3))
    # pooled: 4 at 0.9 with 2 positive (0.4), 3 at 0.1 with 1 positive (0.2333)
    assert pooled == pytest.approx((4 * 0.4 + 3 * (1 / 3 - 0.1)) / 7)


# ----------------------------------------------------------- the Platt map
def overconfident(n=6000, seed=0, sharpen=3.0, shift=0.0):
    """Labels drawn at p = sigmoid(z); scores sigmoid(sharpen * z + shift): miscalibrated."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 2, (n, 3))
    y = (rng.random((n, 3)) < 1 / (1 + np.exp(-z))).astype(float)
    s = (1 / (1 + np.exp(-(sharpen * z + shift)))).astype(np.float32)
    return y, s


def test_fit_reduces_ece_and_keeps_ranking_and_decisions():
    y, s = overconfident(shift=np.array([0.0, 1.0, -1.5]))
    vy, vs = overconfident(seed=1, shift=np.array([0.0, 1.0, -1.5]))
    y[::7, 1] = np.nan                            # unknown labels are left out of the fit
    a, b = fit_platt(vy, vs)
    assert np.all(a > 0) and np.all(np.abs(a - 1 / 3) < 0.05)
    thresholds = np.array([0.5, 0.3, 0.7], np.float32)
    cal = Calibration(a, b, pinned=thresholds)
    before, pooled_before = calibration_errors(y, s)
    after, pooled_after = calibration_errors(y, cal.apply(s))
    assert pooled_before > 0.1 and pooled_after < 0.02 and np.all(after < before / 4)
    # increasing on a fine grid, so AP is unchanged
    grid = np.linspace(0, 1, 100001, dtype=np.float32)[:, None].repeat(3, 1)
    assert np.all(np.diff(cal.apply(grid), axis=0) >= 0)
    for j in range(3):
        assert average_precision(y[:, j], cal.apply(s)[:, j]) == \
            pytest.approx(average_precision(y[:, j], s[:, j]), abs=1e-9)
    # the same decisions at the mapped thresholds
    mapped = cal.map_thresholds(thresholds)
    assert np.array_equal(cal.apply(s) >= mapped, s >= thresholds)


def test_decisions_hold_at_the_threshold_even_where_the_map_compresses():
    # a strongly compressing map rounds neighbouring float32 inputs to one output;
    # the pinned thresholds keep the inputs just below and at each threshold apart
    thresholds = np.array([0.3, 0.61, 0.9], np.float32)
    cal = Calibration([0.02, 0.05, 0.03], [0.0, 0.2, -0.1], pinned=thresholds)
    near = []
    for t in thresholds:
        x = t
        for _ in range(200):
            x = np.nextafter(x, np.float32(0))
        for _ in range(400):
            near.append(x)
            x = np.nextafter(x, np.float32(1))
    near = np.array(near, np.float32)
    s = np.stack([near] * 3, axis=1)
    assert np.unique(cal._map(s)[:, 0]).size < np.unique(s[:, 0]).size  # it does compress
    mapped = cal.map_thresholds(thresholds)
    assert np.array_equal(cal.apply(s) >= mapped, s >= thresholds)
    assert np.all(np.diff(cal.apply(np.sort(s, axis=0)), axis=0) >= 0)


def test_calibration_validates_and_round_trips():
    with pytest.raises(ValueError, match="> 0"):
        Calibration([1.0, -0.5], [0.0, 0.0])
    with pytest.raises(ValueError, match="one a, b"):
        Calibration([1.0, 1.0], [0.0])
    with pytest.raises(ValueError, match="unknown calibration"):
        Calibration.from_dict({"method": "isotonic", "a": [1.0], "b": [0.0]})
    cal = Calibration([0.5, 2.0], [0.1, -0.3], pinned=[0.4, np.nan], info={"fitted_on": "x"})
    back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert np.array_equal(back.a, cal.a) and np.array_equal(back.b, cal.b)
    assert back.pinned[0] == 0.4 and np.isnan(back.pinned[1]) and back.info == cal.info
    p = np.array([[0.2, 0.7]], np.float32)
    np.testing.assert_allclose(cal.invert(cal.apply(p)), p, atol=1e-6)
    assert fit_platt(np.array([[1.0], [1.0]]), np.array([[0.2], [0.9]]))[0][0] == 1.0


# ------------------------------------------------------------- the checkpoint
@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(5)
    return [rng.poisson(rng.uniform(0.5, 40), (96, 120)).astype(np.int32) for _ in range(12)]


def test_checkpoint_round_trip_with_and_without_calibration(tmp_path, frames):
    import torch

    from bluesky_xsml import Tagger
    from bluesky_xsml.errors import CheckpointError
    from tests.conftest import make_distinct_tagger

    raw = make_distinct_tagger(precision="fp32")
    raw_id = raw.checkpoint_id
    raw.save(tmp_path / "raw.pt")
    ckpt = torch.load(tmp_path / "raw.pt", weights_only=True)
    assert ckpt["format_version"] == 1 and "calibration" not in ckpt   # as before
    again = Tagger.load(tmp_path / "raw.pt", precision="fp32")
    assert again.calibration is None and again.checkpoint_id == raw_id
    p_raw = again.predict(frames)

    n = len(raw.tags)
    rng = np.random.default_rng(0)
    cal = Calibration(rng.uniform(0.3, 2.0, n), rng.uniform(-1, 1, n),
                      pinned=raw.thresholds.astype(np.float64), info={"fitted_on": "test"})
    raw.set_calibration(cal)
    assert raw.checkpoint_id != raw_id and raw.metadata["parent_id"] == raw_id
    p_cal = raw.predict(frames)
    np.testing.assert_allclose(p_cal, cal.apply(p_raw), atol=1e-6)
    assert not np.allclose(p_cal, p_raw, atol=1e-3)
    assert raw.decide(p_cal) == again.decide(p_raw)           # the same tags on every frame
    raw.save(tmp_path / "cal.pt")
    ckpt = torch.load(tmp_path / "cal.pt", weights_only=True)
    assert ckpt["format_version"] == 2 and ckpt["calibration"]["info"] == {"fitted_on": "test"}
    loaded = Tagger.load(tmp_path / "cal.pt", precision="fp32")
    assert loaded.checkpoint_id == raw.checkpoint_id
    assert np.array_equal(loaded.thresholds, raw.thresholds)
    np.testing.assert_array_equal(loaded.predict(frames), p_cal)
    assert loaded.describe()["calibration"]["available"] is True
    np.testing.assert_allclose(loaded.uncalibrated_thresholds(), again.thresholds, atol=1e-6)

    ckpt["calibration"]["a"][0] *= 1.5                        # the map is in the content id
    with pytest.raises(CheckpointError, match="content id mismatch"):
        Tagger.from_checkpoint_dict(ckpt)
    for bad, message in [({"method": "isotonic"}, "malformed"),
                         ({"a": [1.0], "b": [0.0]}, "calibration is for 1 tags"),
                         ({"a": [-1.0] * n, "b": [0.0] * n}, "malformed")]:
        with pytest.raises(CheckpointError, match=message):
            Tagger.from_checkpoint_dict({**ckpt, "calibration": bad})


def test_the_packaged_checkpoint_loads_unchanged():
    from bluesky_xsml import Tagger
    from bluesky_xsml.checkpoints import default_checkpoint_path

    path = default_checkpoint_path()
    if not path.exists():
        pytest.skip("no packaged default")
    summary = json.loads(path.with_suffix(".json").read_text())
    tagger = Tagger.load(precision="fp32")
    assert tagger.calibration is None and tagger.checkpoint_id == summary["checkpoint_id"]


def test_fine_tuning_a_calibrated_tagger_starts_from_its_raw_thresholds():
    from bluesky_xsml.training.finetune import grow_head
    from tests.conftest import make_distinct_tagger

    t = make_distinct_tagger(precision="fp32")
    raw_thr = t.thresholds.copy()
    n = len(t.tags)
    t.set_calibration(Calibration(np.full(n, 0.5), np.full(n, 0.7), pinned=raw_thr))
    assert not np.allclose(t.thresholds, raw_thr, atol=1e-3)
    grown = grow_head(t, ["new_tag"])
    assert grown.calibration is None
    np.testing.assert_allclose(grown.thresholds[:n], raw_thr, atol=1e-6)


# --------------------------------------------------------------- the commands
def test_calibrate_and_evaluate_commands_on_a_tiny_spec(tmp_path, capsys):
    from bluesky_xsml import Tagger, cli
    from tests.conftest import make_distinct_tagger

    model = tmp_path / "m.pt"
    make_distinct_tagger(precision="fp32").save(model)
    common = ["--cache-dir", str(tmp_path / "cache"), "--workers", "1", "--no-progress"]
    val, test = "synth:seed=11,n=24,sizes=64+96", "synth:seed=12,n=24,sizes=64+96"
    assert cli.main(["calibrate", "--model", str(model), "--data", val,
                     "--out", str(tmp_path / "cal.pt"), *common]) == 0
    out = capsys.readouterr().out
    assert "pooled ECE" in out and "wrote" in out
    cal = Tagger.load(tmp_path / "cal.pt")
    assert cal.calibration is not None and cal.calibration.info["fitted_on"].startswith(
        "synth:seed=11")
    with pytest.raises(SystemExit, match="already calibrated"):
        cli.main(["calibrate", "--model", str(tmp_path / "cal.pt"), "--data", val,
                  "--out", str(tmp_path / "twice.pt"), *common])

    results = {}
    for name, path in [("raw", model), ("cal", tmp_path / "cal.pt")]:
        ev = tmp_path / f"ev-{name}"
        assert cli.main(["evaluate", "--model", str(path), "--data", test, "--threshold-data",
                         val, "--out", str(ev), "--precision", "fp32", "--summary",
                         str(tmp_path / "summary.json"), "--summary-key", name, *common]) == 0
        text = capsys.readouterr().out
        assert "mean per-tag ECE" in text
        assert (ev / "reliability.png").stat().st_size > 5000
        assert " ECE" in (ev / "per_tag.txt").read_text().splitlines()[0]
        results[name] = json.loads((ev / "metrics.json").read_text())
    summary = json.loads((tmp_path / "summary.json").read_text())
    for name, m in results.items():
        c = m["calibration"]
        assert set(c["ece"]) == set(m["per_tag"]) and c["ece_bins"] == 15
        assert 0 <= c["ece_pooled"] <= 1 and sum(c["reliability_pooled"]["count"]) > 0
        assert summary[name]["ece_pooled"] == c["ece_pooled"]
        assert summary[name]["calibrated"] is (name == "cal")
    # the calibrated model's evaluation also reports its parent's ECE (the map undone)
    assert results["cal"]["calibration"]["uncalibrated"]["ece_pooled"] == pytest.approx(
        results["raw"]["calibration"]["ece_pooled"], abs=2e-4)
    # ranking unchanged: AP per tag equal
    for t, row in results["raw"]["per_tag"].items():
        assert results["cal"]["per_tag"][t]["ap"] == row["ap"]
