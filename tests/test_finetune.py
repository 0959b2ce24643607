"""Fine-tuning: the loop and its gate, head growth, and live labeling through the callback.

Tiny untrained networks on a learnable toy task (a bright square in the
log-count channel marks ``ring_isotropic``) keep these fast; the benchmark
(benchmarks/bench_finetune.py) measures the real model on shifted synthetic data.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from bluesky.plans import count

from bluesky_xsml import Tagger, TaggingCallback
from bluesky_xsml.errors import ConfigurationError
from bluesky_xsml.model import TaggerNetConfig
from bluesky_xsml.tags import TAG_NAMES
from bluesky_xsml.training.config import FineTuneConfig, LiveFineTuneConfig
from bluesky_xsml.training.finetune import finetune, finetune_frames, grow_head
from bluesky_xsml.training.live import LiveFineTuner

from .conftest import make_image_detector, validate_all

TINY = TaggerNetConfig(stem_width=8, widths=(8,), depths=(1,))
T0 = TAG_NAMES.index("ring_isotropic")


def tiny(seed=0):
    return Tagger.untrained(seed=seed, config=TINY)


def toy(n, seed, *, flip=False):
    """Inputs with a bright square (tag ``ring_isotropic``) in half of them."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 6, 128, 128), dtype=np.float32) * 0.2
    y = np.full((n, len(TAG_NAMES)), np.nan, np.float32)
    pos = np.arange(n) % 2 == 0
    x[pos, 0, 40:88, 40:88] += 1.0
    y[:, T0] = (~pos if flip else pos).astype(np.float32)
    return x, y


def test_finetune_learns_new_labels_and_passes_the_gate():
    tagger = tiny()
    x, y = toy(32, 0)
    vx, vy = toy(16, 1)
    sx, sy = toy(16, 2)  # "original domain": the same rule, so nothing to forget
    new, report = finetune(tagger, x, y, val_inputs=vx, val_labels=vy, synthetic=(sx, sy),
                           synthetic_val=toy(16, 3), steps=40, batch_size=8, lr=3e-3)
    assert report.passed, report.reason
    assert report.new_domain_tags == ["ring_isotropic"]
    assert report.new_domain_after > report.new_domain_before
    assert report.new_domain_after > 0.9
    assert report.steps == 40 and report.n_synthetic == 16
    assert new.metadata["parent_id"] == tagger.checkpoint_id
    assert new.checkpoint_id != tagger.checkpoint_id == report.parent_id
    assert new.metadata["finetune"]["passed"] is True


def test_gate_keeps_a_checkpoint_that_forgets_the_original_domain():
    tagger = tiny()
    x, y = toy(32, 0)
    # the original domain says the opposite: learning the new data must hurt it
    _new, report = finetune(tagger, x, y, val_inputs=toy(16, 1)[0], val_labels=toy(16, 1)[1],
                           synthetic=None, synthetic_val=toy(16, 3, flip=True), steps=40,
                           batch_size=8, lr=3e-3)
    assert report.new_domain_after > report.new_domain_before
    assert not report.passed
    assert "original-domain mAP fell" in report.reason
    assert report.original_after < report.original_before - 0.01


def test_gate_fails_without_held_out_frames_and_bad_labels_are_refused():
    tagger = tiny()
    x, y = toy(2, 0)
    _, report = finetune(tagger, x, y, steps=2, batch_size=2, synthetic=None, synthetic_val=None)
    assert not report.passed and "no held-out labeled frames" in report.reason
    with pytest.raises(ValueError, match=r"labels must be \(N=2, 23\)"):
        finetune(tagger, x, y[:, :5], synthetic=None)
    with pytest.raises(ValueError, match="labels must be 0, 1 or NaN"):
        finetune(tagger, x, np.full_like(y, 0.5), synthetic=None)
    with pytest.raises(ValueError, match="inputs must be preprocessed"):
        finetune(tagger, x[:, :, :64, :64], y, synthetic=None)


@pytest.mark.parametrize("val, message", [
    (lambda vx, vy: (vx, np.full_like(vy, 0.5)),
     r"val_labels must be 0, 1 or NaN \(unknown\); got \[0.5\]"),
    (lambda vx, vy: (vx, np.where(np.isnan(vy), np.nan, 2.0 * vy)),
     r"val_labels must be 0, 1 or NaN \(unknown\); got \[2.0\]"),
    (lambda vx, vy: (vx, vy[:3]),
     r"val_labels must be \(N=4, 23\) .*one row per frame of val_inputs\); got \(3, 23\)"),
    (lambda vx, vy: (vx, vy[:, :5]), r"val_labels must be \(N=4, 23\) .*got \(4, 5\)"),
    (lambda vx, vy: (vx[:, :, :64, :64], vy),
     r"val_inputs must be preprocessed \(N, 6, 128, 128\); got \(4, 6, 64, 64\)"),
    (lambda vx, vy: (vx, None), "val_inputs was given without val_labels; pass both"),
    (lambda vx, vy: (None, vy), "val_labels was given without val_inputs; pass both"),
], ids=["half", "two", "fewer-rows", "fewer-tags", "not-preprocessed", "no-labels", "no-inputs"])
def test_bad_validation_frames_are_refused_like_training_frames(val, message):
    tagger = tiny()
    x, y = toy(4, 0)
    vx, vy = val(*toy(4, 1))
    steps = []  # nothing trains before the refusal
    with pytest.raises(ValueError, match=message):
        finetune(tagger, x, y, val_inputs=vx, val_labels=vy, synthetic=None, synthetic_val=None,
                 steps=2, batch_size=2, on_step=lambda step, loss: steps.append(step))
    assert steps == []


@pytest.mark.parametrize("replay, message", [
    (lambda rx, ry: (rx, np.full_like(ry, 0.5)),
     r"replay_labels must be 0, 1 or NaN \(unknown\); got \[0.5\]"),
    (lambda rx, ry: (rx, np.where(np.isnan(ry), np.nan, 2.0 * ry)),
     r"replay_labels must be 0, 1 or NaN \(unknown\); got \[2.0\]"),
    (lambda rx, ry: (rx, ry[:3]),
     r"replay_labels must be \(N=4, 23\) .*one row per frame of replay_inputs\); got \(3, 23\)"),
    (lambda rx, ry: (rx, ry[:, :5]), r"replay_labels must be \(N=4, 23\) .*got \(4, 5\)"),
    (lambda rx, ry: (rx[:, :, :64, :64], ry),
     r"replay_inputs must be preprocessed \(N, 6, 128, 128\); got \(4, 6, 64, 64\)"),
    (lambda rx, ry: (rx, None), "replay_inputs was given without replay_labels; pass both"),
    (lambda rx, ry: (None, ry), "replay_labels was given without replay_inputs; pass both"),
], ids=["half", "two", "fewer-rows", "fewer-tags", "not-preprocessed", "no-labels", "no-inputs"])
def test_bad_replay_frames_are_refused_like_training_frames(replay, message):
    tagger = tiny()
    x, y = toy(4, 0)
    vx, vy = toy(4, 1)
    rx, ry = replay(*toy(4, 2))
    steps = []  # nothing trains before the refusal
    with pytest.raises(ValueError, match=message):
        finetune(tagger, x, y, val_inputs=vx, val_labels=vy, replay_inputs=rx, replay_labels=ry,
                 synthetic=None, synthetic_val=None, steps=2, batch_size=2,
                 on_step=lambda step, loss: steps.append(step))
    assert steps == []


def test_grow_head_keeps_old_outputs_and_learns_a_new_tag():
    tagger = tiny()
    x, y = toy(32, 0)
    grown = grow_head(tagger, ["ring_doubling"])
    assert grown.tags == (*tagger.tags, "ring_doubling")
    p_old, p_new = tagger.predict_inputs(x[:4]), grown.predict_inputs(x[:4])
    np.testing.assert_allclose(p_new[:, :-1], p_old, atol=1e-3)
    np.testing.assert_allclose(p_new[:, -1], 0.5, atol=1e-3)

    # teach ring_doubling = the bright square, with its old label unknown
    y_new = np.concatenate([np.full_like(y, np.nan), y[:, T0:T0 + 1]], axis=1)
    vx, vy = toy(16, 1)
    vy_new = np.concatenate([np.full_like(vy, np.nan), vy[:, T0:T0 + 1]], axis=1)
    new, report = finetune(tagger, x, y_new, tags=grown.tags, val_inputs=vx, val_labels=vy_new,
                           synthetic=None, synthetic_val=None, steps=40, batch_size=8, lr=3e-3)
    assert report.new_tags == ["ring_doubling"]
    assert report.new_tag_ap["ring_doubling"] > 0.9
    assert report.passed, report.reason
    assert new.tags[-1] == "ring_doubling"
    assert "ring_doubling" in new.decide(new.predict_inputs(vx[:1]))[0]


def _frames_and_labels(tagger):
    rng = np.random.default_rng(0)
    frames = [rng.poisson(5, (64, 80)).astype("uint32") for _ in range(8)]
    labels = np.full((8, len(tagger.tags)), np.nan, np.float32)
    labels[:, T0] = np.arange(8) % 2
    return frames, labels


def test_finetune_frames_returns_new_tagger_with_report():
    tagger = tiny()
    before = {k: v.clone() for k, v in tagger.net.state_dict().items()}
    frames, labels = _frames_and_labels(tagger)
    new = finetune_frames(tagger, frames, labels, steps=3, batch_size=4, synthetic=None,
                          synthetic_val=None)
    assert new.report.steps == 3 and new.report.n_val == 2
    assert new.metadata["parent_id"] == tagger.checkpoint_id
    for k, v in tagger.net.state_dict().items():  # the original is untouched
        assert np.array_equal(v.numpy(), before[k].numpy())


def test_tagger_finetune_is_deprecated_and_delegates_to_training():
    tagger = tiny()
    frames, labels = _frames_and_labels(tagger)
    options = {"steps": 3, "batch_size": 4, "synthetic": None, "synthetic_val": None}
    with pytest.warns(DeprecationWarning, match="finetune_frames"):
        old = tagger.finetune(frames, labels, **options)
    new = finetune_frames(tagger, frames, labels, **options)
    assert old.report.steps == new.report.steps == 3
    assert old.report.n_val == new.report.n_val == 2
    for k, v in old.net.state_dict().items():  # the same round, the same seed
        np.testing.assert_allclose(v.numpy(), new.net.state_dict()[k].numpy(), atol=1e-6)


def test_keywords_and_config_are_the_same_round():
    tagger = tiny()
    x, y = toy(16, 0)
    cfg = FineTuneConfig(steps=4, batch_size=4, lr=1e-3, synthetic=None, synthetic_val=None)
    a, ra = finetune(tagger, x, y, config=cfg)
    b, rb = finetune(tagger, x, y, steps=4, batch_size=4, lr=1e-3, synthetic=None,
                     synthetic_val=None)
    c, rc = finetune(tagger, x, y, config=FineTuneConfig(steps=99, synthetic=None,
                                                         synthetic_val=None),
                     steps=4, batch_size=4, lr=1e-3)  # keywords override the config
    assert ra.steps == rb.steps == rc.steps == 4
    for k, v in a.net.state_dict().items():
        np.testing.assert_allclose(v.numpy(), b.net.state_dict()[k].numpy(), atol=1e-6)
        np.testing.assert_allclose(v.numpy(), c.net.state_dict()[k].numpy(), atol=1e-6)


@pytest.mark.parametrize(("options", "message"), [
    ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ({"lr": -1e-3}, "lr must be > 0.0"),
    ({"new_fraction": 1.5}, "new_fraction must be <= 1.0"),
    ({"val_fraction": 1.0}, "val_fraction must be < 1.0"),
    ({"steps": 2.5}, "steps must be an integer >= 0"),
    ({"distill": float("nan")}, "distill must be a finite number"),
    ({"augment": "yes"}, "augment must be True or False"),
    ({"synthetic": 7}, "synthetic must be a 'synth:...' spec"),
])
def test_a_bad_setting_is_refused_before_any_work(options, message):
    tagger = tiny()
    x, y = toy(8, 0)
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        finetune(tagger, x, y, **options)
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        FineTuneConfig(**options)


def test_an_unknown_keyword_is_a_type_error_naming_the_options():
    tagger = tiny()
    x, y = toy(8, 0)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['stpes'\].*'steps'"):
        finetune(tagger, x, y, stpes=3)


def test_live_finetuner_maps_its_keywords_onto_the_config(tmp_path):
    cfg = LiveFineTuneConfig.resolve(None, {"min_labels": 4, "steps": 10, "batch_size": 8,
                                            "auto": False})
    assert (cfg.min_labels, cfg.auto) == (4, False)
    assert (cfg.finetune.steps, cfg.finetune.batch_size, cfg.finetune.distill) == (10, 8, 1.0)
    with pytest.raises(ConfigurationError, match="min_labels must be >= 1, got 0"):
        LiveFineTuner(tiny(), tmp_path / "a", min_labels=0)
    with pytest.raises(TypeError, match="bogus"):
        LiveFineTuner(tiny(), tmp_path / "b", bogus=1)
    ft = LiveFineTuner(tiny(), tmp_path / "c", auto=False, steps=10, synthetic=None,
                       synthetic_val=None)
    try:
        assert ft.config.finetune.steps == 10 and ft.config.finetune.synthetic is None
        assert ft.options["steps"] == 10 and ft.min_labels == 16
    finally:
        ft.close(10.0)


def test_distillation_holds_original_domain_frames_not_older_new_labels():
    """Older labels of the new data (replay) are learned; only synthetic frames are distilled."""
    tagger = tiny()
    x, y = toy(32, 0)
    vx, vy = toy(16, 1)
    pos = vy[:, T0] == 1

    def separation(**kw):
        # no new labels this round: everything is learned from the replayed pool
        new, _ = finetune(tagger, x[:4], np.full_like(y[:4], np.nan), val_inputs=vx,
                          val_labels=vy, synthetic_val=None, steps=80, batch_size=8, lr=3e-3,
                          new_fraction=0.25, distill=20.0, **kw)
        p = new.predict_inputs(vx)[:, T0]
        return float(p[pos].mean() - p[~pos].mean())

    parent = tagger.predict_inputs(vx)[:, T0]
    assert abs(float(parent[pos].mean() - parent[~pos].mean())) < 0.1
    learned = separation(replay_inputs=x, replay_labels=y, synthetic=None)
    held = separation(synthetic=(x, y))
    assert learned > 0.5
    assert held < learned - 0.3


# --------------------------------------------------------------- live labeling
@pytest.fixture
def live(RE, recorder, tmp_path):
    tagger = tiny()
    xsml = TaggingCallback(tagger, downstream=[recorder], threads=1)
    RE.subscribe(xsml)
    yield xsml
    xsml.close()


def test_label_suggest_and_document_labels_through_a_run(RE, live, recorder, tmp_path):
    with pytest.raises(ConfigurationError, match="fine-tuning is not enabled"):
        live.label("x", 1, ring_isotropic=True)
    ft = live.enable_finetuning(tmp_path / "ft", min_labels=1000, steps=5, batch_size=4,
                                synthetic=None, synthetic_val=None, nice=0)
    assert live.finetuner is ft and live.enable_finetuning(tmp_path / "other") is ft
    img = make_image_detector(shape=(64, 80))
    RE(count([img], 8))
    assert live.flush(60)
    uid = recorder.of("start")[0]["uid"]

    suggestions = live.suggest_labels(3)
    assert len(suggestions) == 3
    assert {"run_uid", "stream", "seq_num", "key", "frame_index", "score"} <= set(suggestions[0])
    assert suggestions[0]["score"] >= suggestions[-1]["score"]

    receipt = live.label(uid, 2, ring_oriented=True, beamstop_linear=False, ring_doubling=True)
    assert receipt["stored"] and receipt["rows"] == [0] and receipt["key"] == "img"
    assert receipt["labels"] == {"ring_oriented": True, "beamstop_linear": False,
                                 "ring_doubling": True}
    assert receipt["new_tags"] == ["ring_doubling"]
    assert (uid, 2) not in {(s["run_uid"], s["seq_num"]) for s in live.suggest_labels(8)}
    with pytest.raises(KeyError, match="not in the label cache"):
        live.label(uid, 99, ring_oriented=True)
    with pytest.raises(ValueError, match="use True/1"):
        live.label(uid, 3, ring_oriented="maybe")

    # a calibrant run: every frame gets the start document's labels
    RE(count([img], 5), xsml_labels={"ring_isotropic": 1, "many_rings": 1})
    assert live.flush(60) and ft.flush_labels(30)
    prov = ft.replay.provenance()
    assert [p["source"] for p in prov] == ["label"] + ["document"] * 5
    labels = ft.replay.labels()
    col = ft.replay.tags.index("ring_isotropic")
    assert (labels[1:, col] == 1).all() and np.isnan(labels[0, col])
    assert ft.status()["labels"] == 6


def test_retrain_hot_swap_and_rollback_keep_tag_events_truthful(RE, live, recorder, tmp_path):
    ft = live.enable_finetuning(tmp_path / "ft", min_labels=1000, steps=4, batch_size=4,
                                synthetic=None, synthetic_val=None, nice=0)
    base_id = live.tagger.checkpoint_id
    img = make_image_detector(shape=(64, 80))
    RE(count([img], 8), xsml_labels={"ring_isotropic": 1, "weak_scattering": 0})
    assert live.flush(60) and ft.flush_labels(30)
    uid = recorder.of("start")[0]["uid"]
    for seq in range(1, 9):
        live.label(uid, seq, ring_doubling=seq % 2 == 0)

    report = ft.retrain_now(wait=True, timeout=120)
    assert report["steps"] == 4 and report["new_tags"] == ["ring_doubling"]
    listed = ft.registry.list()
    assert len(listed) == 2 and listed[1]["parent_id"] == base_id
    new_id = listed[1]["checkpoint_id"]
    # promote by hand whatever the gate said (the API's activate): the live tagger grows a tag
    ft.registry.activate(new_id)
    assert live.tagger.checkpoint_id == new_id and live.tagger.tags[-1] == "ring_doubling"
    status = ft.status()
    assert status["active_id"] == new_id and status["labels"] == 16

    recorder.docs.clear()
    RE(count([img], 4))
    assert live.flush(60)
    validate_all(recorder.docs)
    events = recorder.tag_events()
    assert {e["data"]["checkpoint"] for e in events} == {new_id}
    desc = next(d for d in recorder.of("descriptor") if d["name"] == "xsml_tags")
    assert "ring_doubling" in desc["data_keys"]

    assert ft.registry.rollback()["checkpoint_id"] == base_id
    assert live.tagger.checkpoint_id == base_id and "ring_doubling" not in live.tagger.tags
    recorder.docs.clear()
    RE(count([img], 3))
    assert live.flush(60)
    validate_all(recorder.docs)
    assert {e["data"]["checkpoint"] for e in recorder.tag_events()} == {base_id}
    assert recorder.of("stop")[0]["xsml_model"] == base_id


def test_a_round_that_fails_the_gate_changes_nothing_live(RE, live, recorder, tmp_path):
    """The gate refuses the round (it asks for an impossible improvement): the new
    checkpoint is kept but not activated, and the live tagger keeps its weights, tags
    and probabilities, frame for frame."""
    import torch

    ft = live.enable_finetuning(tmp_path / "ft", min_labels=1000, steps=3, batch_size=4,
                                synthetic=None, synthetic_val=None, nice=0,
                                min_improvement=10.0)
    tagger = live.tagger
    base_id, base_tags = tagger.checkpoint_id, tagger.tags
    base_state = {k: v.clone() for k, v in tagger.net.state_dict().items()}
    img = make_image_detector(shape=(64, 80), seed=7)
    frames = list(np.random.default_rng(7).poisson(4, (3, 64, 80)).astype(np.uint32))
    before = tagger.predict(frames)
    RE(count([img], 8), xsml_labels={"ring_isotropic": 1, "weak_scattering": 0})
    assert live.flush(60) and ft.flush_labels(30)
    uid = recorder.of("start")[0]["uid"]
    # a new tag (the head would grow), with both classes among the trained and the held-out
    # frames (seq 4 and 8), so the gate scores it by mAP against min_improvement
    for seq in range(1, 9):
        live.label(uid, seq, ring_doubling=seq <= 4)

    report = ft.retrain_now(wait=True, timeout=120)
    assert report["steps"] == 3 and report["passed"] is False
    assert "did not improve" in report["reason"]
    listed = ft.registry.list()
    assert len(listed) == 2 and listed[1]["parent_id"] == base_id
    assert listed[1]["checkpoint_id"] != base_id
    assert ft.registry.active_id == base_id and ft.status()["active_id"] == base_id
    assert ft.status()["promoted"] == 0 and ft.status()["kept"] == 1
    # a second refused round (on the same labels) is counted and changes nothing either
    assert ft.retrain_now(wait=True, timeout=120)["passed"] is False
    assert ft.status()["kept"] == 2 and ft.registry.active_id == base_id
    assert tagger.checkpoint_id == base_id and tagger.tags == base_tags
    state = tagger.net.state_dict()
    assert state.keys() == base_state.keys()
    assert all(torch.equal(state[k], v) for k, v in base_state.items())
    np.testing.assert_array_equal(tagger.predict(frames), before)

    recorder.docs.clear()
    RE(count([img], 3))
    assert live.flush(60)
    validate_all(recorder.docs)
    events = recorder.tag_events()
    assert {e["data"]["checkpoint"] for e in events} == {base_id}
    desc = next(d for d in recorder.of("descriptor") if d["name"] == "xsml_tags")
    assert "ring_doubling" not in desc["data_keys"]
    assert recorder.of("stop")[0]["xsml_model"] == base_id


def test_a_round_that_passes_the_gate_goes_live(RE, live, recorder, tmp_path):
    """A gate that any round passes (``min_improvement=-1``): each round is promoted and the
    live tagger swaps to it, without a manual activate."""
    ft = live.enable_finetuning(tmp_path / "ft", min_labels=1000, steps=3, batch_size=4,
                                synthetic=None, synthetic_val=None, nice=0,
                                min_improvement=-1.0)
    base_id = live.tagger.checkpoint_id
    RE(count([make_image_detector(shape=(64, 80), seed=3)], 8),
       xsml_labels={"ring_isotropic": 1, "weak_scattering": 0})
    assert live.flush(60) and ft.flush_labels(30)
    uid = recorder.of("start")[0]["uid"]
    for seq in range(1, 9):
        live.label(uid, seq, ring_doubling=seq <= 4)
    ids = [base_id]
    for n in (1, 2):
        report = ft.retrain_now(wait=True, timeout=120)
        assert report["passed"] is True, report["reason"]
        listed = ft.registry.list()
        assert len(listed) == n + 1 and listed[-1]["parent_id"] == ids[-1]
        ids.append(listed[-1]["checkpoint_id"])
        assert ft.registry.active_id == ids[-1] == live.tagger.checkpoint_id
        assert live.tagger.tags[-1] == "ring_doubling"
        assert ft.status()["promoted"] == n and ft.status()["kept"] == 0
