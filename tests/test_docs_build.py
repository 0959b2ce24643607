"""The Sphinx documentation builds with warnings as errors (the ``docs`` extra)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"

pytest.importorskip("sphinx", reason="needs the docs extra (sphinx)")
pytest.importorskip("myst_parser", reason="needs the docs extra (myst-parser)")
pytest.importorskip("pydata_sphinx_theme", reason="needs the docs extra (pydata-sphinx-theme)")


def test_docs_build_without_warnings(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(DOCS), str(tmp_path / "html")],
        check=False, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-5000:]
    html = tmp_path / "html"
    for page in ("index", "tutorial", "reference/cli", "reference/api", "reference/settings",
                 "reference/tag-stream", "explanation/architecture", "how-to/subscribe"):
        assert (html / f"{page}.html").exists(), page
    # reference pages generated from the code
    cli = (html / "reference" / "cli.html").read_text()
    assert "xsml demo" in cli and "xsml plot" in cli and "--serve" in cli
    api = (html / "reference" / "api.html").read_text()
    assert "CombinatorialSample" in api and "TaggingCallback" in api
    assert "XSML_PORT" in (html / "reference" / "settings.html").read_text()


def test_a_missing_optional_page_is_left_out_of_the_index(tmp_path):
    """conf.py drops toctree entries of optional topic pages that do not exist."""
    import runpy
    import types

    conf = runpy.run_path(str(DOCS / "conf.py"))
    (tmp_path / "steering.md").write_text("# Steering\n")
    source = ["```{toctree}\nlive-tagging\nsteering\nreliability\n```\n"]
    app = types.SimpleNamespace(srcdir=str(tmp_path))
    conf["_drop_missing_pages"](app, "index", source)
    assert source[0] == "```{toctree}\nlive-tagging\nsteering\n```\n"
    other = ["reliability\n"]
    conf["_drop_missing_pages"](app, "tutorial", other)   # only the index is filtered
    assert other == ["reliability\n"]
