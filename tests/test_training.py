"""Training, evaluation, metrics and the traditional baseline (fast, tiny data)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from bluesky_xsml import cli  # noqa: E402
from bluesky_xsml.tags import TAG_NAMES  # noqa: E402
from bluesky_xsml.training import metrics  # noqa: E402
from bluesky_xsml.training.baseline import N_FEATURES, ProfileBaseline, profile_features  # noqa: E402
from bluesky_xsml.training.data import ConcatRows, SynthSpec, load_arrays, save_arrays  # noqa: E402
from bluesky_xsml.training.train import augment, pos_weights  # noqa: E402

T = len(TAG_NAMES)
TINY = ["--widths", "8,16", "--depths", "1,1", "--stem-width", "8", "--batch-size", "32",
        "--lr", "1e-2", "--warmup", "0.2", "--threads", "1", "--precision", "fp32",
        "--no-progress", "--workers", "1"]


def toy_arrays(path, n, seed):
    """A learnable toy problem on 32x32 inputs.

    Tag 0: a bright block in the left half; tag 1: an invalid (masked) band.
    All other tags are unknown (NaN), so only two tags are scored.
    """
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 0.1, (n, 6, 32, 32)).astype(np.float32)
    y = np.full((n, T), np.nan, np.float32)
    y[:, 0] = rng.random(n) < 0.4
    y[:, 1] = rng.random(n) < 0.3
    for i in range(n):
        if y[i, 0]:
            r, c = rng.integers(4, 24), rng.integers(2, 10)
            x[i, 0:3, r:r + 6, c:c + 6] += 0.8
        if y[i, 1]:
            c = rng.integers(0, 26)
            x[i, 3, :, c:c + 6] = 1.0
    x[:, 2] = x[:, 0] / x[:, 0].max(axis=(1, 2), keepdims=True)  # as preprocessing makes it
    feats = np.stack([x[:, 0, :, :16].mean((1, 2)), x[:, 3].max((1, 2))], 1)
    feats = np.concatenate([feats, rng.normal(size=(n, 3))], 1)
    return save_arrays(path, x, y, features=feats, detectors=["toy"] * n,
                       shapes=[[32, 32]] * n)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    return str(toy_arrays(root / "train", 256, 0)), str(toy_arrays(root / "val", 96, 1))


def run_cli(argv, capsys):
    assert cli.main(argv) == 0
    return capsys.readouterr().out


# ------------------------------------------------------------------ metrics


def test_average_precision_and_auc_on_known_inputs():
    y = np.array([1, 0, 1, 0, 0.0])
    s = np.array([0.9, 0.8, 0.7, 0.2, 0.1])
    assert metrics.average_precision(y, s) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert metrics.roc_auc(y, s) == pytest.approx(5 / 6)
    # perfect ranking, reversed ranking, all tied
    assert metrics.average_precision([0, 1, 1], [0.1, 0.5, 0.9]) == 1.0
    assert metrics.roc_auc([0, 1, 1], [0.9, 0.5, 0.1]) == 0.0
    assert metrics.roc_auc([0, 1, 0, 1], [0.5] * 4) == 0.5
    assert metrics.average_precision([0, 1, 0, 1], [0.5] * 4) == 0.5
    # no positives: undefined
    assert np.isnan(metrics.average_precision([0, 0], [0.1, 0.2]))


def test_metrics_match_sklearn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(3)
    y = (rng.random(500) < 0.2).astype(float)
    s = np.round(rng.random(500) * 0.7 + 0.4 * y, 2)  # with ties
    assert metrics.average_precision(y, s) == pytest.approx(average_precision_score(y, s))
    assert metrics.roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))


def test_masked_labels_are_ignored_by_metrics():
    y = np.array([[1, np.nan], [0, 1], [1, 0], [np.nan, np.nan]])
    s = np.array([[0.9, 0.99], [0.2, 0.8], [0.7, 0.3], [0.95, 0.0]])
    m = metrics.evaluate_scores(y, s, ["a", "b"])
    assert m.ap.tolist() == [1.0, 1.0]  # the NaN rows would spoil both if counted
    assert m.n_known.tolist() == [3, 2]
    # a tag with no known label is left out of the mean
    y2 = np.column_stack([y[:, 0], np.full(4, np.nan)])
    m2 = metrics.evaluate_scores(y2, s, ["a", "b"])
    assert m2.n_scored == 1 and m2.mean_ap == 1.0


def test_best_f1_threshold_separates():
    thr, f1 = metrics.best_f1_threshold([0, 0, 1, 1], [0.1, 0.3, 0.6, 0.9])
    assert 0.3 < thr < 0.6 and f1 == 1.0


def test_masked_labels_are_ignored_by_the_loss():
    from bluesky_xsml.model import TaggerNet, TaggerNetConfig

    torch.manual_seed(0)
    net = TaggerNet(TaggerNetConfig(n_tags=3, widths=(8,), depths=(1,), stem_width=8)).eval()
    x = torch.randn(4, 6, 16, 16)
    y = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    y_masked = y.clone()
    y_masked[:, 2] = float("nan")
    _, full = net(x, y)
    logits, masked = net(x, y_masked)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, :2], y[:, :2])
    assert torch.isfinite(masked)
    assert masked.item() == pytest.approx(expected.item(), rel=1e-5)
    assert masked.item() != pytest.approx(full.item(), rel=1e-3)


# ---------------------------------------------------------------------- data


def test_synth_spec_and_shards():
    spec = SynthSpec.parse("synth:seed=2,n=5,sizes=256+native,detectors=heldout")
    assert spec.sizes == (256, None) and spec.detectors == ("heldout",)
    assert SynthSpec.parse(str(spec)) == spec
    shards = SynthSpec(n=5000).shards(2000)
    assert [(s.start, s.n) for s in shards] == [(0, 2000), (2000, 2000), (4000, 1000)]
    with pytest.raises(ValueError, match="unknown synthetic spec key"):
        SynthSpec.parse("synth:frames=3")


def test_concat_rows_indexing():
    a, b = np.arange(12).reshape(6, 2), np.arange(12, 20).reshape(4, 2)
    c = ConcatRows([a, b])
    ref = np.concatenate([a, b])
    idx = np.array([9, 0, 5, 6, 3])
    assert np.array_equal(c[idx], ref[idx]) and np.array_equal(c[2:8], ref[2:8])


def test_synthetic_source_is_built_and_cached(tmp_path):
    src = "synth:seed=7,n=4,sizes=64+96"
    a = load_arrays(src, cache_dir=tmp_path, progress=False)
    assert a.inputs.shape == (4, 6, 128, 128) and a.inputs.dtype == np.float16
    assert a.labels.shape == (4, T) and a.features.shape == (4, N_FEATURES)
    assert max(a.shapes[0]) == 64 and max(a.shapes[1]) == 96
    b = load_arrays(src, cache_dir=tmp_path, progress=False)  # from the cache
    assert np.array_equal(np.asarray(a.inputs), np.asarray(b.inputs))
    assert len(list(tmp_path.iterdir())) == 1


def test_sources_joined_by_a_bar_are_concatenated_in_order(tmp_path):
    first, second = "synth:seed=7,n=3,sizes=64", "synth:seed=8,n=2,sizes=96,variety=wide"
    a = load_arrays(first, cache_dir=tmp_path, progress=False)
    b = load_arrays(second, cache_dir=tmp_path, progress=False)
    both = load_arrays(f"{first} | {second}", cache_dir=tmp_path, progress=False)
    assert len(both) == 5 and both.source == f"{a.source}|{b.source}"
    assert np.array_equal(np.asarray(both.inputs), np.concatenate([a.inputs, b.inputs]))
    assert np.array_equal(both.labels, np.concatenate([a.labels, b.labels]), equal_nan=True)
    assert [max(s) for s in both.shapes] == [64, 64, 64, 96, 96]
    assert len(list(tmp_path.iterdir())) == 2  # each part keeps its own cache entry
    with pytest.raises(ValueError, match="empty part"):
        load_arrays(f"{first}|", cache_dir=tmp_path, progress=False)


def test_zarr_source_from_xsml_synth(tmp_path):
    dataset = pytest.importorskip("bluesky_xsml.sim.dataset")
    store = tmp_path / "tiny.zarr"
    dataset.write_dataset(str(store), 3, size=64, seed=5, workers=1, progress=False)
    a = load_arrays(str(store), cache_dir=tmp_path / "cache", progress=False)
    ds = dataset.open_dataset(str(store))
    assert a.inputs.shape == (3, 6, 128, 128)
    assert np.array_equal(a.labels, np.asarray(ds.labels, np.float32))
    assert [tuple(s) for s in a.shapes] == [ds.frame(i).shape for i in range(3)]


def test_augmentation_flips_horizontally_only():
    x = torch.zeros(64, 6, 8, 8)
    x[:, 0, 1, 0] = 0.5  # a bright block-mean at top left
    x[:, 2] = x[:, 0] / 0.5
    out = augment(x.clone(), generator=torch.Generator().manual_seed(0), log_scale_range=0.0)
    flipped = out[:, 0, 1, 7] > 0
    assert 10 < int(flipped.sum()) < 54  # about half flipped left-right
    assert torch.all(out[:, 0, 6] == 0)  # never moved to another row (no vertical flip)
    scaled = augment(x.clone(), generator=torch.Generator().manual_seed(1), flip_p=0.0)
    assert not torch.equal(scaled[:, 0], x[:, 0])
    assert torch.allclose(scaled[:, 2].amax(dim=(1, 2)), torch.ones(64))  # relative recomputed


def test_pos_weights_grow_for_rare_tags():
    y = np.zeros((100, 3), np.float32)
    y[:50, 0] = 1
    y[:5, 1] = 1
    y[:, 2] = np.nan
    w = pos_weights(y)
    assert w[0] == pytest.approx(1.0) and w[1] == pytest.approx(np.sqrt(95 / 5), rel=1e-4)


# ------------------------------------------------------------ train/evaluate


def test_train_learns_toy_problem_and_resumes(toy, tmp_path, capsys):
    train, val = toy
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    base = ["train", "--data", train, "--val-data", val, "--seed", "3", *TINY]
    run_cli([*base, "--epochs", "3", "--out", str(out_a)], capsys)
    hist = [json.loads(line) for line in (out_a / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[-1]["train_loss"] < 0.75 * hist[0]["train_loss"]
    assert hist[-1]["val_mAP"] > 0.9

    # the same run in two parts: stopped after 1 epoch, then the command rerun
    run_cli([*base, "--epochs", "3", "--stop-after", "1", "--out", str(out_b)], capsys)
    assert len((out_b / "history.jsonl").read_text().splitlines()) == 1
    text = run_cli([*base, "--epochs", "3", "--out", str(out_b)], capsys)
    assert "resuming from" in text and "after epoch 1" in text
    hist_b = [json.loads(line) for line in (out_b / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist_b] == [1, 2, 3]
    for h_a, h_b in zip(hist, hist_b, strict=True):
        assert h_b["train_loss"] == pytest.approx(h_a["train_loss"], rel=1e-3, abs=1e-4)
    state_a = torch.load(out_a / "last.pt", weights_only=True)
    state_b = torch.load(out_b / "last.pt", weights_only=True)
    assert state_b["step"] == state_a["step"]
    for k, v in state_a["state_dict"].items():
        assert torch.allclose(v.float(), state_b["state_dict"][k].float(), atol=1e-3), k

    # the shipped form: a loadable Tagger with the validation max-F1 thresholds
    from bluesky_xsml.inference.tagger import Tagger

    tagger = Tagger.load(out_a / "model.pt")
    assert tagger.net.config.widths == (8, 16)
    assert tagger.metadata["trained_by"] == "xsml train"
    assert 0.0 < tagger.thresholds[0] < 1.0 and tagger.thresholds[0] != 0.5
    assert float(tagger.net.pos_weight[0]) > 1.0  # set from the label frequencies

    # nothing left to do: a rerun is a no-op that keeps the model
    text = run_cli([*base, "--epochs", "3", "--out", str(out_a)], capsys)
    assert "already trained" in text

    # --init: a new run starts from those weights (lr 0 keeps them; the shape comes along)
    out_c = tmp_path / "c"
    text = run_cli(["train", "--data", train, "--val-data", val, *TINY, "--widths", "4",
                    "--depths", "1", "--lr", "0", "--epochs", "1", "--init",
                    str(out_a / "model.pt"), "--out", str(out_c)], capsys)
    assert f"starting from the weights of {out_a / 'model.pt'}" in text
    started = Tagger.load(out_c / "model.pt")
    assert started.net.config.widths == (8, 16)
    assert started.metadata["init_checkpoint"] == tagger.checkpoint_id
    for k, v in tagger.net.state_dict().items():
        if v.ndim >= 2:  # conv and head weights; batch-norm statistics follow the data
            assert torch.allclose(v, started.net.state_dict()[k], rtol=0, atol=1e-6), k
    # --relation with --init: the block is added to that network and starts as a no-op
    out_r = tmp_path / "r"
    run_cli(["train", "--data", train, "--val-data", val, *TINY, "--relation", "1",
             "--relation-heads", "2", "--lr", "0", "--epochs", "1", "--init",
             str(out_a / "model.pt"), "--out", str(out_r)], capsys)
    related = Tagger.load(out_r / "model.pt")
    assert related.net.config.relation_stage == 1 and related.net.config.widths == (8, 16)
    assert int(torch.count_nonzero(related.net.relation.out.weight)) == 0
    with pytest.raises(SystemExit, match="--relation: relation_stage 5 is not a stage index"):
        cli.main(["train", "--data", train, "--val-data", val, *TINY, "--relation", "5",
                  "--init", str(out_a / "model.pt"), "--out", str(tmp_path / "r5")])
    with pytest.raises(SystemExit, match="--init: checkpoint file"):
        cli.main(["train", "--data", train, "--val-data", val, *TINY, "--init",
                  str(tmp_path / "missing.pt"), "--out", str(tmp_path / "d")])

    # evaluate: table, outputs, baseline, and the exact last line
    ev = tmp_path / "ev"
    text = run_cli(["evaluate", "--model", str(out_a), "--data", val, "--out", str(ev),
                    "--baseline", "--baseline-train", train, "--by-detector", "--by-size",
                    "--no-progress",
                    "--summary", str(tmp_path / "summary.json")], capsys)
    last = text.strip().splitlines()[-1]
    assert re.fullmatch(r"mAP \d\.\d{4} over 2 tags", last), last
    assert float(last.split()[1]) > 0.9
    result = json.loads((ev / "metrics.json").read_text())
    assert result["n_tags_scored"] == 2 and result["baseline"]["mAP"] is not None
    assert (ev / "pr_curves.png").stat().st_size > 1000
    assert "per longest frame side" in text
    assert list(result["per_size"]) == ["32"] and result["per_size"]["32"]["n"] == 96
    assert result["per_size"]["32"]["mAP"] == pytest.approx(float(last.split()[1]), abs=1e-4)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test"]["mAP"] == pytest.approx(float(last.split()[1]), abs=1e-4)


# ------------------------------------------------------------------ baseline


def test_profile_features_see_rings_and_masks():
    yy, xx = np.mgrid[0:128, 0:160]
    r = np.hypot(xx - 80, yy - 64)
    rng = np.random.default_rng(0)
    flat = rng.poisson(5, r.shape).astype(np.int32)
    ring = rng.poisson(5 + 500 * np.exp(-0.5 * ((r - 40) / 1.5) ** 2)).astype(np.int32)
    f_flat = profile_features(flat, (80, 64))
    f_ring = profile_features(ring, (80, 64))
    assert f_flat.shape == (N_FEATURES,) and np.isfinite(f_ring).all()
    sharp = 6 * 24 + 2 * 16  # first "sharpness" feature: radial second difference
    assert f_ring[sharp] > 5 * f_flat[sharp]
    gapped = flat.copy()
    gapped[:, 70:75] = -1
    masked_fraction = -4  # global features end with masked, saturated, log size, aspect
    assert profile_features(gapped)[masked_fraction] == pytest.approx(5 / 160)
    eiger = np.full((64, 64), 3, np.uint32)
    eiger[10] = 2**32 - 1
    assert profile_features(eiger)[masked_fraction] == pytest.approx(1 / 64)


def test_baseline_fits_and_ignores_unknown_labels():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 6))
    y = np.stack([X[:, 0] > 0.5, X[:, 1] + X[:, 2] > 0, np.zeros(300)], 1).astype(np.float32)
    y[:100, 0] = np.nan
    model = ProfileBaseline().fit(X, y)
    p = model.predict_proba(X)
    assert p.shape == (300, 3) and np.all((p >= 0) & (p <= 1))
    m = metrics.evaluate_scores(y, p, ["a", "b", "c"])
    assert m.ap[0] > 0.95 and m.ap[1] > 0.95 and np.isnan(m.ap[2])
    with pytest.raises(RuntimeError, match="not fitted"):
        ProfileBaseline().predict_proba(X)
