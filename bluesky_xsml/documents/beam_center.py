"""The beam centre setting: where the direct beam hits the detector, in pixels.

Read from :class:`~bluesky_xsml.documents.callback.TaggingCallback`'s
``beam_center`` option, from a run's start document (``xsml_beam_center``) and
by re-tagging of stored runs (:mod:`bluesky_xsml.catalog.append`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["parse_beam_center"]


def parse_beam_center(value, what: str = "xsml_beam_center") -> dict:
    """Read a beam centre setting: ``[x, y]`` for every image key, or ``{key: [x, y]}``.

    Returns a dict of image key (``"*"``: any) to an ``(x, y)`` pair of floats
    (detector pixels, column then row; off the detector is allowed). ``None``
    gives an empty dict.

    Raises
    ------
    ValueError
        If the value is neither form or holds non-finite numbers.

    Examples
    --------
    >>> parse_beam_center([512, 300.5])
    {'*': (512.0, 300.5)}
    >>> parse_beam_center({"pilatus_image": [10, -40]})
    {'pilatus_image': (10.0, -40.0)}
    """
    if value is None:
        return {}
    items = value.items() if isinstance(value, Mapping) else [("*", value)]
    out = {}
    for key, pair in items:
        try:
            x, y = (float(v) for v in pair)
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be [x, y] in detector pixels or {{image key: [x, y]}}; "
                             f"got {value!r}") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ValueError(f"{what} must hold finite numbers; got {value!r}")
        out[str(key)] = (x, y)
    return out
