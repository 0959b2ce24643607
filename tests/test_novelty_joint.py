"""The auxiliary objectives of experiments/novelty_joint.py on tiny inputs.

The experiment itself takes minutes (docs/novelty.md); these check its pieces: the
NT-Xent loss against a direct computation, views that keep the physics (no vertical flip,
what leaves the frame becomes "outside the detector"), the decoder's error, and that
``novelty_lofo.train`` trains an auxiliary head and ``load_or_train`` saves it.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture(scope="module")
def joint():
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        yield importlib.import_module("novelty_joint")
    finally:
        sys.path.remove(str(EXPERIMENTS))


@pytest.fixture(scope="module")
def lofo(joint):
    return sys.modules["novelty_lofo"]


def _inputs(n=8, side=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 6, side, side)
    x[:, 0] = torch.rand(n, side, side, generator=g) * 0.5
    x[:, 1] = x[:, 0] + 0.05
    x[:, 2] = x[:, 0] / x[:, 0].amax(dim=(1, 2), keepdim=True)
    x[:, 3, :, side // 2] = 1.0  # a detector gap: a column of masked pixels, no counts
    x[:, :3, :, side // 2] = 0.0
    return x


def test_nt_xent_matches_the_direct_sum_and_rewards_matching_views(joint):
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    tau = 0.3
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    direct = 0.0
    for i in range(10):
        pos = (i + 5) % 10
        others = [j for j in range(10) if j != i]
        logits = torch.stack([z[i] @ z[j] / tau for j in others])
        direct += -(z[i] @ z[pos] / tau - torch.logsumexp(logits, 0))
    assert joint.nt_xent(z1, z2, tau).item() == pytest.approx(direct.item() / 10, rel=1e-5)
    # two views of the same rows score far lower than two unrelated batches
    assert joint.nt_xent(z1, z1 + 0.01, tau) < joint.nt_xent(z1, z2, tau) - 1.0
    assert joint.nt_xent(z1, z1, tau).item() < math.log(9)


def test_views_keep_the_physics(joint):
    x = _inputs()
    before = x.clone()
    g = torch.Generator().manual_seed(0)
    shifted = joint.shift_frames(x, g, 3)
    assert shifted.shape == x.shape and torch.equal(x, before)  # the batch is untouched
    # a shift brings in "outside the detector" and no counts; some frame did move
    moved = (shifted[:, 4] == 1).flatten(1).any(1)
    assert moved.any()
    assert torch.all(shifted[:, :3][shifted[:, 4:5].expand(-1, 3, -1, -1) == 1] == 0)
    # the gap column stays one straight vertical column (no vertical flip, no rotation)
    for frame in shifted:
        cols = torch.nonzero(frame[3].sum(0)).flatten()
        assert len(cols) == 1 and frame[3][:, cols[0]].sum() >= 16 - 3
    view = joint.physics_view(x, torch.Generator().manual_seed(2))
    assert torch.isfinite(view).all() and (view[:, 0] >= 0).all()
    assert (view[:, 1] >= view[:, 0] - 1e-6).all()  # block max at least block mean
    noisy = joint.count_noise(x, torch.Generator().manual_seed(3), pixels=16)
    assert not torch.equal(noisy[:, 0], x[:, 0]) and torch.equal(noisy[:, 3:], x[:, 3:])


def test_decoder_error_is_per_frame_and_zero_for_its_own_target(joint):
    dec = joint.make_decoder(12, 32, [0.1, 0.2, 0.3], [1.0, 1.0, 1.0])
    x = _inputs(side=32)
    pooled = torch.randn(8, 12)
    err = dec.error(pooled, x)
    assert err.shape == (8,) and (err > 0).all()
    target = dec.target(x)
    assert target.shape == (8, 3, 16, 16)
    assert ((target - dec(pooled)) ** 2).mean(dim=(1, 2, 3)).allclose(err)
    with pytest.raises(ValueError, match="multiple of 16"):
        joint.make_decoder(12, 40, [0.0] * 3, [1.0] * 3)


@pytest.mark.parametrize("method", ["contrastive", "recon"])
def test_joint_loss_trains_the_head_and_the_network(joint, method):
    from bluesky_xsml.model import TaggerNet, TaggerNetConfig

    torch.manual_seed(0)
    net = TaggerNet(TaggerNetConfig(n_tags=3, in_channels=6, stem_width=4, widths=(8, 8),
                                    depths=(1, 1)))
    aux = (joint.make_projection(16, 8) if method == "contrastive"
           else joint.make_decoder(16, 16, [0.1] * 3, [0.1] * 3))
    x, y = _inputs(), torch.tensor([[1.0, 0.0, float("nan")]] * 8)
    plain = joint.joint_loss_fn(method, aux, lam=0.0, seed=0)(net, x, y)
    loss = joint.joint_loss_fn(method, aux, lam=1.0, seed=0)(net, x, y)
    assert torch.isfinite(loss) and loss.item() > plain.item()  # the term adds to the BCE
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in aux.parameters())
    assert net.stem[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown method"):
        joint.joint_loss_fn("rotation", aux, lam=1.0, seed=0)


def test_lofo_training_updates_and_saves_the_auxiliary_head(joint, lofo, tmp_path):
    x = _inputs(n=16, side=32).numpy()
    labels = np.zeros((16, 23), np.float32)
    labels[::2, 0] = 1
    args = argparse.Namespace(stem_width=4, widths=(8, 8), depths=(1, 1), lr=1e-2, epochs=1,
                              batch_size=8, seed=0, n=16, input_size=32, models=str(tmp_path))
    torch.manual_seed(0)
    aux = joint.make_projection(16, 8)
    start = [p.detach().clone() for p in aux.parameters()]
    loss_fn = joint.joint_loss_fn("contrastive", aux, lam=1.0, seed=0, max_shift=1)
    net = lofo.load_or_train("halo", x, labels, args, variant="-t", loss_fn=loss_fn, aux=aux)
    assert not aux.training and not net.training
    assert any(not torch.equal(a, b) for a, b in zip(start, aux.parameters(), strict=True))
    saved = torch.load(tmp_path / "halo-16-1-32-t.pt", weights_only=True)
    assert set(saved["aux"]) == set(aux.state_dict())
    fresh = joint.make_projection(16, 8)
    lofo.load_or_train("halo", x, labels, args, variant="-t", aux=fresh)  # reloads
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                 aux.state_dict().values(), strict=True))


def test_another_detector_layout_masks_lines_and_edges_without_counts(joint):
    x = _inputs(n=64, side=16)
    out = joint.detector_layout(x.clone(), torch.Generator().manual_seed(0))
    gained_invalid = (out[:, 3] > x[:, 3]) & (out[:, 4] == 0)
    gained_outside = out[:, 4] > x[:, 4]
    assert gained_invalid.any() and gained_outside.any()
    assert (out[:, 0][gained_invalid | gained_outside] == 0).all()  # no counts there
    assert (out[:, 3][gained_outside] == 0).all()  # outside is not also invalid
    assert torch.equal(out[:, 0][~(gained_invalid | gained_outside)],
                       x[:, 0][~(gained_invalid | gained_outside)])
    # the new invalid pixels lie on lines across the whole frame (invalid or outside)
    for i in range(64):
        masked = (out[i, 3] > 0) | (out[i, 4] > 0)
        on_line = masked.all(1)[:, None] | masked.all(0)[None, :]
        assert on_line[gained_invalid[i]].all()


def test_candidates_parse_and_the_choice_respects_the_map_floor(joint):
    assert joint.parse_candidate("contrastive:0.1:layout") == ("contrastive", 0.1, True)
    assert joint.parse_candidate("recon:3") == ("recon", 3.0, False)
    for bad in ("recon:1:layout", "rotation:1", "contrastive", "contrastive:0.1:x"):
        with pytest.raises(ValueError, match="bad candidate"):
            joint.parse_candidate(bad)

    def r(method, variant, m, aurocs, lam=1.0):
        return {"method": method, "variant": variant, "lam": lam, "layout": False,
                "held_in_mAP_of_trained_tags": m, "auroc": aurocs}

    dev = [r("bce", "", 0.60, {"knn": 0.70}),
           r("contrastive", "-a", 0.50, {"knn": 0.90, "mahalanobis": 0.95}),  # mAP too low
           r("contrastive", "-b", 0.58, {"knn": 0.72, "mahalanobis": 0.75}),
           r("recon", "-c", 0.60, {"knn": 0.69, "recon_error+knn": 0.71})]
    chosen = joint.choose(dev, ("knn", "mahalanobis", "recon_error+knn"), 0.03)
    assert chosen["contrastive"]["variant"] == "-b"
    assert chosen["contrastive"]["score"] == "mahalanobis"
    assert chosen["recon"]["score"] == "recon_error+knn"
    assert joint.choose(dev, ("knn",), 0.2)["contrastive"]["variant"] == "-a"
