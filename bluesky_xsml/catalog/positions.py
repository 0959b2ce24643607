"""Positions of motors a run did not move, read where the run recorded them.

A line scan moves one motor; the others stay where they were. Their
positions are not in the scanned stream's events unless the plan read them,
but a run usually records them elsewhere:

* the ``baseline`` stream, which bluesky's
  :class:`~bluesky.preprocessors.SupplementalData` fills with readings of its
  ``baseline`` devices as the run opens and again as it closes;
* the start document, when the plan's metadata holds the position under the
  motor's name (``RE(plan, sample_y=5.25)``, or a plan's ``md``).

:func:`fixed_positions` reads them from a stored run (a Tiled node), in that
order. The baseline value is the reading taken as the run opened (its first
event): the position during the run, for a motor that stayed put.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["BASELINE", "FixedPosition", "fixed_positions"]

log = logging.getLogger(__name__)

#: Name of the stream that :class:`bluesky.preprocessors.SupplementalData` writes.
BASELINE = "baseline"


class FixedPosition(float):
    """A position (a float) that remembers where it was read and its units.

    >>> p = FixedPosition(5.25, source="baseline", units="mm")
    >>> p + 1, p.source, p.units
    (6.25, 'baseline', 'mm')
    """

    source: str
    units: str | None

    def __new__(cls, value: float, *, source: str, units: str | None = None):
        self = super().__new__(cls, value)
        self.source = source
        self.units = units
        return self


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _baseline(run, names: Sequence[str], run_keys: Sequence[str] | None) -> dict:
    keys = list(run) if run_keys is None else list(run_keys)
    if BASELINE not in keys:
        return {}
    node = run[BASELINE]
    data_keys: Mapping = node.metadata.get("data_keys") or {}
    cols = [n for n in names if n in data_keys and not data_keys[n].get("shape")
            and data_keys[n].get("dtype") in ("number", "integer")]
    if not cols:
        return {}
    base = node.base if hasattr(node, "base") else None
    if base is not None and "internal" in base:
        table = base["internal"].read(columns=["seq_num", *cols])
        first = int(table["seq_num"].to_numpy().argmin())
        values = {c: table[c].iloc[first] for c in cols}
    else:  # a stream node without the internal table: read it whole
        ds = node.read()
        first = int(ds["seq_num"].values.argmin())
        values = {c: ds[c].values[first] for c in cols}
    out = {}
    for c, v in values.items():
        number = _number(v.item() if hasattr(v, "item") else v)
        if number is not None:
            out[c] = FixedPosition(number, source=BASELINE, units=data_keys[c].get("units"))
    return out


def fixed_positions(run, names: Sequence[str], *,
                    run_keys: Sequence[str] | None = None) -> dict[str, FixedPosition]:
    """Positions of ``names`` recorded by ``run`` outside its scanned streams.

    Parameters
    ----------
    run : BlueskyRun
        A Tiled client node of one run.
    names : sequence of str
        Data keys (motor names) to look for.
    run_keys : sequence of str, optional
        The run's stream names when the caller already listed them (saves a
        request).

    Returns
    -------
    dict of str -> FixedPosition
        The names found, each with its value, ``source`` (``"baseline"`` or
        ``"start"``) and ``units`` (from the baseline's data keys; ``None``
        when unknown). A name found in neither place is left out.
    """
    names = [n for n in dict.fromkeys(names) if isinstance(n, str)]
    if not names:
        return {}
    try:
        found = _baseline(run, names, run_keys)
    except (KeyError, ValueError, TypeError) as err:   # a malformed baseline: try the start
        log.warning("run %s: cannot read its baseline stream (%r)",
                    (run.metadata.get("start") or {}).get("uid"), err)
        found = {}
    start = run.metadata.get("start") or {}
    for n in names:
        if n not in found:
            number = _number(start.get(n))
            if number is not None:
                found[n] = FixedPosition(number, source="start")
    return found
