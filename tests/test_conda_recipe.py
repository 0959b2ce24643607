"""recipe/meta.yaml (the conda package) asks for what pyproject.toml asks for.

Beamline environments are conda environments; the recipe's run requirements are
pyproject.toml's dependencies under their conda-forge names, with the same bounds.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
#: PyPI name -> conda-forge name, where they differ.
CONDA_NAMES = {"torch": "pytorch"}


def load_recipe(text: str) -> dict:
    """Parse meta.yaml's YAML, with its Jinja statements dropped and expressions filled in."""
    text = re.sub(r"\{%.*?%\}", "", text)
    text = re.sub(r"\{\{.*?\}\}", "JINJA", text)
    return yaml.safe_load(text)


def _conda_requirements(entries: list[str]) -> dict[str, SpecifierSet]:
    out = {}
    for entry in entries:
        name, _, spec = entry.strip().partition(" ")
        out[canonicalize_name(name)] = SpecifierSet(spec.replace(" ", ""))
    return out


def _pypi_requirements(entries: list[str]) -> dict[str, SpecifierSet]:
    out = {}
    for entry in entries:
        req = Requirement(entry)
        assert not req.marker and not req.extras, f"map {entry!r} to conda by hand"
        name = canonicalize_name(CONDA_NAMES.get(req.name, req.name))
        out[name] = req.specifier
    return out


def differences(pyproject: dict, recipe: dict) -> list[str]:
    """Where the recipe's requirements, entry points or license differ from pyproject's."""
    project = pyproject["project"]
    problems = []

    def compare(what: str, want: dict, have: dict) -> None:
        for name in sorted(set(want) | set(have)):
            if name not in have:
                problems.append(f"{what}: {name} {want[name]} missing from the recipe")
            elif name not in want:
                problems.append(f"{what}: {name} {have[name]} is not in pyproject.toml")
            elif want[name] != have[name]:
                problems.append(f"{what}: {name} is {have[name]} in the recipe, "
                                f"{want[name]} in pyproject.toml")

    run = _conda_requirements(recipe["requirements"]["run"])
    python = run.pop("python", None)
    compare("run", _pypi_requirements(project["dependencies"]), run)
    if python != SpecifierSet(project["requires-python"]):
        problems.append(f"run: python is {python}, requires-python {project['requires-python']}")

    host = _conda_requirements(recipe["requirements"]["host"])
    build_requires = _pypi_requirements(pyproject["build-system"]["requires"])
    compare("host", build_requires,
            {k: v for k, v in host.items() if k not in ("python", "pip")})

    scripts = {f"{k} = {v}" for k, v in project.get("scripts", {}).items()}
    if set(recipe["build"].get("entry_points", [])) != scripts:
        problems.append(f"entry points: {recipe['build'].get('entry_points')} != {scripts}")
    if recipe["about"]["license"] != project["license"]:
        problems.append(f"license: {recipe['about']['license']} != {project['license']}")
    if recipe["package"]["name"] != project["name"]:
        problems.append(f"name: {recipe['package']['name']} != {project['name']}")
    return problems


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def recipe_text():
    return (ROOT / "recipe/meta.yaml").read_text()


def test_recipe_matches_pyproject(pyproject, recipe_text):
    assert differences(pyproject, load_recipe(recipe_text)) == []


def test_recipe_license_file_exists(recipe_text):
    assert (ROOT / load_recipe(recipe_text)["about"]["license_file"]).is_file()


@pytest.mark.parametrize("edit, expected", [
    (("    - numba >=0.60\n", ""), "run: numba >=0.60 missing from the recipe"),
    (("pytorch >=2.6,<3", "pytorch >=2.6"), "run: pytorch is >=2.6 in the recipe, "),
    (("    - pydantic >=2.6\n", "    - pydantic >=2.6\n    - tqdm\n"),
     "run: tqdm  is not in pyproject.toml"),
    (("  run:\n    - python >=3.11", "  run:\n    - python >=3.10"), "run: python is >=3.10"),
    (("setuptools-scm >=8", "setuptools-scm"), "host: setuptools-scm is "),
])
def test_a_difference_is_caught(pyproject, recipe_text, edit, expected):
    old, new = edit
    assert old in recipe_text
    found = differences(pyproject, load_recipe(recipe_text.replace(old, new)))
    assert len(found) == 1 and found[0].startswith(expected), found


def test_a_changed_pyproject_bound_is_caught(pyproject, recipe_text):
    changed = {**pyproject, "project": {**pyproject["project"]}}
    changed["project"]["dependencies"] = [
        "numpy>=2" if d.startswith("numpy") else d for d in pyproject["project"]["dependencies"]]
    assert differences(changed, load_recipe(recipe_text)) == [
        "run: numpy is >=1.26 in the recipe, >=2 in pyproject.toml"]
