"""Every script in experiments/ still starts: its ``--help`` runs and names its options.

The scripts measure things that take minutes to hours, so the suite does not run them; it
checks that each imports what it needs from the package and parses its command line, so a
change to the package that breaks one fails here. experiments/README.md lists them.
"""

from __future__ import annotations

import re
import shlex
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


def _xsml_commands(script: Path, out: str) -> list[list[str]]:
    """The argument lists of the ``xsml`` commands of a shell script, ``$OUT`` filled in."""
    text = script.read_text().replace("\\\n", " ")
    return [shlex.split(line.replace('"$OUT"', out))[1:]
            for line in text.splitlines() if line.startswith("xsml ")]


@pytest.mark.parametrize("script", sorted(p.name for p in EXPERIMENTS.glob("*.sh")))
def test_shell_experiment_commands_parse(script, tmp_path):
    """Each ``xsml`` command's options parse, and each data source that is a spec parses."""
    from bluesky_xsml.cli import build_parser
    from bluesky_xsml.training.data import parse_spec

    commands = _xsml_commands(EXPERIMENTS / script, str(tmp_path))
    assert commands
    for argv in commands:
        args = build_parser(argv[:1]).parse_args(argv)  # SystemExit(2) on a bad option
        for source in (getattr(args, "data", None), getattr(args, "val_data", None)):
            for part in (source or "").split("|"):
                if part.startswith(("synth:", "renderb:")):
                    assert parse_spec(part) is not None, part


def test_loro_reduced_renders_renderer_b_into_the_cache_not_into_stores(tmp_path):
    """Renderer B's 10,000 frames come from renderb: sources; no zarr store is written."""
    from bluesky_xsml.cli import build_parser
    from bluesky_xsml.training.data import RenderBSpec, parse_spec

    script = EXPERIMENTS / "loro_reduced.sh"
    code = "\n".join(line for line in script.read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    assert ".zarr" not in code and "render_b" not in code
    renderb = {}
    for argv in _xsml_commands(script, str(tmp_path)):
        args = build_parser(argv[:1]).parse_args(argv)
        assert args.workers == 2
        for source in (args.data, getattr(args, "val_data", None) or ""):
            spec = parse_spec(source)
            if isinstance(spec, RenderBSpec):
                renderb[spec.seed] = spec.n
    assert renderb == {0: 8000, 1: 1000, 100: 1000}
