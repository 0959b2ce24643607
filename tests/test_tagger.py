"""The Tagger's public API: predict, thresholds, checkpoints."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from bluesky_xsml import Tagger
from bluesky_xsml.errors import CheckpointError, FrameError
from bluesky_xsml.model import TaggerNet, TaggerNetConfig
from bluesky_xsml.preprocess import CHANNELS, PreprocessConfig, preprocess_frame
from bluesky_xsml.tags import TAG_NAMES


def test_predict_accepts_one_frame_a_stack_and_a_ragged_list(tagger):
    rng = np.random.default_rng(0)
    one = rng.poisson(3, (200, 150)).astype(np.uint16)
    stack = rng.poisson(3, (3, 64, 64)).astype(np.int32)
    ragged = [one, rng.random((619, 1475), dtype=np.float32), stack[0]]
    assert tagger.predict(one).shape == (1, len(TAG_NAMES))
    assert tagger.predict(stack).shape == (3, len(TAG_NAMES))
    probs = tagger.predict(ragged)
    assert probs.shape == (3, len(TAG_NAMES)) and probs.dtype == np.float32
    assert np.all((probs >= 0) & (probs <= 1))
    # the same frame gives the same answer whatever it is batched with
    np.testing.assert_allclose(probs[0], tagger.predict(one)[0], atol=1e-2)
    np.testing.assert_allclose(probs[2], tagger.predict(stack)[0], atol=1e-2)


@pytest.mark.reliability
def test_predict_names_the_bad_frame(tagger):
    good = np.ones((64, 64), np.uint32)
    with pytest.raises(FrameError, match=r"frame 1: .*2-D") as info:
        tagger.predict([good, np.ones(4096)])
    assert info.value.reason == "bad_shape"
    with pytest.raises(FrameError, match="dtype"):
        tagger.predict(np.array([["x"] * 64] * 64))


def test_decide_uses_thresholds(tagger):
    probs = np.full((1, len(TAG_NAMES)), 0.4, np.float32)
    probs[0, 3] = 0.9
    assert tagger.decide(probs) == [[TAG_NAMES[3]]]


def test_decide_refuses_rows_of_another_width(tagger):
    """Probabilities of another model (one tag more or fewer) must not be matched to tag
    names column by column: a short row would silently leave the last tags undecided."""
    n = len(TAG_NAMES)
    for width in (n - 1, n + 1):
        probs = np.ones((2, width), np.float32)
        with pytest.raises(ValueError):
            tagger.decide(probs)


def test_checkpoint_round_trip(tmp_path):
    t = Tagger.untrained(seed=3, metadata={"note": "x"})
    t.thresholds[:] = 0.3
    path = t.save(tmp_path / "ckpt" / "model.pt")
    back = Tagger.load(path)
    assert back.checkpoint_id == t.checkpoint_id and back.tags == t.tags
    np.testing.assert_allclose(back.thresholds, 0.3)
    assert back.metadata["note"] == "x"
    frames = np.random.default_rng(1).poisson(5, (2, 100, 100)).astype(np.uint32)
    np.testing.assert_allclose(back.predict(frames), t.predict(frames), atol=1e-6)
    assert not list(tmp_path.glob("ckpt/*.tmp"))  # atomic write leaves no temp file


@pytest.mark.reliability
def test_tampered_and_truncated_checkpoints_are_refused(tmp_path):
    t = Tagger.untrained(seed=1)
    path = t.save(tmp_path / "m.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"]["head.bias"] += 1.0
    torch.save(ckpt, tmp_path / "tampered.pt")
    with pytest.raises(CheckpointError, match="content id mismatch"):
        Tagger.load(tmp_path / "tampered.pt")
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot load"):
        Tagger.load(tmp_path / "trunc.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        Tagger.load(tmp_path / "missing.pt")


@pytest.mark.reliability
def test_checkpoints_that_need_code_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"format": "bluesky-xsml-checkpoint", "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        Tagger.load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_preprocessing_masks_sentinels_and_keeps_aspect_ratio():
    cfg = PreprocessConfig(size=32)
    frame = np.full((64, 128), 100, np.uint32)
    frame[:, 60:64] = 2**32 - 1  # Eiger masked pixels
    x = preprocess_frame(frame, cfg)
    assert x.shape == (len(CHANNELS), 32, 32)
    outside = x[CHANNELS.index("outside")]
    # a 64 x 128 frame fills the middle half of the rows of the square canvas
    assert outside[:8].min() == 1.0 and outside[8:24].max() == 0.0 and outside[24:].min() == 1.0
    invalid = x[CHANNELS.index("invalid")]
    assert invalid[8:24, 15].min() == 1.0 and invalid[8:24, :14].max() == 0.0
    # sentinels do not leak into the intensities: masked blocks read as zero counts
    log_mean = x[CHANNELS.index("log_mean")]
    assert np.allclose(log_mean[8:24, :14], np.log1p(100) / np.log1p(2.0**20), atol=1e-5)
    assert log_mean[8:24, 15].max() == 0.0


def test_saturation_plateau_is_detected():
    cfg = PreprocessConfig(size=32)
    frame = np.random.default_rng(0).poisson(50, (256, 256)).astype(np.int32)
    frame[100:110, 100:110] = 1048575  # clipped at the 20-bit counter maximum
    sat = preprocess_frame(frame, cfg)[CHANNELS.index("saturated")]
    assert sat.max() > 0.5 and (sat > 0).sum() <= 4
    frame[100:110, 100:110] = 60
    assert preprocess_frame(frame, cfg)[CHANNELS.index("saturated")].max() == 0.0


def test_import_stays_light():
    code = ("import sys, bluesky_xsml; bluesky_xsml.TAG_NAMES; "
            "heavy = [m for m in ('torch', 'numba', 'bluesky', 'ophyd', 'fastapi') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_relation_block_starts_as_a_no_op_then_traces_and_round_trips(tmp_path):
    small = TaggerNetConfig(n_tags=len(TAG_NAMES), in_channels=len(CHANNELS), widths=(8, 16),
                            depths=(1, 1))
    base = Tagger.untrained(seed=2, config=small)
    assert "relation_stage" not in small.to_dict()  # old networks keep their header and ids
    frames = np.random.default_rng(4).poisson(20, (3, 90, 120)).astype(np.uint32)

    # added to a trained network, the block changes nothing until it is trained
    cfg = TaggerNetConfig.from_dict({**small.to_dict(), "relation_stage": 1, "relation_heads": 2})
    net = TaggerNet(cfg)
    missing = net.load_state_dict(base.net.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("relation.") for k in missing)
    np.testing.assert_allclose(Tagger(net, base.tags).predict(frames), base.predict(frames),
                               atol=1e-6)

    # with weights, it changes the outputs; the traced inference form matches eager mode
    torch.manual_seed(0)
    torch.nn.init.normal_(net.relation.out.weight, std=0.5)
    tagger = Tagger(net, base.tags, precision="fp32")  # compared with eager fp32 below
    x = np.stack([preprocess_frame(f, tagger.preprocess_config) for f in frames])
    with torch.no_grad():
        eager = torch.sigmoid(net.eval()(torch.from_numpy(x))[0]).numpy()
    got = tagger.predict(frames)
    np.testing.assert_allclose(got, eager, atol=1e-5)
    assert np.abs(got - base.predict(frames)).max() > 1e-3

    back = Tagger.load(tagger.save(tmp_path / "relation.pt"), precision="fp32")
    assert back.net.config.relation_stage == 1 and back.net.config.relation_heads == 2
    np.testing.assert_allclose(back.predict(frames), got, atol=1e-6)

    with pytest.raises(ValueError, match="relation_stage 2 is not a stage index"):
        TaggerNet(TaggerNetConfig.from_dict({**small.to_dict(), "relation_stage": 2}))
    with pytest.raises(ValueError, match="do not split into 3 heads"):
        TaggerNet(TaggerNetConfig.from_dict({**small.to_dict(), "relation_stage": 1,
                                             "relation_heads": 3}))
