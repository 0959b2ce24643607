"""The wheel carries every file the package needs at run time.

An editable install (what the README and ``.ci/run`` use) reads files from the source
tree, so a file left out of ``package-data`` (the live page's HTML, JS and CSS once
were) goes unnoticed until someone installs the wheel. The wheel is built here once,
from a copy of the package without its git metadata: only ``pyproject.toml``'s
package-data can put the files in, and the version falls back to the configured one.
Installing the wheel into a fresh environment and running it is ``.ci/run``'s job.
"""

from __future__ import annotations

import email.parser
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bluesky_xsml"
#: Files in the source tree that are not part of the package.
NOT_SHIPPED = ("__pycache__", ".pyc", ".pyo", "_version.py")


def source_files() -> set[str]:
    """Every file of the package in the source tree, as a path in the wheel."""
    return {p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*")
            if p.is_file() and not any(part in NOT_SHIPPED for part in p.parts)
            and not p.name.endswith(NOT_SHIPPED)}


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / PACKAGE.name,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "_version.py"))
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=240)
    if proc.returncode:
        pytest.fail(f"pip wheel failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    (path,) = out.glob("bluesky_xsml-*.whl")
    with zipfile.ZipFile(path) as zf:
        yield zf


def test_wheel_has_every_runtime_file(wheel):
    names = set(wheel.namelist())
    missing = sorted(source_files() - names)
    assert missing == [], f"in the package, not in the wheel (add to package-data): {missing}"


def test_source_files_include_the_non_python_ones():
    """The check above covers the data files (a glob mistake would make it vacuous)."""
    data = {f for f in source_files() if not f.endswith(".py")}
    assert {"bluesky_xsml/api/page/index.html", "bluesky_xsml/api/page/app.js",
            "bluesky_xsml/api/page/style.css", "bluesky_xsml/models/default.pt",
            "bluesky_xsml/models/default.json", "bluesky_xsml/py.typed"} <= data


def test_wheel_holds_only_the_package(wheel):
    tops = {n.split("/")[0] for n in wheel.namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"bluesky_xsml"}
    assert "bluesky_xsml/_version.py" in wheel.namelist()


def test_wheel_metadata(wheel):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    fallback = pyproject["tool"]["setuptools_scm"]["fallback_version"]
    (meta_name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    meta = email.parser.Parser().parsestr(wheel.read(meta_name).decode())
    assert meta["Name"] == "bluesky-xsml"
    # no git metadata in the copy: the fallback version, also in the package itself
    assert meta["Version"] == fallback
    assert f"version = '{fallback}'" in wheel.read("bluesky_xsml/_version.py").decode().replace(
        '"', "'")
    assert meta["License-Expression"] == pyproject["project"]["license"]
    assert meta.get_all("License-File") == ["LICENSE"]
    (ep_name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert "xsml = bluesky_xsml.cli:main" in wheel.read(ep_name).decode()
