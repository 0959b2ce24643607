"""The package's layers hold: ``lint-imports`` checks the contracts in pyproject.toml.

The contracts (docs/decisions/0004-layers.md) say which layer may import which, that
inference never imports training and that no package has an import cycle among its
modules. The second test shows that they catch a new upward import: in a copy of the
package, the bottom layer's checkpoint module is made to import training.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports")

pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter is not installed "
                                                     "(pip install -e '.[test]')")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT, "--no-cache"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_layer_contracts_hold():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]


def test_a_new_upward_import_breaks_a_contract(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(ROOT / "bluesky_xsml", tmp_path / "bluesky_xsml",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pt", "*.npz"))
    with (tmp_path / "bluesky_xsml" / "checkpoints.py").open("a") as f:
        f.write("\nfrom .training import finetune  # a cycle: training imports checkpoints\n")
    out = _lint(tmp_path)
    assert out.returncode != 0
    text = " ".join(out.stdout.split())
    assert "bluesky_xsml.checkpoints -> bluesky_xsml.training.finetune" in text, text[-4000:]
    assert "BROKEN" in text
