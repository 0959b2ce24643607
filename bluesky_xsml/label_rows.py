"""A label as the fine-tuner stores it: ``{"ring_oriented": True, ...}`` to tag names and a row.

Plain numpy, below :mod:`bluesky_xsml.inference` and :mod:`bluesky_xsml.training`,
so that the RunEngine's process can check a label without importing torch and
the tagging process (``isolation="process"``) can turn a label into the row it
trains on. :mod:`bluesky_xsml.training.live` re-exports :func:`parse_tag_labels`
from its old home.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["parse_tag_labels"]


def _binary(value: Any, tag: str) -> float:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    if isinstance(value, (bool, np.bool_)) or value in (0, 1):
        return float(value)
    raise ValueError(f"label {tag}={value!r}: use True/1 (present), False/0 (absent) or None "
                     "(unknown)")


def parse_tag_labels(tags: Mapping[str, Any]) -> tuple[tuple[str, ...], np.ndarray]:
    """``{"ring_oriented": True, ...}`` -> tag names and a float32 label row.

    Raises
    ------
    ValueError
        No tags, a name that cannot be a tag (not a Python identifier) or a
        value other than True/False/1/0/None.

    Examples
    --------
    >>> parse_tag_labels({"beam_off": True, "streaks": None})
    (('beam_off', 'streaks'), array([ 1., nan], dtype=float32))
    """
    if not tags:
        raise ValueError("give at least one tag, e.g. label(uid, 12, ring_oriented=True)")
    names = tuple(str(t) for t in tags)
    bad = [t for t in names if not t.isidentifier()]
    if bad:
        raise ValueError(f"tag names must be identifiers like 'ring_oriented'; got {bad}")
    return names, np.array([_binary(v, t) for t, v in tags.items()], np.float32)
