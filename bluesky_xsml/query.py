"""Find runs and frames by tag: the public query functions.

>>> from bluesky_xsml.query import find_runs, find_frames, find_similar

See :mod:`bluesky_xsml.catalog.query`, :mod:`bluesky_xsml.catalog.similar`,
docs/catalog.md and docs/novelty.md.
"""

from __future__ import annotations

from .catalog.query import find_frames, find_runs, run_summaries
from .catalog.similar import SimilarityIndex, find_similar

__all__ = ["find_frames", "find_runs", "find_similar", "run_summaries", "SimilarityIndex"]
