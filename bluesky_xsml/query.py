"""Find runs and frames by tag: the public query functions.

>>> from bluesky_xsml.query import find_runs, find_frames

See :mod:`bluesky_xsml.catalog.query` and docs/catalog.md.
"""

from __future__ import annotations

from .catalog.query import find_frames, find_runs, run_summaries

__all__ = ["find_frames", "find_runs", "run_summaries"]
