"""A detector's readout: its calibration, and what its special pixel values mean.

A frame from a detector with known calibration can be described by a
:class:`Readout` so that its pixels become photon counts before preprocessing:
``counts = (raw - offset) / gain``. The readout also says what a special raw
value means, which the pixels alone cannot: a 16-bit CCD reads 65535 where it
saturated, an Eiger writes ``2**n - 1`` where a pixel is masked.

A run gives its readout in its start document (``xsml_readout``), a beamline
in :class:`~bluesky_xsml.documents.callback.TaggingCallback`'s ``readout``
option, a script in :meth:`~bluesky_xsml.inference.tagger.Tagger.predict`'s
``readout``. Two forms, as for the beam centre: one readout for every image
key, or ``{image key: readout}``:

>>> parse_readouts({"gain": 2.5, "offset": 100, "saturated_value": 65535})["*"].to_dict()
... # doctest: +NORMALIZE_WHITESPACE
{'gain': 2.5, 'offset': 100.0, 'read_noise': None, 'saturated_value': 65535.0,
 'masked_values': [], 'kind': None}
>>> sorted(parse_readouts({"ccd": {"gain": 2.5}, "eiger": {"masked_values": [4294967295]}}))
['ccd', 'eiger']

How a frame is converted (:meth:`Readout.apply`), in float32 and into one new array:

* **masked** (NaN, so preprocessing counts them in its ``invalid`` channel):
  NaN and inf; any of ``masked_values`` (and the preprocessing's extra
  ``sentinels``); negative raw values of integer frames (gap and bad-pixel
  codes such as Pilatus' -1 and -2; an ADC reads no negative numbers); and the
  unsigned-integer maximum unless ``saturated_value`` says it is saturation
  (without a readout that maximum is masked, so it stays masked unless told
  otherwise). A masked value wins over saturation.
* **saturated**: raw values at or above ``saturated_value``. They are set to
  :attr:`Readout.saturation_level` (``(saturated_value - offset) / gain``) and
  preprocessing counts every pixel at that level in its ``saturated`` channel,
  however few there are and however low the level in counts.
* everything else: ``(raw - offset) / gain``; values below zero (read noise
  around the pedestal, or the noise of a float frame whose pedestal is
  already subtracted) become 0.

This module is plain numpy, below :mod:`bluesky_xsml.preprocess` (which applies
it) and the document side (which reads it from start documents).
"""

from __future__ import annotations

import collections
import json
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from .errors import ConfigurationError

__all__ = ["KINDS", "Readout", "as_readouts", "parse_readouts", "readout_option",
           "run_readouts"]

#: What ``Readout.kind`` may say (informational: the conversion is the same).
KINDS = ("counting", "integrating")


def _bad(what: str, name: str, need: str, value: Any) -> ConfigurationError:
    return ConfigurationError(f"{what}: {name} must be {need}, got {value!r}")


def _number(what: str, name: str, value: Any) -> float:
    """``value`` as a finite float (bools refused)."""
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        out = math.nan
    if isinstance(value, bool) or not math.isfinite(out):
        raise _bad(what, name, "a finite number", value)
    return out


@dataclass(frozen=True)
class Readout:
    """How a detector's raw values (ADU) become photon counts, and what its sentinels mean.

    Parameters
    ----------
    gain : float
        ADU per photon (``> 0``). 1 for a photon-counting detector.
    offset : float
        Pedestal (dark level) in ADU, subtracted before dividing by ``gain``.
    read_noise : float or None
        Read noise in ADU rms (``>= 0``); recorded, not used in the conversion.
    saturated_value : float or None
        Raw values at or above this are saturated (e.g. 65535 for a 16-bit
        CCD). Must lie above ``offset``. ``None``: saturation is found by
        preprocessing's plateau rule, as without a readout.
    masked_values : tuple of float
        Raw values that mark masked pixels (e.g. ``2**32 - 1`` on an Eiger).
    kind : {"counting", "integrating"} or None
        What kind of detector it is; recorded, not used in the conversion.

    Raises
    ------
    ConfigurationError
        A ``ValueError`` naming the bad field and value.

    Examples
    --------
    >>> import numpy as np
    >>> ccd = Readout(gain=2.0, offset=10, saturated_value=65535)
    >>> ccd.apply(np.array([[10, 30, 65535, 4]], np.uint16)).tolist()
    [[0.0, 10.0, 32762.5, 0.0]]
    >>> Readout(masked_values=[65535]).apply(np.array([[7, 65535]], np.uint16))
    array([[ 7., nan]], dtype=float32)
    """

    gain: float = 1.0
    offset: float = 0.0
    read_noise: float | None = None
    saturated_value: float | None = None
    masked_values: tuple[float, ...] = ()
    kind: str | None = None

    def __post_init__(self) -> None:
        self._check("readout")

    def _check(self, what: str) -> None:
        gain = _number(what, "gain", self.gain)
        if gain <= 0:
            raise _bad(what, "gain", "> 0 (ADU per photon)", self.gain)
        offset = _number(what, "offset", self.offset)
        noise = self.read_noise
        if noise is not None:
            noise = _number(what, "read_noise", noise)
            if noise < 0:
                raise _bad(what, "read_noise", ">= 0 (ADU rms)", self.read_noise)
        sat = self.saturated_value
        if sat is not None:
            sat = _number(what, "saturated_value", sat)
            if sat <= offset:
                raise _bad(what, "saturated_value", f"above offset ({offset:g} ADU)",
                           self.saturated_value)
        masked = self.masked_values
        if isinstance(masked, (str, bytes)) or not isinstance(masked, (Sequence, np.ndarray)):
            masked = [masked]
        masked = tuple(_number(what, "masked_values", v) for v in masked)
        if sat is not None and sat in masked:
            raise _bad(what, "saturated_value", "different from every masked value", sat)
        if self.kind is not None and self.kind not in KINDS:
            raise _bad(what, "kind", f"one of {list(KINDS)} or None", self.kind)
        for name, value in (("gain", gain), ("offset", offset), ("read_noise", noise),
                            ("saturated_value", sat), ("masked_values", masked)):
            object.__setattr__(self, name, value)

    @classmethod
    def from_metadata(cls, value: Mapping[str, Any], what: str = "xsml_readout") -> Readout:
        """A readout from a JSON-like mapping (a start document's ``xsml_readout``).

        ``masked_values`` may be one number or a list. ``what`` names the
        value in error messages.

        Raises
        ------
        ConfigurationError
            If ``value`` is not a mapping, has a key that is not a field, or a
            field has a bad value; the message names ``what`` and the key.

        Examples
        --------
        >>> Readout.from_metadata({"gain": 0})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        bluesky_xsml.errors.ConfigurationError: xsml_readout: gain must be > 0 ..., got 0
        >>> Readout.from_metadata({"gian": 2})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        bluesky_xsml.errors.ConfigurationError: xsml_readout: unknown key 'gian'; the keys are ...
        """
        if isinstance(value, Readout):
            return value
        if not isinstance(value, Mapping):
            raise ConfigurationError(f"{what} must be a mapping of readout fields "
                                     f"({', '.join(_FIELDS)}), got {value!r}")
        for key in value:
            if key not in _FIELDS:
                raise ConfigurationError(f"{what}: unknown key {key!r}; the keys are "
                                         f"{', '.join(_FIELDS)}")
        out = object.__new__(cls)  # checked once, with ``what`` in the messages
        for name in _FIELDS:
            object.__setattr__(out, name, value.get(name, _DEFAULTS[name]))
        out._check(what)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The readout as JSON-safe plain types (:meth:`from_metadata` reads it back)."""
        return {"gain": self.gain, "offset": self.offset, "read_noise": self.read_noise,
                "saturated_value": self.saturated_value,
                "masked_values": list(self.masked_values), "kind": self.kind}

    @property
    def saturation_level(self) -> float | None:
        """Where saturated pixels sit in counts (float32 arithmetic), or None.

        >>> Readout(gain=4, offset=35, saturated_value=65535).saturation_level
        16375.0
        """
        if self.saturated_value is None:
            return None
        return float(_to_counts(np.float32(self.saturated_value), self))

    def apply(self, frame: np.ndarray, extra_masked: Sequence[float] = ()) -> np.ndarray:
        """Counts of a 2-D (or any-shape) numeric frame, as a new float32 array.

        Masked pixels are NaN, saturated ones :attr:`saturation_level`, the
        rest ``max(0, (raw - offset) / gain)`` (see the module's docstring).
        ``extra_masked`` are more raw values to mask (preprocessing's
        ``sentinels``). The frame is read, never changed.
        """
        raw = np.asarray(frame)
        if raw.dtype.kind == "b":
            raw = raw.view(np.uint8)
        out = _to_counts(raw, self)
        level = self.saturation_level
        if level is None:
            np.maximum(out, np.float32(0.0), out=out)  # NaN stays NaN
        else:
            # raw >= saturated_value are the counts >= level (the conversion is monotonic):
            # clipping there puts every saturated pixel at the level, in the same pass
            np.clip(out, np.float32(0.0), np.float32(level), out=out)
        masked = None
        kind = raw.dtype.kind
        if kind == "f":
            masked = ~np.isfinite(raw)
        elif kind == "i":
            masked = raw < 0
        elif kind == "u":
            top = np.iinfo(raw.dtype).max
            if self.saturated_value is None or self.saturated_value > top:
                masked = raw == top
        for v in (*self.masked_values, *(float(s) for s in extra_masked)):
            hit = raw == v
            masked = hit if masked is None else np.logical_or(masked, hit, out=masked)
        if masked is not None:
            np.copyto(out, np.float32(np.nan), where=masked)
        return out


_FIELDS = tuple(f.name for f in fields(Readout))
_DEFAULTS = {f.name: f.default for f in fields(Readout)}


def _to_counts(raw, readout: Readout):
    """``(raw - offset) / gain`` in float32: a new array (a float32 scalar for a scalar)."""
    out = np.subtract(raw, np.float32(readout.offset), dtype=np.float32)
    return np.divide(out, np.float32(readout.gain), out=out if isinstance(out, np.ndarray)
                     else None, dtype=np.float32)


def parse_readouts(value: Any, what: str = "xsml_readout") -> dict[str, Readout]:
    """Read a readout setting: one readout for every image key, or ``{key: readout}``.

    A mapping whose keys include a readout field (``gain``, ``offset``, ...)
    is one readout (``"*"``: any key); a mapping of mappings is one readout
    per image key. ``None`` or an empty mapping gives an empty dict.

    Raises
    ------
    ConfigurationError
        A ``ValueError`` naming ``what``, the image key where there is one,
        and the bad field.
    """
    if value is None:
        return {}
    if isinstance(value, Readout):
        return {"*": value}
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{what} must be a mapping of readout fields "
                                 f"({', '.join(_FIELDS)}) or {{image key: readout}}, "
                                 f"got {value!r}")
    if any(key in _FIELDS for key in value):
        return {"*": Readout.from_metadata(value, what)}
    return {str(key): Readout.from_metadata(item, f"{what}[{key!r}]")
            for key, item in value.items()}


def readout_option(text: str, what: str = "--readout") -> dict[str, Readout]:
    """A command line's readout option (JSON) as :func:`parse_readouts` reads it.

    ``xsml serve``, ``xsml worker`` and ``xsml retag`` take ``--readout JSON``
    through this, so the three read it alike: one readout, or
    ``{image key: readout}``.

    Raises
    ------
    ConfigurationError
        If ``text`` is not JSON or not a readout; the message names ``what``.

    >>> readout_option('{"gain": 3.6, "offset": 100}')["*"].gain
    3.6
    >>> readout_option("gain=3.6")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    bluesky_xsml.errors.ConfigurationError: --readout must be JSON, e.g. ...: Expecting value: ...
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigurationError(f"{what} must be JSON, e.g. '{{\"gain\": 3.6}}': {err}") from err
    return parse_readouts(value, what)


def run_readouts(start: Mapping[str, Any], default: Mapping[str, Readout] | None = None
                 ) -> tuple[dict[str, Readout], str]:
    """The readouts live tagging converts a run's frames with, and why not if it cannot.

    The start document's ``xsml_readout`` wins over ``default`` (the
    beamline's, :class:`~bluesky_xsml.documents.callback.TaggingCallback`'s
    ``readout`` option). A malformed one gives no readout at all (the frames
    are taken as counts) and the error's message, never an exception: a start
    document must not stop a run from being tagged.

    >>> run_readouts({"xsml_readout": {"gain": -1}}, {"*": Readout(gain=2)})
    ({}, 'xsml_readout: gain must be > 0 (ADU per photon), got -1')
    >>> run_readouts({}, {"*": Readout(gain=2)})[0]["*"].gain
    2.0
    """
    try:
        own = parse_readouts(start.get("xsml_readout"))
    except ValueError as err:
        return {}, str(err)
    return (own or dict(default or {})), ""


def as_readouts(readout: Any, n: int) -> list[Readout | None] | None:
    """``readout`` as one entry per frame (``None``: no readout for any).

    Parameters
    ----------
    readout : Readout, mapping, sequence of (Readout, mapping or None), or None
        One readout for all ``n`` frames, or one per frame.
    n : int
        Number of frames.

    Raises
    ------
    ConfigurationError
        If a readout is malformed or a sequence's length is not ``n``.
    """
    if readout is None:
        return None
    if isinstance(readout, (Readout, Mapping)):
        one = Readout.from_metadata(readout, "readout")
        return [one] * n
    items = list(readout)
    if len(items) != n:
        raise ConfigurationError(f"readout must be one readout or one per frame ({n}); "
                                 f"got {len(items)}")
    out = [None if r is None else Readout.from_metadata(r, f"readout[{i}]")
           for i, r in enumerate(items)]
    return None if all(r is None for r in out) else out


class RunReadoutCache:
    """Each run's readouts, converted once per run and image key instead of once per frame.

    The RunEngine's process turns a :class:`Readout` into the plain dict that crosses the
    pipe (``convert=Readout.to_dict``), the tagging process checks that dict back into a
    :class:`Readout` (:func:`Readout.from_metadata`); both keep the result here. A value that
    is not the cached one (never expected within a run) is converted again; a value whose
    conversion raises is not cached and raises every time. A run is dropped by
    :meth:`forget` (its stop went out); at most ``max_runs`` are kept, the least recently
    used going first, so the late frames of a run forgotten early cannot make it grow.
    Cached results are shared by the run's frames and must not be changed. Thread-safe.

    Parameters
    ----------
    convert : callable
        ``value -> converted``.
    max_runs : int
        Runs kept at most.
    """

    def __init__(self, convert: Callable[[Any], Any], max_runs: int = 64) -> None:
        self.convert = convert
        self.max_runs = int(max_runs)
        self.runs: collections.OrderedDict[str, dict[str, tuple[Any, Any]]] = \
            collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, run_uid: str, key: str, value: Any) -> Any:
        """``convert(value)``, from the cache when the run's ``key`` had ``value`` before."""
        with self._lock:
            run = self.runs.get(run_uid)
            if run is not None:
                self.runs.move_to_end(run_uid)
                hit = run.get(key)
                if hit is not None and (hit[0] is value or hit[0] == value):
                    return hit[1]
            converted = self.convert(value)
            if run is None:
                run = self.runs[run_uid] = {}
                while len(self.runs) > self.max_runs:
                    self.runs.popitem(last=False)
            run[key] = (value, converted)
            return converted

    def forget(self, run_uid: str) -> None:
        """Drop the run's readouts (its stop went out)."""
        with self._lock:
            self.runs.pop(run_uid, None)
