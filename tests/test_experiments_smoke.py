"""Every script in experiments/ still starts: its ``--help`` runs and names its options.

The scripts measure things that take minutes to hours, so the suite does not run them; it
checks that each imports what it needs from the package and parses its command line, so a
change to the package that breaks one fails here. experiments/README.md lists them.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SCRIPTS = sorted(p.name for p in EXPERIMENTS.glob("*.py"))


def test_every_script_is_listed_in_the_readme():
    readme = (EXPERIMENTS / "README.md").read_text()
    listed = set(re.findall(r"^\| `([\w.]+)` \|", readme, flags=re.M))
    on_disk = {p.name for p in EXPERIMENTS.iterdir() if p.suffix in (".py", ".sh")}
    assert listed == on_disk


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_starts(script):
    out = subprocess.run([sys.executable, str(EXPERIMENTS / script), "--help"],
                         capture_output=True, text=True, timeout=120,
                         cwd=EXPERIMENTS.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "usage:" in out.stdout and "--help" in out.stdout


def test_the_shell_experiment_is_valid_bash():
    for script in EXPERIMENTS.glob("*.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
