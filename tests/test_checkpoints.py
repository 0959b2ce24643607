"""bluesky_xsml.checkpoints: the file format below inference and training.

The tagger's own round trip and refusals are in test_tagger.py; these check the module
that both inference and training use, on its own.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest
import torch

from bluesky_xsml import checkpoints as ck
from bluesky_xsml.errors import CheckpointError
from bluesky_xsml.inference import tagger as tagger_module


def test_atomic_save_then_safe_load_round_trips(tmp_path):
    path = ck.atomic_torch_save({"format": "x", "w": torch.arange(3.0)}, tmp_path / "a" / "b.pt")
    assert path.exists() and oct(path.stat().st_mode & 0o777) == "0o644"
    assert ck.safe_torch_load(path)["w"].tolist() == [0.0, 1.0, 2.0]
    assert [p.name for p in path.parent.iterdir()] == ["b.pt"]  # no temporary file left


def test_a_failed_save_leaves_the_previous_file(tmp_path):
    path = ck.atomic_torch_save({"v": 1}, tmp_path / "c.pt")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        ck.atomic_torch_save({"v": Unpicklable()}, path)
    assert ck.safe_torch_load(path) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_safe_load_refuses_missing_truncated_and_code(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ck.safe_torch_load(tmp_path / "missing.pt")
    good = ck.atomic_torch_save({"w": torch.ones(100)}, tmp_path / "good.pt")
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="truncated file or one that needs code"):
        ck.safe_torch_load(tmp_path / "cut.pt")

    class Code:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    with open(tmp_path / "code.pt", "wb") as f:
        pickle.dump({"x": Code()}, f)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        ck.safe_torch_load(tmp_path / "code.pt")


def test_content_id_covers_weights_and_header():
    w = {"a": torch.ones(2), "b": torch.zeros(3, dtype=torch.bfloat16)}
    base = ck.content_id(w, {"tags": ["x"]})
    assert len(base) == 12 and base == ck.content_id(dict(reversed(list(w.items()))),
                                                      {"tags": ["x"]})
    assert ck.content_id(w, {"tags": ["y"]}) != base
    assert ck.content_id({**w, "a": torch.tensor([1.0, 1.5])}, {"tags": ["x"]}) != base


def test_check_format_refuses_other_files_and_newer_versions():
    ok = {"format": ck.CHECKPOINT_FORMAT, "format_version": ck.CHECKPOINT_FORMAT_VERSION}
    assert ck.check_format(ok) is ok
    with pytest.raises(CheckpointError, match="is not a bluesky-xsml-checkpoint file"):
        ck.check_format([1, 2], "list.pt")
    with pytest.raises(CheckpointError, match="reads up to"):
        ck.check_format({**ok, "format_version": ck.CHECKPOINT_FORMAT_VERSION + 1}, "new.pt")


def test_the_tagger_module_keeps_the_names_it_exported():
    for name in ("CHECKPOINT_FORMAT", "MIN_SAFE_TORCH", "atomic_torch_save",
                 "default_checkpoint_path", "require_safe_torch"):
        assert getattr(tagger_module, name) is getattr(ck, name)


def test_inference_loads_without_training():
    """Importing every inference module (and the process entry's loop) loads no training."""
    code = ("import sys, bluesky_xsml.checkpoints, bluesky_xsml.inference.tagger, "
            "bluesky_xsml.inference.process, bluesky_xsml.inference.child, "
            "bluesky_xsml.inference.remote, bluesky_xsml.inference.child_process; "
            "print(sorted(m for m in sys.modules if m.startswith('bluesky_xsml.training')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]"
