"""Sphinx configuration: Markdown pages (MyST), API reference from the docstrings.

Build: ``python -m sphinx -W -b html docs docs/_build/html`` (needs the ``docs``
extra). Topic pages that other parts of the project add later are listed in
``OPTIONAL_PAGES``; a missing one is left out of the table of contents instead
of breaking the build.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent))

import bluesky_xsml  # noqa: E402 - this checkout's package, after the sys.path lines above

project = "bluesky-xsml"
author = "bluesky-xsml contributors"
copyright = "2026, bluesky-xsml contributors"
version = release = bluesky_xsml.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "xsml_docs",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "tools", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autosummary_generate = True
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": False}
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False

html_theme = "pydata_sphinx_theme"
html_title = "bluesky-xsml"
html_theme_options = {"navigation_depth": 2, "show_toc_level": 2}

#: Topic pages written alongside other features; listed when present.
OPTIONAL_PAGES = ("finetuning", "steering", "api", "reliability", "scale-out")


def _drop_missing_pages(app, docname, source):
    """Leave optional pages that do not exist (yet) out of the index's toctrees."""
    if docname != "index":
        return
    srcdir = Path(app.srcdir)
    keep = []
    for line in source[0].splitlines(keepends=True):
        name = line.strip()
        if name in OPTIONAL_PAGES and not (srcdir / f"{name}.md").exists():
            continue
        keep.append(line)
    source[0] = "".join(keep)


def setup(app):
    app.connect("source-read", _drop_missing_pages)
