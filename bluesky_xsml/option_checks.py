"""Checks shared by the option objects (``CallbackOptions``, ``FineTuneConfig``, ...).

Each raises :class:`~bluesky_xsml.errors.ConfigurationError` (a ``ValueError``)
worded ``"<what> option <name> must be <need>, got <value>"``, so that every
option object names the bad option the same way.

Examples
--------
>>> integer("callback", "max_batch", 4.0, 1)
4
>>> number("fine-tuning", "lr", 0, 0.0, open_low=True)
Traceback (most recent call last):
...
bluesky_xsml.errors.ConfigurationError: fine-tuning option lr must be > 0.0, got 0
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from .errors import ConfigurationError

__all__ = ["bad", "integer", "number", "with_keywords"]


def bad(what: str, name: str, need: str, value: Any) -> ConfigurationError:
    """The error for option ``name`` of ``what`` that is not ``need``."""
    return ConfigurationError(f"{what} option {name} must be {need}, got {value!r}")


def integer(what: str, name: str, value: Any, low: int) -> int:
    """``value`` as an int (numpy integers and whole floats too) that is at least ``low``."""
    try:
        result = int(value)
        whole = not isinstance(value, bool) and float(value) == result
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole or result < low:
        raise bad(what, name, f"an integer >= {low}", value)
    return result


def number(what: str, name: str, value: Any, low: float | None = None,
           high: float | None = None, *, open_low: bool = False, open_high: bool = False
           ) -> float:
    """``value`` as a finite float within the bounds (``open_*``: the bound excluded)."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        result = math.nan
    if isinstance(value, bool) or not math.isfinite(result):
        raise bad(what, name, "a finite number", value)
    if low is not None and (result < low or (open_low and result == low)):
        raise bad(what, name, f"{'>' if open_low else '>='} {low}", value)
    if high is not None and (result > high or (open_high and result == high)):
        raise bad(what, name, f"{'<' if open_high else '<='} {high}", value)
    return result


def with_keywords(cls: type, base: Any, keywords: Mapping[str, Any], caller: str,
                  argument: str = "config") -> Any:
    """``base`` (a ``cls`` dataclass; ``None``: the defaults) with ``keywords`` replaced.

    An unknown keyword raises ``TypeError`` naming the options, as a call with
    an unexpected keyword argument does; ``dataclasses.replace`` checks the
    new values again.
    """
    start = cls() if base is None else base
    if not isinstance(start, cls):
        raise ConfigurationError(f"{argument} must be a {cls.__name__}, got "
                                 f"{type(base).__name__}")
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(keywords) - set(fields))
    if unknown:
        raise TypeError(f"{caller} got unexpected keyword arguments {unknown}; its options are "
                        f"{fields}")
    return dataclasses.replace(start, **keywords) if keywords else start
