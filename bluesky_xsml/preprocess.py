"""Frame -> model input: masking, block reduction, log scaling, normalisation.

A detector frame of any shape and dtype becomes a ``(C, S, S)`` float32 array
(``C = len(CHANNELS)``, ``S`` the model's input size) in one pass over the
pixels. The frame is centred on a square canvas of side ``S * k`` (``k`` the
integer block size), so the aspect ratio is never distorted; frames smaller
than ``S`` are first enlarged by pixel repetition.

Invalid pixels are masked before anything is summed: NaN and inf, negative
values (Pilatus gaps ``-1`` and bad pixels ``-2``), the unsigned-integer
maximum (Eiger masked pixels ``2**32-1`` / ``2**16-1``) and any extra
``sentinels``. Saturation is recognised as a plateau: at least
``min_plateau`` pixels sharing the frame's maximum valid value (or values at or
above an explicit ``saturation_level``).

A frame from a detector with known calibration can come with a
:class:`~bluesky_xsml.readout.Readout`: it is turned into counts first
(``(raw - offset) / gain`` in float32, one copy), its masked values become NaN
and its saturated pixels are counted in the ``saturated`` channel at the
readout's saturation level (:func:`readout_config`). Without a readout the
frame's values are taken as counts, as they always were.

The channels are

===============  =============================================================
``log_mean``     log1p(mean of valid counts in the block) / LOG_SCALE
                 (absolute: keeps "beam off" and "weak" distinguishable)
``log_max``      log1p(max valid count in the block) / LOG_SCALE
``relative``     log_mean divided by its maximum over the frame (per-frame
                 normalisation)
``invalid``      fraction of the block's detector pixels that are masked
``outside``      fraction of the block that lies outside the detector
``saturated``    fraction of the block's pixels at the saturation plateau
===============  =============================================================

Examples
--------
>>> import numpy as np
>>> from bluesky_xsml.preprocess import PreprocessConfig, preprocess_frame
>>> frame = np.full((64, 100), 5, dtype=np.uint32)
>>> frame[:, 50] = 2**32 - 1             # a masked column
>>> x = preprocess_frame(frame, PreprocessConfig(size=32))
>>> x.shape, x.dtype
((6, 32, 32), dtype('float32'))
>>> bool(x[3].max() > 0)                  # the invalid column is seen
True
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from .errors import FrameError
from .readout import Readout, as_readouts

__all__ = [
    "CHANNELS",
    "LOG_SCALE",
    "PreprocessConfig",
    "frame_layout",
    "preprocess_frame",
    "preprocess_batch",
    "readout_config",
]

CHANNELS: tuple[str, ...] = ("log_mean", "log_max", "relative", "invalid", "outside", "saturated")
#: log1p of a 20-bit counter maximum: puts log_mean/log_max roughly in [0, 1.6].
LOG_SCALE = float(np.log1p(2.0**20))
_MIN_SIDE = 8
_SUPPORTED_KINDS = "biuf"


@dataclass(frozen=True)
class PreprocessConfig:
    """How frames become model inputs; stored in every checkpoint.

    Parameters
    ----------
    size : int
        Side of the square model input, in blocks.
    sentinels : tuple of float
        Extra pixel values to treat as masked, besides NaN/inf, negatives and
        the unsigned-integer maximum.
    saturation_level : float or None
        Counts at or above this are saturated. ``None``: detect the plateau at
        the frame's maximum valid value.
    min_plateau : int
        Pixels that must share the maximum value for it to count as saturation.
    min_saturation_counts : float
        A plateau below this many counts is not saturation (dark frames share
        small maxima by chance).
    """

    size: int = 128
    sentinels: tuple[float, ...] = ()
    saturation_level: float | None = None
    min_plateau: int = 4
    min_saturation_counts: float = 256.0

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 8:
            raise ValueError(f"PreprocessConfig.size must be an int >= 8, got {self.size!r}")
        object.__setattr__(self, "sentinels", tuple(float(s) for s in self.sentinels))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sentinels"] = list(self.sentinels)
        d["channels"] = list(CHANNELS)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        keys = {"size", "sentinels", "saturation_level", "min_plateau", "min_saturation_counts"}
        return cls(**{k: (tuple(v) if k == "sentinels" else v) for k, v in d.items() if k in keys})


def _kernels():
    """The compiled batch kernel (numba is imported on first use).

    Lazy on purpose: ``_kernels`` imports numba, which ``import bluesky_xsml`` must not.
    """
    from ._kernels import prep_many

    return prep_many




#: Float pixels above this are treated as masked: no detector counts that high, and sums of
#: such values would overflow the float32 block accumulators.
MAX_FLOAT_COUNTS = 1e18


def _valid_range(dtype: np.dtype):
    """Inclusive range of valid values, in the frame's own type.

    Negatives and the unsigned-integer maximum (Eiger's masked pixels) are
    outside it; NaN fails both comparisons.
    """
    if dtype.kind == "u":
        return dtype.type(0), dtype.type(np.iinfo(dtype).max - 1)
    if dtype.kind == "i":
        return dtype.type(0), dtype.type(np.iinfo(dtype).max)
    return 0.0, MAX_FLOAT_COUNTS


def _as_frame(frame) -> np.ndarray:
    """Validate one frame and return it as a C-contiguous 2-D array."""
    try:
        arr = np.asarray(frame)
    except Exception as err:  # e.g. ragged nested lists
        raise FrameError(f"frame cannot be read as an array: {err}", reason="bad_frame") from err
    if arr.dtype.kind not in _SUPPORTED_KINDS:
        raise FrameError(
            f"frame dtype {arr.dtype} is not supported; expected unsigned/signed integers, "
            "floats or booleans",
            reason="bad_dtype",
        )
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise FrameError(
            f"a frame must be 2-D (H, W); got shape {arr.shape}. Stacks (N, H, W) are split "
            "into frames by the caller (Tagger.predict accepts them).",
            reason="bad_shape",
        )
    if min(arr.shape) < _MIN_SIDE:
        raise FrameError(
            f"frame of shape {arr.shape} is too small: both sides must be >= {_MIN_SIDE} pixels",
            reason="bad_shape",
        )
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    elif arr.dtype.kind == "f" and arr.dtype.itemsize > 8:
        arr = arr.astype(np.float64)
    elif arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return np.ascontiguousarray(arr)


def frame_layout(shape: tuple[int, int], size: int) -> tuple[int, int, int]:
    """Block size and offsets that centre an ``(H, W)`` frame on the ``S*k`` canvas.

    Returns ``(k, offset_y, offset_x)``: each ``k x k`` block of the canvas is one
    input pixel (:mod:`bluesky_xsml.polar` maps beam centres with it).

    >>> frame_layout((256, 300), 128)
    (3, 64, 42)
    """
    H, W = shape
    k = max(1, math.ceil(max(H, W) / size))
    return k, (size * k - H) // 2, (size * k - W) // 2


_layout = frame_layout  # its name before it was public


def _prepared(frame, config: PreprocessConfig, readout: Readout | None = None) -> np.ndarray:
    """Validated, native-order 2-D frame; in counts with a readout; small frames enlarged;
    sentinels applied."""
    arr = _as_frame(frame)
    if readout is not None:  # counts in one float32 copy; sentinels are raw values
        arr = readout.apply(arr, config.sentinels)
    S = config.size
    if max(arr.shape) < S:  # enlarge small frames by whole-pixel repetition
        rep = S // max(arr.shape)
        if rep > 1:
            arr = np.repeat(np.repeat(arr, rep, axis=0), rep, axis=1)
    if config.sentinels and readout is None:  # rare: extra sentinels become NaN in a float copy
        # Matched in the frame's own values (a float32 copy would round 2**24 + 1 onto
        # 2**24), and an integer frame's own masked values (the unsigned maximum,
        # negatives) are marked too: the float copy's valid range no longer knows them.
        masked = np.isin(arr, np.asarray(config.sentinels, np.float64))
        if arr.dtype.kind in "iu":
            lo, hi = _valid_range(arr.dtype)
            masked |= (arr < lo) | (arr > hi)
        arr = arr.astype(np.float64 if arr.dtype.itemsize > 4 else np.float32)
        arr[masked] = np.nan
    return arr


def readout_config(config: PreprocessConfig, readout: Readout | None) -> PreprocessConfig:
    """The rules for a frame converted by ``readout``.

    A readout that says where saturation is (``saturated_value``) sets the
    saturation level (its :attr:`~bluesky_xsml.readout.Readout.saturation_level`
    in counts) and drops the minimum plateau counts: every pixel the readout
    calls saturated is counted in the ``saturated`` channel. Otherwise
    ``config`` is unchanged.

    >>> from bluesky_xsml.readout import Readout
    >>> readout_config(PreprocessConfig(), Readout(gain=2, saturated_value=65535)).saturation_level
    32767.5
    """
    level = None if readout is None else readout.saturation_level
    if level is None:
        return config
    return replace(config, saturation_level=level, min_saturation_counts=0.0)


#: Serialises the first kernel call per dtype in this process (see :func:`_run_group`).
_FIRST_USE_LOCK = threading.Lock()
_warm_dtypes: set[str] = set()


def _run_group(frames: list[np.ndarray], config: PreprocessConfig, out: np.ndarray) -> None:
    """Preprocess same-dtype frames into ``out`` with one GIL-free kernel call.

    The first call per dtype in a process runs under a lock. That call makes
    numba load its extensions (``numba.core.entrypoints.init_all``, which
    registers new ``typeof`` implementations) and compile the ``numba.typed.List``
    internals, neither of which the on-disk cache covers; numba does the first
    outside any lock of its own, so another thread typing arguments meanwhile
    failed with ``RuntimeError: dictionary changed size during iteration``.
    Later calls take no lock.
    """
    key = frames[0].dtype.str
    if key in _warm_dtypes:
        _call_kernel(frames, config, out)
        return
    with _FIRST_USE_LOCK:
        _call_kernel(frames, config, out)
        _warm_dtypes.add(key)


def _call_kernel(frames: list[np.ndarray], config: PreprocessConfig, out: np.ndarray) -> None:
    from numba.typed import List

    prep_many = _kernels()
    dtype = frames[0].dtype
    lo, hi = _valid_range(dtype)
    layouts = np.array([frame_layout(f.shape, config.size) for f in frames], np.int64)
    cast = dtype.type if dtype.kind in "iu" else float
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        level = config.saturation_level if config.saturation_level is not None else 0.0
        sat_level = cast(min(max(math.ceil(level), info.min), info.max))
    else:
        sat_level = float(config.saturation_level or 0.0)
    typed = List(frames)
    prep_many(typed, layouts[:, 0], layouts[:, 1], layouts[:, 2], lo, hi,
              sat_level, config.saturation_level is not None, int(config.min_plateau),
              float(config.min_saturation_counts), LOG_SCALE, out)


def preprocess_frame(frame, config: PreprocessConfig = PreprocessConfig(), *,
                     readout: Readout | None = None) -> np.ndarray:
    """Turn one detector frame into a ``(len(CHANNELS), S, S)`` float32 input.

    Parameters
    ----------
    frame : array_like
        A 2-D frame (a leading axis of length 1 is dropped) of any integer,
        float or boolean dtype, with any sentinel values.
    config : PreprocessConfig
        Input size and masking rules.
    readout : Readout or dict, optional
        The detector's calibration: the frame is turned into counts first
        (:meth:`~bluesky_xsml.readout.Readout.apply`). Without one the frame's
        values are taken as counts.

    Returns
    -------
    numpy.ndarray
        Finite float32 array of shape ``(6, config.size, config.size)``.

    Raises
    ------
    FrameError
        If the frame is not 2-D, is smaller than 8 pixels on a side, or has a
        dtype that holds no counts (strings, objects, complex).
    """
    if readout is not None:
        (readout,) = as_readouts(readout, 1)  # a dict of its fields too
    arr = _prepared(frame, config, readout)
    out = np.empty((1, len(CHANNELS), config.size, config.size), np.float32)
    _run_group([arr], readout_config(config, readout), out)
    return out[0]


def preprocess_batch(frames, config: PreprocessConfig = PreprocessConfig(), *, pool=None,
                     readouts: Readout | Sequence[Readout | None] | None = None):
    """Preprocess many frames; bad frames are reported, not raised.

    Frames are grouped by dtype and each group is reduced by one kernel call
    that does not hold the GIL (split across ``pool`` when given), so a busy
    RunEngine thread and the preprocessing do not wait on each other.

    Parameters
    ----------
    frames : sequence of array_like
        2-D frames, shapes and dtypes may differ.
    config : PreprocessConfig
    pool : concurrent.futures.Executor, optional
        Splits large groups across its threads.
    readouts : Readout or sequence of (Readout or None), optional
        The detectors' calibration, for all frames or per frame (``None``: the
        frame's values are counts); see :func:`preprocess_frame`.

    Returns
    -------
    inputs : numpy.ndarray
        ``(M, C, S, S)`` float32 for the ``M`` frames that could be used.
    ok : list of int
        Index in ``frames`` of each row of ``inputs``.
    errors : dict of int -> FrameError
        Frames that could not be used, by index.

    Raises
    ------
    ConfigurationError
        If ``readouts`` is malformed or not one per frame.
    """
    frames = list(frames)
    per_frame = as_readouts(readouts, len(frames)) or [None] * len(frames)
    prepared: dict[int, np.ndarray] = {}
    configs: dict[int, PreprocessConfig] = {}
    errors: dict[int, FrameError] = {}
    for i, f in enumerate(frames):
        try:
            prepared[i] = _prepared(f, config, per_frame[i])
            configs[i] = readout_config(config, per_frame[i])
        except FrameError as err:
            errors[i] = err
        except Exception as err:  # noqa: BLE001 - any other failure is still a recorded skip
            errors[i] = FrameError(f"preprocessing failed: {type(err).__name__}: {err}",
                                   reason="preprocess_error")
    ok = sorted(prepared)
    S = config.size
    inputs = np.empty((len(ok), len(CHANNELS), S, S), np.float32)
    groups: dict[tuple, list[int]] = {}  # one kernel call per dtype and saturation rule
    for row, i in enumerate(ok):
        groups.setdefault((prepared[i].dtype, configs[i]), []).append(row)
    tasks = []
    for (_, group_config), rows in groups.items():
        n_parts = 1 if pool is None else min(len(rows), getattr(pool, "_max_workers", 1))
        for part in np.array_split(np.asarray(rows), max(1, n_parts)):
            if len(part):
                tasks.append((part, group_config))

    def run(task):
        part, group_config = task
        sub = np.empty((len(part), len(CHANNELS), S, S), np.float32)
        _run_group([prepared[ok[r]] for r in part], group_config, sub)
        inputs[part] = sub

    if pool is not None and len(tasks) > 1:
        for fut in [pool.submit(run, task) for task in tasks]:
            fut.result()
    else:
        for task in tasks:
            run(task)
    return inputs, ok, errors
