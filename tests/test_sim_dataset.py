"""Synthetic datasets on disk: exact round trip, resumability, the ``xsml synth`` CLI."""

from __future__ import annotations

import numpy as np
import pytest

from bluesky_xsml import cli
from bluesky_xsml.errors import ConfigurationError, FrameSourceError
from bluesky_xsml.sim.dataset import open_dataset, write_dataset
from bluesky_xsml.sim.generator import SceneGenerator

N, SIZE, SEED, BLOCK = 14, 64, 5, 4


def same_frame(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def store_arrays(path):
    import zarr

    root = zarr.open_group(str(path), mode="r")
    return {k: root[k][:] for k in ("frames", "labels", "shape", "dtype", "params", "done")}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A dataset written in one go, with the generator's own frames to compare with."""
    path = tmp_path_factory.mktemp("ds") / "straight.zarr"
    assert write_dataset(path, N, size=SIZE, seed=SEED, workers=1, block=BLOCK,
                         detectors=["train", "heldout"], progress=False) == N
    return path, SceneGenerator(seed=SEED, size=SIZE, detectors=["train", "heldout"]).batch(N)


def test_round_trip_is_exact(straight):
    path, (frames, labels, params) = straight
    ds = open_dataset(path)
    assert len(ds) == N and ds.complete
    assert ds.labels.dtype == np.float32 and np.array_equal(ds.labels, labels)
    for i in range(N):
        assert same_frame(ds.frames(i), frames[i]), i
        assert ds.params(i) == params[i]
    assert {f.dtype.name for f in frames} >= {"int32", "float32"}     # mixed dtypes stored
    assert all(same_frame(a, b) for a, b in zip(ds[2:9], frames[2:9], strict=True))
    assert all(same_frame(a, b) for a, b in zip(ds.frames([0, 13, 5]),
                                                [frames[0], frames[13], frames[5]], strict=True))
    assert same_frame(ds[-1], frames[-1]) and same_frame(ds.frame(4), frames[4])
    bits, shapes, dtypes = ds.read_padded(0, 3)
    assert bits.shape == (3, SIZE, SIZE) and bits.dtype == np.uint32
    h, w = shapes[1]
    assert same_frame(bits[1, :h, :w].copy().view(dtypes[1]) if dtypes[1] != "uint16"
                      else bits[1, :h, :w].astype("uint16"), frames[1])
    with pytest.raises(IndexError):
        ds.frames(N)


def test_resume_after_limit_and_interruption_matches_straight_run(straight, tmp_path):
    _path, _ = straight
    part = tmp_path / "part.zarr"
    kw = dict(size=SIZE, seed=SEED, block=BLOCK, detectors=["train", "heldout"], progress=False)
    assert write_dataset(part, N, workers=1, limit=5, **kw) == 8       # two whole blocks
    ds = open_dataset(part)
    assert not ds.complete and ds.written.sum() == 8
    with pytest.raises(FrameSourceError, match="not been written yet"):
        ds.frames(9)
    # simulate a crash in the middle of block 2: data half written, block not marked done
    import zarr

    root = zarr.open_group(str(part), mode="r+")
    root["frames"][8:10] = 12345
    root["labels"][8:10] = 1.0
    assert write_dataset(part, N, workers=2, **kw) == N                 # resume, 2 processes
    a, b = store_arrays(straight[0]), store_arrays(part)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_other_settings_are_refused_unless_overwrite(straight, tmp_path):
    path = tmp_path / "x.zarr"
    write_dataset(path, 4, size=32, seed=1, workers=1, block=2, progress=False)
    with pytest.raises(ConfigurationError, match=r"different settings \(seed: 1 != 2\)"):
        write_dataset(path, 4, size=32, seed=2, workers=1, block=2, progress=False)
    assert write_dataset(path, 4, size=32, seed=2, workers=1, block=2, overwrite=True,
                         progress=False) == 4
    assert open_dataset(path).attrs["seed"] == 2
    with pytest.raises(FrameSourceError, match="no dataset"):
        open_dataset(tmp_path / "missing.zarr")


def test_cli_writes_and_resumes(tmp_path, capsys):
    out = tmp_path / "cli.zarr"
    args = ["synth", "--n", "6", "--size", "48", "--out", str(out), "--seed", "3",
            "--block", "2", "--workers", "1", "--no-progress", "--detectors", "eiger_1m",
            "pilatus_300kw"]
    assert cli.main([*args, "--limit", "3"]) == 0
    assert "4/6 frames written" in capsys.readouterr().err
    assert cli.main(args) == 0
    ds = open_dataset(out)
    assert ds.complete and {ds.params(i)["detector"]["name"] for i in range(6)} <= {
        "eiger_1m", "pilatus_300kw"}
    ref = SceneGenerator(seed=3, size=48, detectors=["eiger_1m", "pilatus_300kw"]).frame_at(5)
    assert same_frame(ds.frames(5), ref[0])


@pytest.mark.parametrize("argv,message", [
    (["--n", "0"], "expected a positive integer, got '0'"),
    (["--n", "5", "--size", "8"], "size must be >= 16 pixels"),
    (["--n", "5", "--size", "big"], "expected an integer >= 16 or 'native'"),
    (["--n", "5", "--workers", "-2"], "expected a positive integer, got '-2'"),
])
def test_cli_rejects_bad_arguments(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(["synth", "--out", str(tmp_path / "bad.zarr"), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_unknown_detector_and_mismatched_store(tmp_path, capsys):
    out = tmp_path / "d.zarr"
    assert cli.main(["synth", "--n", "2", "--out", str(out), "--detectors", "pilatus_9m",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unknown detector 'pilatus_9m'" in err and "pilatus_6m" in err
    assert not out.exists()
    (tmp_path / "plain").mkdir()
    assert cli.main(["synth", "--n", "2", "--out", str(tmp_path / "plain"), "--no-progress"]) == 2
    assert "is not a synthetic dataset" in capsys.readouterr().err
