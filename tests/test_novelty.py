"""Novelty scores, embeddings and frame similarity, end to end.

Real parts: a real RunEngine with ophyd.sim detectors feeding a real
TaggingCallback (documents schema-validated), a real embedded Tiled catalog
written by the TiledWriter, the FastAPI app through httpx. The tagger is a
tiny untrained network (fast); its novelty statistics are fitted on
Poisson frames, so "in distribution" here means "Poisson noise like these".
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from bluesky.plans import count

from bluesky_xsml import Tagger, TaggingCallback
from bluesky_xsml.errors import CheckpointError
from bluesky_xsml.model import TaggerNetConfig
from bluesky_xsml.novelty import (
    NoveltyModel,
    auroc,
    decode_embedding,
    encode_embedding,
    energy_novelty,
    sidecar_path,
)
from bluesky_xsml.steering.policy import FrameRef, Policy, decide, default_rules, novelty_rule
from bluesky_xsml.tags import TAG_NAMES
from bluesky_xsml.training.finetune import finetune_frames

from .conftest import DocumentRecorder, make_image_detector, validate_all

TINY = TaggerNetConfig(widths=(8, 16), depths=(1, 1), stem_width=8)


def poisson_frames(n, seed=0, shape=(64, 80), lam=4):
    rng = np.random.default_rng(seed)
    return [rng.poisson(lam, shape).astype(np.uint32) for _ in range(n)]


@pytest.fixture(scope="module")
def fitted():
    """A tiny tagger with novelty statistics fitted on Poisson(4) frames."""
    from bluesky_xsml.training.novelty_fit import fit_novelty

    t = Tagger.untrained(seed=0, config=TINY, precision="fp32")
    fit_novelty(t, poisson_frames(120, 1), poisson_frames(100, 2), embedding_dim=8, fpr=0.05)
    return t


def grouped_features(rng, n, a, dim=16):
    """Non-negative features like a network's: pattern A with weight ``a``, B with ``1 - a``."""
    x = np.abs(rng.normal(0.2, 0.1, size=(n, dim)))
    x[:, :dim // 2] += a
    x[:, dim // 2:] += 1 - a
    return x


def two_groups(rng, n):
    return np.vstack([grouped_features(rng, n // 2, 1.0), grouped_features(rng, n - n // 2, 0.0)])


# ------------------------------------------------------------------ the statistics
@pytest.mark.parametrize("score", ["knn", "mahalanobis"])
def test_threshold_sits_at_the_asked_false_positive_rate_on_held_out_frames(score):
    rng = np.random.default_rng(0)
    train, val, test = (two_groups(rng, n) for n in (2000, 2000, 4000))
    model = NoveltyModel.fit(train, val, embedding_dim=6, fpr=0.05, score=score)
    flagged = model.is_novel(model.score(test)).mean()
    assert 0.03 < flagged < 0.07, flagged
    assert model.info["threshold_on"] == "validation" and model.kind == score
    far = np.abs(rng.normal(0.2, 0.1, size=(50, 16)))
    far[:, [0, 1, 8, 9]] += 3.0  # another pattern, and brighter than any fit frame
    assert auroc(model.score(test), model.score(far)) > 0.99


def test_a_kind_of_frame_absent_from_fitting_scores_above_the_fitted_kinds():
    """The fit frames form two groups; a new kind lies between them, near their common mean.

    The version 1 score (one Gaussian of all fit frames) misses it; the kNN score flags it.
    """
    rng = np.random.default_rng(5)
    train, val, test = two_groups(rng, 600), two_groups(rng, 300), two_groups(rng, 400)
    new = grouped_features(rng, 60, 0.5)
    knn = NoveltyModel.fit(train, val, embedding_dim=8, fpr=0.01)
    assert knn.kind == "knn" and knn.info["score"] == "knn"
    assert auroc(knn.score(test), knn.score(new)) > 0.99
    assert knn.is_novel(knn.score(new)).mean() > 0.95
    assert knn.is_novel(knn.score(test)).mean() < 0.05
    maha = NoveltyModel.fit(train, val, embedding_dim=8, fpr=0.01, score="mahalanobis")
    assert auroc(maha.score(test), maha.score(new)) < 0.7
    assert maha.is_novel(maha.score(new)).mean() < 0.1


def test_weaker_features_than_usual_add_to_the_score_stronger_ones_take_nothing_off():
    rng = np.random.default_rng(6)
    model = NoveltyModel.fit(two_groups(rng, 400), two_groups(rng, 200), embedding_dim=4)
    x = two_groups(rng, 50)
    base = model.score(x)
    d_med, d_sd = model.calibration[:2]
    knn_part = (model.knn_distance(x) - d_med) / d_sd
    # the kNN part is scale free; far brighter frames keep it and nothing else
    np.testing.assert_allclose(model.knn_distance(3.0 * x), model.knn_distance(x), atol=1e-5)
    np.testing.assert_allclose(model.score(3.0 * x), knn_part, atol=1e-3)
    assert (base >= knn_part - 1e-3).all()
    assert (model.score(0.3 * x) > base + 1.0).all()


def test_knn_threshold_without_held_out_frames_skips_each_frames_own_row():
    rng = np.random.default_rng(7)
    model = NoveltyModel.fit(two_groups(rng, 1000), embedding_dim=4, fpr=0.05)
    assert model.info["threshold_on"] == "train" and model.k == 1
    flagged = model.is_novel(model.score(two_groups(rng, 2000))).mean()
    # a bank row matched with itself would give distance 0 and a far too low threshold
    assert flagged < 0.12, flagged


def test_the_reference_bank_is_a_capped_float16_subsample():
    rng = np.random.default_rng(8)
    model = NoveltyModel.fit(two_groups(rng, 300), two_groups(rng, 100), embedding_dim=4,
                             bank_size=64, k=3)
    assert model.bank.shape == (64, 16) and model.bank.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(model.bank.astype(np.float32), axis=1), 1.0,
                               atol=2e-3)
    assert model.k == 3 and model.info["bank_size"] == 64
    with pytest.raises(ValueError, match="unknown novelty score"):
        NoveltyModel.fit(two_groups(rng, 30), score="energy")


def test_statistics_round_trip_and_version_1_files_still_load(tmp_path):
    rng = np.random.default_rng(9)
    train, val, x = two_groups(rng, 300), two_groups(rng, 100), two_groups(rng, 20)
    model = NoveltyModel.fit(train, val, embedding_dim=4)
    back, cid = NoveltyModel.load(model.save(tmp_path / "m.novelty.npz", checkpoint_id="abc"))
    assert cid == "abc" and back.kind == "knn" and back.digest() == model.digest()
    np.testing.assert_array_equal(back.score(x), model.score(x))
    # a version 1 sidecar (Mahalanobis only) reads as a Mahalanobis model
    old = NoveltyModel.fit(train, val, embedding_dim=4, score="mahalanobis").to_arrays()
    v1 = {k: v for k, v in old.items() if k not in ("kind", "k", "bank", "calibration")}
    v1["version"] = np.asarray(1)
    m1 = NoveltyModel.from_arrays(v1)
    assert m1.kind == "mahalanobis" and m1.bank is None
    np.testing.assert_allclose(m1.score(x), m1.mahalanobis(x))
    with pytest.raises(ValueError, match="version 3"):
        NoveltyModel.from_arrays({**old, "version": np.asarray(3)})
    broken = dict(model.to_arrays())
    broken["bank"] = broken["bank"][:, :5]
    with pytest.raises(ValueError, match="reference bank"):
        NoveltyModel.from_arrays(broken)


def test_novel_is_exactly_score_above_threshold_and_nan_is_never_novel():
    rng = np.random.default_rng(1)
    model = NoveltyModel.fit(np.abs(rng.normal(size=(300, 5))), embedding_dim=3)
    s = np.array([model.threshold - 1e-3, model.threshold, model.threshold + 1e-3, np.nan],
                 np.float32)
    assert model.is_novel(s).tolist() == [False, False, True, False]
    other = model.with_threshold(0.5)
    assert other.threshold == 0.5 and other.is_novel(np.array([0.6], np.float32))[0]
    with pytest.raises(ValueError, match="finite"):
        model.with_threshold(float("nan"))


def test_fit_refuses_bad_input_with_clear_messages():
    with pytest.raises(ValueError, match=r"\(N >= 2, F\)"):
        NoveltyModel.fit(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="NaN"):
        NoveltyModel.fit(np.full((5, 4), np.nan))
    with pytest.raises(ValueError, match="fpr"):
        NoveltyModel.fit(np.random.default_rng(0).normal(size=(9, 4)), fpr=0)


def test_embeddings_are_unit_float16_and_round_trip_as_text():
    rng = np.random.default_rng(2)
    model = NoveltyModel.fit(rng.normal(size=(200, 10)), embedding_dim=4)
    e = model.embed(rng.normal(size=(7, 10)))
    assert e.dtype == np.float16 and e.shape == (7, 4)
    np.testing.assert_allclose(np.linalg.norm(e.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert np.array_equal(decode_embedding(encode_embedding(e[0]), 4), e[0])
    assert decode_embedding("", 4) is None and decode_embedding("!!", 4) is None
    assert decode_embedding(encode_embedding(e[0]), 5) is None  # wrong length
    assert encode_embedding(None) == ""


def test_embedding_with_probabilities_puts_same_tag_frames_together():
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(300, 10))
    model = NoveltyModel.fit(feats, embedding_dim=12)
    probs = np.where(rng.random((300, 4)) < 0.5, 0.95, 0.05)
    e = model.embed(feats, probs).astype(np.float32)
    assert e.shape == (300, model.output_dim(4)) == (300, 12)
    same = (probs[:, None, :] == probs[None, :, :]).all(-1)
    sims = e @ e.T
    off = ~np.eye(300, dtype=bool)
    # frames with the same tags are, on average, much closer than frames without
    assert sims[same & off].mean() > sims[~same].mean() + 0.3
    with pytest.raises(ValueError, match="probability rows"):
        model.embed(feats[:3], probs[:2])


def test_energy_score_is_higher_for_frames_without_confident_tags():
    confident = np.array([[0.999, 0.001, 0.001]])
    vague = np.array([[0.5, 0.5, 0.5]])
    # joint energy is high for confident positives; novelty is its negative
    assert energy_novelty(confident)[0] < energy_novelty(vague)[0]


# ------------------------------------------------------------------ the tagger
def test_analyse_gives_probs_scores_flags_and_embeddings(fitted):
    frames = poisson_frames(6, 3)
    a = fitted.analyse(frames, keep_features=True)
    np.testing.assert_allclose(a.probs, fitted.predict(frames), atol=1e-6)
    assert a.novelty.shape == (6,) and np.isfinite(a.novelty).all()
    dim = fitted.novelty.output_dim(len(fitted.tags))
    assert dim == 8 + len(TAG_NAMES)  # 8 principal directions, then the probabilities
    assert a.embedding.shape == (6, dim) and a.embedding.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(a.embedding.astype(np.float32), axis=1), 1.0,
                               atol=3e-3)
    assert a.features.shape == (6, fitted.feature_dim)
    assert a.novel.tolist() == (a.novelty > fitted.novelty.threshold).tolist()
    # a frame nothing like the fit frames (a saturated half, a dead half) scores higher
    odd = np.zeros((64, 80), np.uint32)
    odd[:, :40] = 60000
    assert fitted.analyse([odd]).novelty[0] > np.median(a.novelty)


def test_threshold_change_is_respected(fitted):
    frames = poisson_frames(4, 4)
    scores = fitted.analyse(frames).novelty
    saved = fitted.novelty
    try:
        fitted.set_novelty(saved.with_threshold(float(np.median(scores))))
        flags = fitted.analyse(frames).novel
        assert flags.tolist() == (scores > np.median(scores)).tolist()
        assert 0 < flags.sum() < len(frames)
    finally:
        fitted.set_novelty(saved)


def test_checkpoint_keeps_statistics_outside_the_content_id(fitted, tmp_path):
    bare = Tagger.untrained(seed=0, config=TINY)
    assert bare.checkpoint_id == fitted.checkpoint_id  # same weights, statistics or not
    path = fitted.save(tmp_path / "with.pt")
    back = Tagger.load(path, precision="fp32")
    assert back.checkpoint_id == fitted.checkpoint_id
    assert back.novelty.digest() == fitted.novelty.digest()
    x = poisson_frames(3, 5)
    np.testing.assert_allclose(back.analyse(x).novelty, fitted.analyse(x).novelty, rtol=1e-5)
    assert back.describe()["novelty"]["available"] is True


def test_a_checkpoint_without_statistics_loads_and_says_novelty_is_unavailable(tmp_path):
    path = Tagger.untrained(seed=0, config=TINY).save(tmp_path / "old.pt")
    ckpt = torch.load(path, weights_only=True)
    assert "novelty" not in ckpt  # the layout older versions wrote
    t = Tagger.load(path)
    assert t.novelty is None and t.describe()["novelty"] == {
        "available": False, "threshold": None, "embedding_dim": 0}
    a = t.analyse(poisson_frames(2))
    assert np.isnan(a.novelty).all() and not a.novel.any() and a.embedding is None


def test_sidecar_statistics_load_only_for_their_checkpoint(fitted, tmp_path):
    path = Tagger.untrained(seed=0, config=TINY).save(tmp_path / "m.pt")
    fitted.novelty.save(sidecar_path(path), checkpoint_id=fitted.checkpoint_id)
    assert Tagger.load(path).novelty.digest() == fitted.novelty.digest()
    fitted.novelty.save(sidecar_path(path), checkpoint_id="0123456789ab")
    assert Tagger.load(path).novelty is None  # stale statistics are not used


def test_malformed_or_mismatched_statistics_are_refused(fitted, tmp_path):
    ckpt = fitted.checkpoint_dict()
    ckpt["novelty"] = {"version": torch.tensor(1)}
    with pytest.raises(CheckpointError, match="malformed novelty statistics"):
        Tagger.from_checkpoint_dict(ckpt)
    other = NoveltyModel.fit(np.random.default_rng(0).normal(size=(50, 7)), embedding_dim=2)
    ckpt["novelty"] = {k: (str(v) if v.dtype.kind == "U" else torch.from_numpy(np.array(v)))
                       for k, v in other.to_arrays().items()}
    with pytest.raises(CheckpointError, match="7 features"):
        Tagger.from_checkpoint_dict(ckpt)


def test_the_packaged_default_has_statistics_for_its_own_weights():
    from bluesky_xsml.inference.tagger import default_checkpoint_path

    side = sidecar_path(default_checkpoint_path())
    if not side.exists():
        pytest.skip("no novelty sidecar shipped")
    _, fitted_for = NoveltyModel.load(side)
    t = Tagger.load(precision="fp32")
    assert t.novelty is not None and fitted_for == t.checkpoint_id


# ------------------------------------------------------------------ live tagging
def test_tag_stream_carries_novelty_and_the_stop_counts_novel_frames(fitted):
    from bluesky import RunEngine

    saved = fitted.novelty
    rec = DocumentRecorder()
    xsml = TaggingCallback(fitted, downstream=[rec], threads=1, max_wait=0.01)
    RE = RunEngine({}, call_returns_result=False)
    RE.subscribe(xsml)
    det = make_image_detector(shape=(64, 80))
    try:
        fitted.set_novelty(saved.with_threshold(-1.0))  # every frame novel
        RE(count([det], 3))
        assert xsml.flush(60)
        fitted.set_novelty(saved.with_threshold(1e9))  # none
        RE(count([det], 2))
        assert xsml.flush(60)
    finally:
        fitted.set_novelty(saved)
        xsml.close()
    validate_all(rec.docs)
    desc = next(d for d in rec.of("descriptor") if d["name"] == "xsml_tags")
    assert {"novelty", "novel", "embedding"} <= set(desc["data_keys"])
    dim = fitted.novelty.output_dim(len(fitted.tags))
    assert desc["configuration"]["xsml"]["data"]["embedding_dim"] == dim
    events = rec.tag_events()
    assert len(events) == 5
    for ev in events:
        assert math.isfinite(ev["data"]["novelty"])
        assert decode_embedding(ev["data"]["embedding"], dim) is not None
    assert [ev["data"]["novel"] for ev in events] == [True] * 3 + [False] * 2
    stops = rec.of("stop")
    assert [s["xsml_novel"] for s in stops] == [3, 0]


def test_worker_without_analyse_still_tags(tagger, RE, recorder):
    """A tagger-like object with only ``predict_inputs`` (older wrappers) gets NaN scores."""

    class Plain:
        def __init__(self, t):
            self._t = t

        def __getattr__(self, name):
            if name in ("analyse_inputs", "analyse"):
                raise AttributeError(name)
            return getattr(self._t, name)

    xsml = TaggingCallback(Plain(tagger), downstream=[recorder], threads=1, max_wait=0.01)
    RE.subscribe(xsml)
    RE(count([make_image_detector(shape=(32, 32))], 2))
    assert xsml.flush(60)
    xsml.close()
    validate_all(recorder.docs)
    evs = recorder.tag_events()
    assert len(evs) == 2 and all(math.isnan(e["data"]["novelty"]) for e in evs)
    assert all(e["data"]["novel"] is False and e["data"]["embedding"] == "" for e in evs)
    assert recorder.of("stop")[0]["xsml_novel"] == 0


# ------------------------------------------------------------------ steering
def test_policy_pauses_on_three_novel_frames_in_a_row():
    policy = Policy(rules=[novelty_rule(3), *default_rules()])
    frames = [FrameRef(seq_num=i, tags=["ring_isotropic"], novel=True) for i in (1, 2, 3)]
    d = decide(policy, frames)
    assert (d.action, d.rule, d.params["ask_label"]) == ("pause", "novel_frames", True)
    assert [f.seq_num for f in d.evidence] == [1, 2, 3]
    assert decide(policy, frames[:2]).action == "continue"
    broken = [*frames[:1], FrameRef(seq_num=2, tags=["ring_isotropic"]), *frames[2:]]
    assert decide(policy, broken).rule != "novel_frames"
    # a skipped newest frame repeats no decision
    assert decide(policy, [*frames, FrameRef(seq_num=4, skip_reason="bad")]).action == "continue"


def test_novel_rule_round_trips_through_json():
    p = Policy(rules=[novelty_rule(2)])
    back = Policy.loads(p.dumps())
    assert back.rules[0].kind == "novel" and back.rules[0].count == 2


# ------------------------------------------------------------------ catalog search
def _tag_stream(run, results, checkpoint="c0ffee000000", dim=8):
    from bluesky_xsml.catalog.append import append_tag_stream, tag_stream_name
    from bluesky_xsml.documents.compose import TagStreamComposer

    start = run.metadata["start"]
    composer = TagStreamComposer(start, TAG_NAMES, [0.5] * len(TAG_NAMES),
                                 {"checkpoint_id": checkpoint,
                                  "novelty": {"threshold": 1.0, "embedding_dim": dim}},
                                 tag_stream_name(checkpoint))
    n_ring = sum("ring_isotropic" in r.tags for r in results)
    summary = {"xsml_tags": ["ring_isotropic"], "xsml_tag_counts": {"ring_isotropic": n_ring},
               "xsml_model": checkpoint,
               "xsml_models": [checkpoint], "xsml_frames": len(results), "xsml_skipped": {},
               "xsml_novel": sum(r.novel for r in results)}
    return append_tag_stream(run, composer.descriptor, [composer.page(results)], summary)


@pytest.fixture(scope="module")
def similar_catalog(tmp_path_factory):
    """Three runs of 4 frames; run 2, seq 3 nearly duplicates run 0, seq 1."""
    from bluesky import RunEngine

    from bluesky_xsml.catalog.embedded import EmbeddedCatalog, make_writer
    from bluesky_xsml.documents.compose import FrameResult

    from .test_query import write_run

    rng = np.random.default_rng(7)
    base = rng.normal(size=(12, 8))
    base[11] = base[0] + 0.01 * rng.normal(size=8)  # the near-duplicate
    vecs = (base / np.linalg.norm(base, axis=1, keepdims=True)).astype(np.float16)
    with EmbeddedCatalog(tmp_path_factory.mktemp("similar")) as cat:
        RE = RunEngine({}, call_returns_result=False)
        writer = make_writer(cat.catalog, batch_size=50)
        uids = []
        for r in range(3):
            uid = write_run(RE, writer, f"s{r}")
            uids.append(uid)
            results = [FrameResult(stream="primary", seq_num=i + 1, event_uid="", key="img",
                                   frame_index=0,
                                   probs=[0.9] + [0.0] * (len(TAG_NAMES) - 1),
                                   tags=("ring_isotropic",),
                                   checkpoint="c0ffee000000", latency=0.01,
                                   novelty=float(i), novel=i >= 3,
                                   embedding=vecs[4 * r + i]) for i in range(4)]
            _tag_stream(cat.catalog[uid], results)
        yield cat, uids


def test_find_similar_returns_the_near_duplicate_first(similar_catalog):
    from bluesky_xsml.query import SimilarityIndex, find_similar

    cat, uids = similar_catalog
    table = find_similar(cat.catalog, uids[0], 1, k=3)
    assert list(table.columns)[-1] == "similarity"
    assert (table["uid"].iloc[0], int(table["seq_num"].iloc[0])) == (uids[2], 4)
    assert table["similarity"].iloc[0] > 0.99
    assert list(table["similarity"]) == sorted(table["similarity"], reverse=True)
    assert not ((table["uid"] == uids[0]) & (table["seq_num"] == 1)).any()  # not itself
    index = SimilarityIndex.from_catalog(cat.catalog)
    assert len(index) == 12 and index.dim == 8
    with pytest.raises(KeyError, match="no frame with embedding"):
        find_similar(None, uids[0], 99, index=index)


def test_find_frames_novel_filter_reads_the_tag_stream(similar_catalog):
    from bluesky_xsml.query import find_frames

    cat, uids = similar_catalog
    rows = find_frames(cat.catalog[uids[1]], "ring_isotropic", min_prob=0.0, novel=True)
    assert rows["seq_num"].tolist() == [4] and rows["novel"].all()
    assert find_frames(cat.catalog[uids[1]], "ring_isotropic", min_prob=0.0,
                       novel=False)["seq_num"].tolist() == [1, 2, 3]
    assert "novel" not in find_frames(cat.catalog[uids[1]], "ring_isotropic",
                                      min_prob=0.0).columns
    with pytest.raises(ValueError, match="novel must be"):
        find_frames(cat.catalog, "ring_isotropic", novel="yes")


def test_frame_index_answers_novel_queries_and_old_indexes_fall_back():
    from bluesky_xsml.catalog.query import _frames_from_index
    from bluesky_xsml.documents.compose import FrameResult
    from bluesky_xsml.documents.frame_index import FrameIndex

    idx = FrameIndex(["ring_isotropic"], "xsml_tags", min_prob=0.5)
    for i, nov in enumerate([False, True, False]):
        idx.add(FrameResult(stream="primary", seq_num=i + 1, event_uid="", key="img",
                            frame_index=0, probs=[0.9], tags=("ring_isotropic",),
                            novelty=float(i), novel=nov), {})
    stop = {"xsml_index": idx.summary(), "xsml_stream": "xsml_tags"}
    start = {"uid": "u", "scan_id": 1}
    rows = _frames_from_index(start, stop, "ring_isotropic", 0.5, None, None, None, (), True)
    assert [r["seq_num"] for r in rows] == [2] and rows[0]["novelty"] == 1.0
    for column in ("novel", "novelty"):
        del stop["xsml_index"]["frames"][column]
    assert _frames_from_index(start, stop, "ring_isotropic", 0.5, None, None, None, (),
                              True) is None  # read the streams instead
    assert _frames_from_index(start, stop, "ring_isotropic", 0.5, None, None, None, ()) \
        is not None


def test_cli_similar_and_query_novel(similar_catalog, capsys, tmp_path):
    from bluesky_xsml.cli import main

    cat, uids = similar_catalog
    side = tmp_path / "sim.npz"
    code = main(["similar", uids[0][:8], "1", "-k", "2", "--catalog", str(cat.directory),
                 "--save-index", str(side)])
    out = capsys.readouterr()
    assert code == 0 and uids[2] in out.out.splitlines()[1], out
    assert main(["similar", uids[0][:8], "1", "--index", str(side)]) == 0
    assert main(["similar", uids[0][:8], "77", "--index", str(side)]) == 1
    assert "no frame with embedding" in capsys.readouterr().err
    code = main(["query", "ring_isotropic", "--catalog", str(cat.directory), "--novel"])
    out = capsys.readouterr()
    assert code == 0 and "3 frames with ring_isotropic" in out.err, out


# ------------------------------------------------------------------ the service
def test_similar_route_finds_frames_like_a_live_frame(fitted, tmp_path):
    from bluesky import RunEngine

    from bluesky_xsml.api.app import create_app
    from bluesky_xsml.api.settings import ServiceSettings

    from .test_api import ASGIClient

    xsml = TaggingCallback(fitted, threads=1, max_wait=0.01)
    RE = RunEngine({}, call_returns_result=False)
    RE.subscribe(xsml)
    app = create_app(xsml, settings=ServiceSettings(api_key="k" * 24, port=0))
    client = ASGIClient(app)
    try:
        uids = []
        for seed in (0, 1):
            (uid,) = RE(count([make_image_detector(shape=(64, 80), seed=seed)], 4))
            uids.append(uid)
        assert xsml.flush(60)
        r = client.get(f"/api/runs/{uids[0]}/frames/2/similar", params={"k": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["query"]["seq_num"] == 2 and math.isfinite(body["query"]["novelty"])
        sims = [f["similarity"] for f in body["frames"]]
        assert len(sims) == 3 and sims == sorted(sims, reverse=True)
        assert {f["run_uid"] for f in body["frames"]} <= set(uids)
        assert not any(f["run_uid"] == uids[0] and f["seq_num"] == 2 for f in body["frames"])
        assert client.get(f"/api/runs/{uids[0]}/frames/99/similar").status_code == 404
        assert client.get(f"/api/runs/{uids[0]}/frames/2/similar",
                          params={"k": 0}).status_code == 422
    finally:
        xsml.close()


def test_fine_tuning_refits_the_statistics_for_the_new_weights(fitted):
    frames = poisson_frames(24, 8)
    labels = np.full((24, len(TAG_NAMES)), np.nan, np.float32)
    labels[:, 0] = np.arange(24) % 2
    new = finetune_frames(fitted, frames, labels, steps=2, batch_size=8, synthetic=None,
                          synthetic_val=None, val_fraction=0.25)
    assert new.checkpoint_id != fitted.checkpoint_id
    assert new.novelty is not None and new.novelty.digest() != fitted.novelty.digest()
    assert new.novelty.info["checkpoint_id"] == new.checkpoint_id
    assert new.novelty.embedding_dim == fitted.novelty.embedding_dim
    assert np.isfinite(new.analyse(frames[:2]).novelty).all()


def test_cli_novelty_fit_writes_a_sidecar_or_a_checkpoint(tmp_path, capsys):
    import json

    from bluesky_xsml.cli import main

    path = Tagger.untrained(seed=0, config=TINY).save(tmp_path / "m.pt")
    common = ["--checkpoint", str(path), "--n-fit", "40", "--n-val", "20", "--sizes", "64",
              "--embedding-dim", "8", "--fpr", "0.1"]
    assert main(["novelty-fit", *common, "--sidecar"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["written"] == str(sidecar_path(path)) and out["fpr"] == 0.1
    loaded = Tagger.load(path)
    assert loaded.novelty is not None and loaded.novelty.threshold == pytest.approx(
        out["threshold"], abs=1e-3)
    assert main(["novelty-fit", *common, "--out", str(tmp_path / "with.pt")]) == 0
    capsys.readouterr()
    inside = torch.load(tmp_path / "with.pt", weights_only=True)
    assert "novelty" in inside and Tagger.load(tmp_path / "with.pt").checkpoint_id == \
        loaded.checkpoint_id
    assert main(["novelty-fit", "--checkpoint", str(tmp_path / "none.pt"), "--sidecar"]) == 2
