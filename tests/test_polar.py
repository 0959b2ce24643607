"""The polar view around the beam centre and the head that reads it."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bluesky_xsml import Tagger  # noqa: E402
from bluesky_xsml.model import TaggerNet, TaggerNetConfig  # noqa: E402
from bluesky_xsml.polar import PolarConfig, input_centers, polar_features  # noqa: E402
from bluesky_xsml.preprocess import CHANNELS, PreprocessConfig, preprocess_frame  # noqa: E402
from bluesky_xsml.tags import TAG_NAMES  # noqa: E402

SMALL = dict(n_tags=len(TAG_NAMES), in_channels=len(CHANNELS), widths=(8, 16), depths=(1, 1))


@pytest.mark.parametrize("shape, center", [
    ((1024, 1024), (300.0, 700.0)),
    ((619, 1475), (1400.0, 20.0)),     # a strip, centre near a corner
    ((40, 50), (7.0, 31.0)),           # enlarged by pixel repetition before reduction
    ((2167, 2070), (1000.0, 1900.0)),  # 17x17 blocks
    ((300, 120), (60.0, 150.0)),
])
def test_input_centers_follow_the_preprocessing(shape, center):
    """A lone bright pixel at the beam centre lands in the input block the centre maps to."""
    frame = np.zeros(shape, np.uint32)
    frame[int(center[1]), int(center[0])] = 1000
    x = preprocess_frame(frame, PreprocessConfig(size=128))
    row, col = np.unravel_index(np.argmax(x[1]), x[1].shape)
    cx, cy = input_centers([shape], [center], 128)[0]
    assert (abs(col - cx) <= 0.5 + 1e-9) and (abs(row - cy) <= 0.5 + 1e-9), (row, col, cx, cy)


def spots_on_ring(n_fold: int, phase: float, radius: float = 30.0, center=(60.0, 70.0)):
    """A 6-channel input with ``n_fold`` bright spots at one radius around ``center``."""
    x = np.zeros((6, 128, 128), np.float32)
    for k in range(n_fold):
        t = phase + 2 * math.pi * k / n_fold
        c = int(round(center[0] + radius * math.cos(t)))
        r = int(round(center[1] + radius * math.sin(t)))
        x[1, r, c] = 1.0
        x[0, r, c] = 0.2
    x[2] = x[0] / max(x[0].max(), 1e-6)
    return torch.from_numpy(x)


def test_polar_features_see_the_symmetry_and_not_the_rotation():
    cfg = PolarConfig()
    center = torch.tensor([[60.0, 70.0]] * 3)
    x = torch.stack([spots_on_ring(4, 0.1), spots_on_ring(4, 0.9), spots_on_ring(6, 0.3)])
    f = polar_features(x, center, cfg)
    assert f.shape == (3, cfg.channels, cfg.radial_bins)
    peaks = f[:, : cfg.harmonics + 1]            # harmonics of the dilated block maxima
    ring = int(peaks[0, 0].argmax())               # the radius bin of the spots
    assert abs((ring + 0.5) * cfg.reach * 128 / cfg.radial_bins - 30.0) < 3
    four, rotated, six = peaks[:, :, ring]
    # turning the pattern about the beam changes little; four spots ring at harmonic 4, six at 6
    assert torch.allclose(four, rotated, rtol=0.3, atol=0.02)
    assert four[4] > 3 * four[3] and four[4] > 3 * four[6]
    assert six[6] > 3 * six[5] and six[6] > 3 * six[4]
    # a frame without a centre gives no features at all
    unknown = polar_features(x[:1], torch.tensor([[float("nan"), 3.0]]), cfg)
    assert torch.count_nonzero(unknown) == 0


def smooth_ring(radius: float = 40.0, center=(63.5, 63.5), gap_rows=()) -> torch.Tensor:
    """A 6-channel input with one even ring; ``gap_rows`` are masked across the frame."""
    yy, xx = np.mgrid[0:128, 0:128]
    r = np.hypot(xx - center[0], yy - center[1])
    x = np.zeros((6, 128, 128), np.float32)
    x[0] = 0.05 + 0.5 * np.exp(-0.5 * ((r - radius) / 1.5) ** 2)
    x[1] = x[0] * 1.2
    for row in gap_rows:
        x[:3, row] = 0.0
        x[3, row] = 1.0
    x[2] = x[0] / x[0].max()
    return torch.from_numpy(x)


def harmonic(features: torch.Tensor, cfg: PolarConfig, view: int, order: int) -> torch.Tensor:
    """Magnitude of one azimuthal harmonic of one view at every radius, ``(N, R)``."""
    return features[:, view * (cfg.harmonics + 2) + order]


@pytest.mark.parametrize("gap_rows", [(), (60, 61, 62, 63, 64, 65, 66, 67)])
def test_fill_unseen_keeps_the_edges_and_gaps_out_of_the_harmonics(gap_rows):
    """A smooth ring with the beam at the centre of a square frame: without filling, the
    four edges at one radius and a gap through the beam read as structure on the rings
    (4-fold and 2-fold harmonics); with ``fill_unseen`` they add nothing."""
    x = smooth_ring(gap_rows=gap_rows)[None]
    center = torch.tensor([[63.5, 63.5]])
    plain, filled = PolarConfig(), PolarConfig(fill_unseen=True)
    radius_bin = lambda rad: int(rad * plain.radial_bins / (plain.reach * 128))  # noqa: E731
    edge = radius_bin(70.0)        # past the edges' midpoints, inside the corners
    ring = radius_bin(40.0)
    f_plain, f_filled = polar_features(x, center, plain), polar_features(x, center, filled)
    mean_filled = harmonic(f_filled, filled, 1, 0)      # the relative view's mean per radius
    # the edges: a strong four-fold harmonic unfilled, none filled
    assert harmonic(f_plain, plain, 1, 4)[0, edge] > 0.2 * harmonic(f_plain, plain, 1, 0)[0, edge]
    assert harmonic(f_filled, filled, 1, 4)[0, edge] < 1e-3 * max(mean_filled[0, edge], 1e-3)
    # the ring itself: even around the beam once what was not seen is filled
    for order in (2, 4):
        assert harmonic(f_filled, filled, 1, order)[0, ring] < 0.02 * mean_filled[0, ring]
    if gap_rows:   # the gap cuts the ring at two azimuths: even harmonics without filling
        cut = harmonic(f_plain, plain, 1, 2)[0, ring]
        assert cut > 0.05 * harmonic(f_plain, plain, 1, 0)[0, ring]
    # beyond the corners nothing was seen: zeros, not NaN
    assert torch.isfinite(f_filled).all()
    assert float(f_filled[0, :, -1].abs().max()) == 0.0
    assert PolarConfig.from_dict(filled.to_dict()) == filled
    # a head without the option writes the dict it wrote before (checkpoint ids unchanged)
    assert "fill_unseen" not in plain.to_dict()
    assert PolarConfig.from_dict(plain.to_dict()) == plain


def polar_tagger(seed: int = 0, scale: float = 0.5, *, distinct: bool = False,
                 **kwargs) -> tuple[Tagger, Tagger]:
    """An untrained CNN, and the same CNN with a polar head whose output layer is random.

    ``distinct``: the CNN's head is set so that its tags' probabilities are far apart
    (``make_distinct_tagger``), so a tag in another tag's column cannot pass a comparison.
    """
    if distinct:
        from .conftest import make_distinct_tagger

        base = make_distinct_tagger(seed=seed, config=TaggerNetConfig(**SMALL), **kwargs)
    else:
        base = Tagger.untrained(seed=seed, config=TaggerNetConfig(**SMALL), **kwargs)
    cfg = TaggerNetConfig(**SMALL, polar=PolarConfig(width=16).to_dict())
    net = TaggerNet(cfg)
    missing = net.load_state_dict(base.net.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("polar.") for k in missing)
    torch.manual_seed(seed)
    torch.nn.init.normal_(net.polar.out.weight, std=scale)
    return base, Tagger(net, base.tags, **kwargs)


def test_the_head_corrects_only_frames_with_a_centre(tmp_path):
    base, tagger = polar_tagger(precision="fp32")
    assert tagger.uses_beam_center and not base.uses_beam_center
    assert "polar" not in base.net.config.to_dict()  # networks without it keep their ids
    rng = np.random.default_rng(1)
    frames = [rng.poisson(5, (96, 140)).astype(np.uint32) for _ in range(3)]
    for f, (cx, cy) in zip(frames, [(20, 30), (70, 48), (130, 90)], strict=True):
        f[cy - 1:cy + 2, cx - 1:cx + 2] += 5000  # something for the head to see

    plain = base.predict(frames)
    np.testing.assert_allclose(tagger.predict(frames), plain, atol=1e-6)  # no centre: the CNN
    centers = np.array([[20.0, 30.0], [np.nan, np.nan], [130.0, 90.0]])
    got = tagger.predict(frames, beam_center=centers)
    np.testing.assert_allclose(got[1], plain[1], atol=1e-6)  # unknown row: the CNN
    assert np.abs(got[[0, 2]] - plain[[0, 2]]).max() > 1e-3

    # the traced inference form matches eager mode
    x = np.stack([preprocess_frame(f, tagger.preprocess_config) for f in frames])
    c = input_centers([f.shape for f in frames], centers, 128)
    with torch.no_grad():
        logits, _ = tagger.net.eval()(torch.from_numpy(x), None, torch.from_numpy(c).float())
    np.testing.assert_allclose(got, torch.sigmoid(logits).numpy(), atol=1e-5)

    # one centre for all frames; it survives a save and load
    same = tagger.predict(frames, beam_center=(70.0, 48.0))
    back = Tagger.load(tagger.save(tmp_path / "polar.pt"), precision="fp32")
    assert back.uses_beam_center and back.checkpoint_id == tagger.checkpoint_id
    np.testing.assert_allclose(back.predict(frames, beam_center=(70.0, 48.0)), same, atol=1e-6)


@pytest.mark.parametrize("bad", [(1.0, 2.0, 3.0), [[1.0, 2.0]] * 2, "middle"])
def test_a_malformed_beam_center_is_refused(bad):
    _, tagger = polar_tagger()
    frames = np.zeros((3, 64, 64), np.uint16)
    with pytest.raises(ValueError, match="beam_center"):
        tagger.predict(frames, beam_center=bad)


def test_bf16_inference_stays_close_to_fp32():
    _, t32 = polar_tagger(precision="fp32")
    try:
        _, t16 = polar_tagger(precision="bf16")
    except Exception as err:  # noqa: BLE001 - a CPU or torch build without bf16 autocast
        pytest.skip(f"no bf16 here: {err}")
    frames = np.random.default_rng(2).poisson(30, (4, 100, 100)).astype(np.int32)
    a = t32.predict(frames, beam_center=(40, 60))
    b = t16.predict(frames, beam_center=(40, 60))
    assert np.isfinite(b).all() and np.abs(a - b).max() < 0.05


def test_the_callback_gives_each_run_its_beam_centre(RE, caplog):
    """Start metadata sets a run's centre, the callback's setting is the default, a bad one
    is recorded and its run tagged by the CNN alone."""
    from bluesky.plans import count

    from bluesky_xsml import TaggingCallback

    from .conftest import DocumentRecorder, make_image_detector, validate_all

    # fp32: the live batches and predict's agree to ~1e-6, well inside the smallest gap
    # between two tags (the polar head brings some within 1e-3 of each other)
    base, tagger = polar_tagger(seed=3, distinct=True, precision="fp32")
    rng = np.random.default_rng(5)
    pool = [rng.poisson(4, (128, 160)).astype(np.uint32) for _ in range(3)]
    for f in pool:
        f[40:43, 100:103] += 3000
    frames = []

    def frame():  # from a fixed pool: how often ophyd reads outside events varies between runs
        f = pool[len(frames) % len(pool)]
        frames.append(f)
        return f

    caplog.set_level("INFO", logger="bluesky_xsml.documents.callback")
    rec = DocumentRecorder()
    xsml = TaggingCallback(tagger, downstream=[rec], beam_center=(80, 64), max_batch=4)
    RE.subscribe(xsml)
    img = make_image_detector(func=frame)
    for md in ({"xsml_beam_center": {"img": [101, 41]}}, {}, {"xsml_beam_center": "left"}):
        RE(count([img], 3, md=md))
    assert xsml.flush(60)
    validate_all(rec.docs)

    starts = [d["uid"] for d in rec.of("start")]
    run_of = {d["uid"]: d["run_start"] for d in rec.of("descriptor")}
    tagged = {uid: [] for uid in starts}
    for ev in rec.tag_events():
        tagged[run_of[ev["descriptor"]]].append(
            (ev["data"]["source_seq_num"], [ev["data"][t] for t in TAG_NAMES]))
    got = [np.array([p for _, p in sorted(tagged[u])]) for u in starts]
    # the frames each run's events carried (the detector's function also runs outside events)
    primary = {d["uid"]: d["run_start"] for d in rec.of("descriptor") if d["name"] == "primary"}
    shown = {u: [np.asarray(e["data"]["img"]) for e in sorted(
        (e for e in rec.of("event") if primary.get(e["descriptor"]) == u),
        key=lambda e: e["seq_num"])] for u in starts}
    assert [len(shown[u]) for u in starts] == [3, 3, 3]
    assert all(any(f is g or np.array_equal(f, g) for g in frames) for u in starts
               for f in shown[u])
    expected = [tagger.predict(shown[starts[0]], beam_center=(101, 41)),
                tagger.predict(shown[starts[1]], beam_center=(80, 64)),
                base.predict(shown[starts[2]])]
    for g, e in zip(got, expected, strict=True):
        assert g.shape == (3, len(TAG_NAMES))
        # fp32 both ways (~1e-6 apart); column order is pinned by the catalog and bus tests
        np.testing.assert_allclose(g, e, rtol=0, atol=2e-5)
    # the centre changes the tags (by far more than the match tolerance above)
    assert np.abs(got[0] - base.predict(shown[starts[0]])).max() > 0.01
    errors = xsml.status()["document_errors"]
    assert any(k.startswith("bad xsml_beam_center") for k in errors), errors
    assert [s["xsml_frames"] for s in rec.of("stop")] == [3, 3, 3]
    # the run left without a centre is reported once in the log
    assert caplog.text.count("reads the beam centre but run") == 1
    xsml.close()

    with pytest.raises(ValueError, match="beam_center"):
        TaggingCallback(tagger, beam_center=[1, 2, 3])


def test_xsml_polar_head_trains_a_head_beside_a_frozen_cnn(tmp_path, capsys):
    from bluesky_xsml import cli

    base = Tagger.untrained(seed=0, config=TaggerNetConfig(**SMALL))
    cnn = str(base.save(tmp_path / "cnn.pt"))
    data = ["--data", "synth:seed=7,n=24,sizes=64+96", "--val-data",
            "synth:seed=8,n=16,sizes=64+96", "--cache-dir", str(tmp_path / "cache"),
            "--workers", "1", "--no-progress"]
    out = str(tmp_path / "head")
    assert cli.main(["polar-head", "--model", cnn, *data, "--epochs", "2", "--width", "8",
                     "--out", out]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^mAP\s+[0-9.]+\s+[0-9.]+$", printed, re.M)

    new = Tagger.load(f"{out}/model.pt")
    assert new.uses_beam_center and new.metadata["parent_id"] == base.checkpoint_id
    assert new.metadata["polar_head"]["n_train"] == 24
    state = new.net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.net.state_dict().items())  # CNN kept
    assert any(torch.count_nonzero(v) for k, v in state.items() if k.startswith("polar.out"))
    rows = [json.loads(line) for line in open(f"{out}/history.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2]

    with pytest.raises(SystemExit, match="already has a polar head"):
        cli.main(["polar-head", "--model", f"{out}/model.pt", *data, "--out", out])
    # --replace-head trains a new head on the same CNN
    again = str(tmp_path / "again")
    assert cli.main(["polar-head", "--model", f"{out}/model.pt", *data, "--epochs", "1",
                     "--width", "8", "--seed", "3", "--replace-head", "--out", again]) == 0
    capsys.readouterr()
    renewed = Tagger.load(f"{again}/model.pt")
    assert renewed.metadata["parent_id"] == new.checkpoint_id
    fresh = renewed.net.state_dict()
    assert all(torch.equal(fresh[k], v) for k, v in base.net.state_dict().items())
    assert not torch.equal(fresh["polar.out.weight"], state["polar.out.weight"])
    with pytest.raises(SystemExit, match="polar views"):
        cli.main(["polar-head", "--model", cnn, *data, "--views", "peaks,sideways"])

    evaluate = ["evaluate", "--model", f"{out}/model.pt", "--data", "synth:seed=8,n=16,sizes=64+96",
                "--cache-dir", str(tmp_path / "cache"), "--workers", "1", "--no-progress",
                "--precision", "fp32"]
    assert cli.main(evaluate) == 0
    assert "beam centres: given to the polar head" in capsys.readouterr().out
    assert cli.main([*evaluate, "--no-beam-center"]) == 0
    assert "beam centres: not given" in capsys.readouterr().out


def test_a_new_tag_grows_the_polar_head_too():
    from bluesky_xsml.training.finetune import grow_head

    _, tagger = polar_tagger(precision="fp32")
    grown = grow_head(tagger, ["ring_doubling"])
    assert grown.tags[-1] == "ring_doubling" and grown.uses_beam_center
    frames = np.random.default_rng(0).poisson(9, (2, 80, 90)).astype(np.uint32)
    before = tagger.predict(frames, beam_center=(30, 40))
    after = grown.predict(frames, beam_center=(30, 40))
    np.testing.assert_allclose(after[:, :-1], before, atol=1e-6)  # old tags unchanged
    np.testing.assert_allclose(after[:, -1], 0.5, atol=1e-6)       # the new one starts at 0.5


def test_finetuning_a_model_with_a_polar_head_trains_its_cnn_and_keeps_the_head():
    from bluesky_xsml.training.finetune import finetune

    _, tagger = polar_tagger(precision="fp32")
    rng = np.random.default_rng(4)
    x = rng.random((24, 6, 128, 128), dtype=np.float32) * 0.2
    y = np.full((24, len(TAG_NAMES)), np.nan, np.float32)
    x[::2, 0, 40:88, 40:88] += 1.0
    y[:, 0] = (np.arange(24) % 2 == 0)
    new, report = finetune(tagger, x[:16], y[:16], val_inputs=x[16:], val_labels=y[16:],
                           synthetic=None, synthetic_val=None, steps=10, batch_size=8, lr=3e-3)
    assert report.steps == 10 and new.uses_beam_center
    old_state, new_state = tagger.net.state_dict(), new.net.state_dict()
    polar = [k for k in old_state if k.startswith("polar.")]
    cnn = [k for k in old_state if k.startswith("stages.")]
    assert polar and all(torch.equal(old_state[k], new_state[k]) for k in polar)
    assert any(not torch.equal(old_state[k], new_state[k]) for k in cnn)
    frames = rng.poisson(6, (2, 90, 90)).astype(np.uint32)
    assert np.isfinite(new.predict(frames, beam_center=(40, 50))).all()
