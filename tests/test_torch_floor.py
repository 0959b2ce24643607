"""Checkpoints are loaded only with a torch whose ``weights_only=True`` cannot be bypassed."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import torch

from bluesky_xsml import Tagger
from bluesky_xsml.errors import CheckpointError
from bluesky_xsml.inference.tagger import require_safe_torch

pytestmark = pytest.mark.security


@pytest.mark.parametrize("old", ["2.3.0", "2.5.1+cpu", "1.13.1", "garbage"])
def test_old_torch_refuses_to_load_a_checkpoint(tmp_path, monkeypatch, old):
    path = Tagger.untrained(seed=0).save(tmp_path / "model.pt")
    monkeypatch.setattr(torch, "__version__", old)
    with pytest.raises(CheckpointError,
                       match=rf"torch {re.escape(old)} cannot load checkpoints safely.*"
                             r"Install torch>=2\.6"):
        Tagger.load(path)


@pytest.mark.parametrize("new", ["2.6.0", "2.13.0+cpu", "3.0.0.dev20270101"])
def test_safe_torch_loads(tmp_path, monkeypatch, new):
    path = Tagger.untrained(seed=0).save(tmp_path / "model.pt")
    monkeypatch.setattr(torch, "__version__", new)
    require_safe_torch()
    assert Tagger.load(path).checkpoint_id


def test_the_declared_floor_is_the_checked_one():
    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    torch_req = [d for d in meta["project"]["dependencies"] if d.startswith("torch")]
    assert torch_req and ">=2.6" in torch_req[0]


@pytest.mark.parametrize("version", ["2.6", "2.6+cpu", "2.10.1", "10.0.0", "2.6.0a0+git1"])
def test_floor_reads_major_and_minor_only(version):
    require_safe_torch(version)


@pytest.mark.parametrize("version", ["2", "2.5", "2.5.9+cu124", "2.x", "", "v2.6", "1.99"])
def test_refusal_names_the_version_the_reason_and_the_fix(version):
    with pytest.raises(CheckpointError) as info:
        require_safe_torch(version)
    assert str(info.value) == (
        f"torch {version} cannot load checkpoints safely: before 2.6, "
        "torch.load(weights_only=True) can be made to run code from the file "
        "(CVE-2025-32434). Install torch>=2.6 (bluesky-xsml requires it).")
