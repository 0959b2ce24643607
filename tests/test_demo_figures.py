"""docs/tools/demo_figures.py: the demo's figures in README.md and docs/tutorial.md.

The figures are checked against ``tests/demo_summary.json``, the summary of a full
``xsml demo`` run that ``python docs/tools/demo_figures.py --write`` stores next to
the figures it writes (the demo itself takes minutes; ``test_demo.py`` runs a small
one).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from .conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool():
    return load_script("docs/tools/demo_figures.py")


@pytest.fixture(scope="module")
def summary():
    return json.loads((ROOT / "tests/demo_summary.json").read_text())


def test_docs_match_the_recorded_demo_run(tool, summary):
    assert tool.check(summary) == []


def test_fixture_keeps_only_reproducible_keys(tool, summary):
    assert set(summary) == set(tool.KEPT)


@pytest.fixture
def docs_copy(tool, tmp_path):
    for rel in tool.FIGURES:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    return tmp_path


def test_a_changed_run_makes_every_file_stale_and_write_fixes_it(tool, summary, docs_copy):
    changed = copy.deepcopy(summary)
    changed["frames"] += 4
    changed["agreement"] = 0.79
    changed["queries"][0]["sample_x"][1] += 0.1
    stale = tool.check(changed, docs_copy)
    assert [line.split(":")[0] for line in stale] == list(tool.FIGURES)
    assert all("stale demo figures" in line for line in stale)
    assert tool.check(changed, docs_copy, write=True) == [f"{rel}: rewritten"
                                                         for rel in tool.FIGURES]
    assert tool.check(changed, docs_copy) == []
    tutorial = (docs_copy / "docs/tutorial.md").read_text()
    assert f"tags {changed['frames']} frames" in tutorial and "79%" in tutorial
    # only the block changed
    original = (ROOT / "docs/tutorial.md").read_text()
    assert tutorial.split(tool.BEGIN)[0] == original.split(tool.BEGIN)[0]
    assert tutorial.split(tool.END)[1] == original.split(tool.END)[1]


def test_a_missing_block_is_reported(tool, summary, docs_copy):
    readme = docs_copy / "README.md"
    readme.write_text(readme.read_text().replace(tool.END, ""))
    assert tool.check(summary, docs_copy, write=True) == [
        "README.md: expected one demo-figures block, found 0"]
