"""``renderb:`` data sources: renderer B's frames rendered straight into the training cache.

Frames of renderer B are up to 1475 px and take 20-250 ms each, so every source here has a
few frames only.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace

import numpy as np
import pytest

from bluesky_xsml.preprocess import PreprocessConfig
from bluesky_xsml.render_b import SceneSampler, render_scene
from bluesky_xsml.render_b.detectors import DETECTORS
from bluesky_xsml.render_b.store import write
from bluesky_xsml.training import data
from bluesky_xsml.training.data import (
    RenderBSpec,
    SynthSpec,
    _cache_key,
    load_arrays,
    parse_spec,
    renderer_b_fingerprint,
)

CFG = PreprocessConfig()


def _same(a, b) -> None:
    """Two CachedArrays hold the same frames, row for row."""
    assert len(a) == len(b)
    assert np.array_equal(np.asarray(a.inputs), np.asarray(b.inputs))
    assert np.array_equal(a.labels, b.labels, equal_nan=True)
    assert np.array_equal(a.features, b.features, equal_nan=True)
    assert a.detectors.tolist() == b.detectors.tolist()
    assert a.shapes.tolist() == b.shapes.tolist()
    assert np.array_equal(a.centers, b.centers, equal_nan=True)


# ----------------------------------------------------------------------- parsing


def test_spec_parses_prints_and_shards():
    spec = RenderBSpec.parse("renderb:seed=3, n=5,start=2,detectors=b_ccd_512+b_timepix_quad")
    assert (spec.seed, spec.n, spec.start) == (3, 5, 2)
    assert spec.detectors == ("b_ccd_512", "b_timepix_quad")
    assert RenderBSpec.parse(str(spec)) == spec
    assert spec.sampler().detectors == ("b_ccd_512", "b_timepix_quad")
    default = RenderBSpec.parse("renderb:")
    assert default == RenderBSpec() == RenderBSpec.parse("renderb:detectors=all")
    assert str(default) == "renderb:seed=0,n=1000,start=0"
    assert default.sampler() == SceneSampler()  # python -m bluesky_xsml.render_b's default
    assert [(s.start, s.n) for s in RenderBSpec(n=5000, start=7).shards(2000)] == [
        (7, 2000), (2007, 2000), (4007, 1000)]
    assert isinstance(parse_spec("renderb:n=2"), RenderBSpec)
    assert isinstance(parse_spec("synth:n=2"), SynthSpec)
    assert parse_spec("runs/b-train.zarr") is None


@pytest.mark.parametrize(("text", "message"), [
    ("renderb:frames=3", "unknown renderer B spec key 'frames'"),
    ("renderb:n", "bad renderer B spec item 'n'"),
    ("renderb:n=ten", "n='ten' in 'renderb:n=ten' is not an integer"),
    ("renderb:n=0", "needs n >= 1 and start >= 0"),
    ("renderb:start=-1", "needs n >= 1 and start >= 0"),
    ("renderb:sizes=256", "known: seed, n, start, detectors"),
])
def test_bad_specs_are_clear_errors(text, message):
    with pytest.raises(ValueError, match=message):
        RenderBSpec.parse(text)


def test_unknown_detector_lists_renderer_b_detectors(tmp_path):
    with pytest.raises(ValueError, match="unknown renderer B detector 'eiger_4m'") as err:
        load_arrays("renderb:n=2,detectors=b_ccd_512+eiger_4m", cache_dir=tmp_path,
                    progress=False)
    assert all(d.name in str(err.value) for d in DETECTORS)
    assert not list(tmp_path.iterdir())  # refused before anything was built


# ----------------------------------------------------------------- the same frames


@pytest.mark.parametrize("seed", [3, 7])  # 3: float32 and uint16 frames; 7: uint32 and int32
def test_frames_match_a_store_of_the_same_seed(tmp_path, seed):
    store = tmp_path / "b.zarr"
    write(store, 4, seed=seed, block=3)
    from_store = load_arrays(str(store), cache_dir=tmp_path / "c1", progress=False)
    direct = load_arrays(f"renderb:seed={seed},n=4", cache_dir=tmp_path / "c2", progress=False)
    _same(direct, from_store)
    assert direct.source == f"renderb:seed={seed},n=4,start=0"
    # and they are render_scene's frames, with its metadata
    for i in range(4):
        frame, labels, scene = render_scene(seed, i)
        assert np.array_equal(direct.labels[i], labels)
        assert direct.detectors[i] == scene["detector"]["name"]
        assert tuple(direct.shapes[i]) == frame.shape
        assert direct.centers[i].tolist() == scene["geometry"]["beam_center"]
    assert len(set(direct.detectors.tolist())) > 1 and np.isfinite(direct.centers).all()


def test_start_and_detectors_match_a_restricted_store(tmp_path):
    dets = ("b_timepix_single", "b_ccd_512")
    store = tmp_path / "small.zarr"
    write(store, 3, seed=5, sampler=replace(SceneSampler(), detectors=dets))
    rows = load_arrays(str(store), cache_dir=tmp_path / "c1", progress=False).subset([1, 2])
    direct = load_arrays(f"renderb:seed=5,n=2,start=1,detectors={'+'.join(dets)}",
                         cache_dir=tmp_path / "c2", progress=False)
    _same(direct, rows)
    assert set(direct.detectors.tolist()) <= set(dets)


def test_shards_workers_and_bar_joined_sources(tmp_path, monkeypatch):
    one = load_arrays("renderb:seed=3,n=3", cache_dir=tmp_path / "one", progress=False)
    monkeypatch.setattr(data, "SHARD", 2)
    monkeypatch.setattr(data, "_CHUNK", 1)
    sharded = load_arrays("renderb:seed=3,n=3", cache_dir=tmp_path / "two", workers=2,
                          progress=False)
    _same(sharded, one)
    assert len(list((tmp_path / "two").iterdir())) == 2  # shards of 2 and 1 frames
    metas = [json.loads((d / "meta.json").read_text()) for d in (tmp_path / "two").iterdir()]
    assert {m["source"] for m in metas} == {"renderb:seed=3,n=2,start=0",
                                           "renderb:seed=3,n=1,start=2"}
    assert {m["renderer_b"] for m in metas} == {renderer_b_fingerprint()}
    both = load_arrays("synth:seed=7,n=2,sizes=64 | renderb:seed=3,n=3",
                       cache_dir=tmp_path / "two", progress=False)
    assert len(both) == 5 and both.source.endswith("|renderb:seed=3,n=3,start=0")
    assert np.array_equal(np.asarray(both.inputs)[2:], np.asarray(one.inputs))
    assert both.detectors[2:].tolist() == one.detectors.tolist()


# ------------------------------------------------------------------------ cache keys


def test_cache_key_is_its_own_and_follows_renderer_b(monkeypatch):
    key = _cache_key("renderb:seed=0,n=5,start=0", CFG)
    # a synth spec of the same seed and count is another key; synth keys are unchanged
    assert key != _cache_key("synth:seed=0,n=5,sizes=256,detectors=train,start=0", CFG)
    assert _cache_key("synth:seed=0,n=2000,sizes=256+512+768+1024,detectors=train,start=0",
                      CFG) == "0a250d65cbe64147"
    assert key != _cache_key("renderb:seed=1,n=5,start=0", CFG)
    assert key != _cache_key("renderb:seed=0,n=5,start=0,detectors=b_ccd_512", CFG)
    assert key != _cache_key("renderb:seed=0,n=5,start=0", PreprocessConfig(size=64))
    monkeypatch.setattr(data, "renderer_b_fingerprint", lambda root=None: "changed")
    assert _cache_key("renderb:seed=0,n=5,start=0", CFG) != key


def test_fingerprint_changes_with_renderer_b_source(tmp_path):
    import bluesky_xsml.render_b as rb

    src = tmp_path / "render_b"
    shutil.copytree(rb.__path__[0], src, ignore=shutil.ignore_patterns("__pycache__"))
    assert renderer_b_fingerprint(src) == renderer_b_fingerprint()
    for name in ("store.py", "__main__.py"):  # the writer and command line: same frames
        (src / name).write_text((src / name).read_text() + "\n# touched\n")
    assert renderer_b_fingerprint(src) == renderer_b_fingerprint()
    (src / "sampler.py").write_text((src / "sampler.py").read_text() + "\n# changed\n")
    changed = renderer_b_fingerprint(src)
    assert changed != renderer_b_fingerprint()
    (src / "noise.py").write_text("# a new module\n")
    assert renderer_b_fingerprint(src) != changed


# ---------------------------------------------------------------------- entry points


def test_train_n_option_applies_to_renderb_specs():
    from bluesky_xsml.training.train import _with_n

    assert _with_n("renderb:seed=0,n=10,detectors=b_ccd_512", 4) == \
        "renderb:seed=0,n=4,start=0,detectors=b_ccd_512"
    with pytest.raises(SystemExit, match=re.escape("single 'synth:...' or 'renderb:...'")):
        _with_n("runs/b-train.zarr", 4)


def test_train_and_evaluate_commands_read_renderb_sources(tmp_path, capsys):
    import torch

    from bluesky_xsml import cli
    from bluesky_xsml.checkpoints import safe_torch_load

    cache = ["--cache-dir", str(tmp_path / "cache"), "--workers", "1", "--no-progress"]
    tiny = ["--widths", "8,16", "--depths", "1,1", "--stem-width", "8", "--batch-size", "2",
            "--input-size", "64", "--threads", "1", "--precision", "fp32", "--epochs", "1"]
    out = tmp_path / "train-on-b"
    assert cli.main(["train", "--data", "renderb:seed=3,n=4", "--n", "3",
                     "--val-data", "renderb:seed=7,n=4", "--out", str(out), *tiny, *cache]) == 0
    state = safe_torch_load(out / "last.pt")
    assert state["train_data"] == "renderb:seed=3,n=3,start=0"
    assert state["val_data"] == "renderb:seed=7,n=4"
    assert isinstance(state["state_dict"], dict) and torch.is_tensor(
        next(iter(state["state_dict"].values())))
    capsys.readouterr()
    built = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert cli.main(["evaluate", "--model", str(out), "--data", "renderb:seed=7,n=4",
                     "--by-detector", "--out", str(tmp_path / "ev"), "--precision", "fp32",
                     *cache]) == 0
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == built  # from the cache
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["data"] == "renderb:seed=7,n=4,start=0" and metrics["n_frames"] == 4
    assert set(metrics["per_detector"]) == {render_scene(7, i)[2]["detector"]["name"]
                                            for i in range(4)}
