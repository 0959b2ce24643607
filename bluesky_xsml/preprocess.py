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
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import FrameError

__all__ = [
    "CHANNELS",
    "LOG_SCALE",
    "PreprocessConfig",
    "preprocess_frame",
    "preprocess_batch",
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
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        keys = {"size", "sentinels", "saturation_level", "min_plateau", "min_saturation_counts"}
        return cls(**{k: (tuple(v) if k == "sentinels" else v) for k, v in d.items() if k in keys})


def _kernels():
    """Compile (once, cached on disk) the numba kernels."""
    global _reduce, _plateau
    if _reduce is not None:
        return _reduce, _plateau
    import numba

    @numba.njit(nogil=True, boundscheck=False, cache=True)
    def reduce_blocks(x, k, off_i, off_j, lo, hi, out_sum, out_cnt, out_max):
        # One pass over the frame: per k x k block, sum / count / max of valid pixels.
        # Rows are accumulated per column in float32 (branch-free, vectorised), then
        # folded into blocks once per block row.
        H, W = x.shape
        acc_s = np.zeros(W, np.float32)
        acc_c = np.zeros(W, np.int32)
        acc_m = np.zeros(W, np.float32)
        zero = np.float32(0.0)
        for i in range(H):
            row = x[i]
            for j in range(W):
                v = row[j]
                ok = (v >= lo) & (v <= hi)  # False for NaN
                fv = np.float32(v) if ok else zero
                acc_s[j] += fv
                acc_c[j] += ok
                acc_m[j] = max(acc_m[j], fv)
            bi = (i + off_i) // k
            if i == H - 1 or (i + 1 + off_i) // k != bi:
                for j in range(W):
                    bj = (j + off_j) // k
                    out_sum[bi, bj] += acc_s[j]
                    out_cnt[bi, bj] += acc_c[j]
                    if acc_m[j] > out_max[bi, bj]:
                        out_max[bi, bj] = acc_m[j]
                    acc_s[j] = zero
                    acc_c[j] = 0
                    acc_m[j] = zero

    @numba.njit(nogil=True, boundscheck=False, cache=True)
    def plateau_counts(x, k, off_i, off_j, level, hit_blocks, out_sat):
        # Count pixels >= level, only inside the blocks whose max reached it.
        H, W = x.shape
        total = 0
        for n in range(hit_blocks.shape[0]):
            bi = hit_blocks[n, 0]
            bj = hit_blocks[n, 1]
            i0 = max(0, bi * k - off_i)
            i1 = min(H, (bi + 1) * k - off_i)
            j0 = max(0, bj * k - off_j)
            j1 = min(W, (bj + 1) * k - off_j)
            c = 0
            for i in range(i0, i1):
                for j in range(j0, j1):
                    v = x[i, j]
                    if v >= level:
                        c += 1
            out_sat[bi, bj] = c
            total += c
        return total

    _reduce, _plateau = reduce_blocks, plateau_counts
    return _reduce, _plateau


_reduce = None
_plateau = None


def _valid_range(dtype: np.dtype) -> tuple[float, float]:
    """Inclusive range of valid values: negatives and the unsigned max are masked."""
    if dtype.kind == "u":
        return 0.0, float(np.iinfo(dtype).max - 1)
    if dtype.kind == "i":
        return 0.0, float(np.iinfo(dtype).max)
    if dtype.kind == "b":
        return 0.0, 1.0
    return 0.0, float(np.finfo(np.float64).max)  # excludes inf; NaN fails both tests


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


def preprocess_frame(frame, config: PreprocessConfig = PreprocessConfig()) -> np.ndarray:
    """Turn one detector frame into a ``(len(CHANNELS), S, S)`` float32 input.

    Parameters
    ----------
    frame : array_like
        A 2-D frame (a leading axis of length 1 is dropped) of any integer,
        float or boolean dtype, with any sentinel values.
    config : PreprocessConfig
        Input size and masking rules.

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
    arr = _as_frame(frame)
    S = config.size
    H, W = arr.shape
    if max(H, W) < S:  # enlarge small frames by whole-pixel repetition
        rep = S // max(H, W)
        if rep > 1:
            arr = np.repeat(np.repeat(arr, rep, axis=0), rep, axis=1)
            H, W = arr.shape
    k = max(1, math.ceil(max(H, W) / S))
    off_i = (S * k - H) // 2
    off_j = (S * k - W) // 2

    reduce_blocks, plateau_counts = _kernels()
    if config.sentinels:  # rare: extra sentinels become NaN in a float copy
        arr = arr.astype(np.float64 if arr.dtype.itemsize > 4 else np.float32)
        arr[np.isin(arr, np.asarray(config.sentinels, arr.dtype))] = np.nan
    lo, hi = _valid_range(arr.dtype)
    out_sum = np.zeros((S, S), np.float64)
    out_cnt = np.zeros((S, S), np.int64)
    out_max = np.zeros((S, S), np.float64)
    lo_t = arr.dtype.type(lo) if arr.dtype.kind in "iu" else lo
    hi_t = arr.dtype.type(hi) if arr.dtype.kind in "iu" else hi
    reduce_blocks(arr, k, off_i, off_j, lo_t, hi_t, out_sum, out_cnt, out_max)

    # Geometric coverage of each block by detector pixels (outside = padding).
    rows = np.clip(np.minimum((np.arange(S) + 1) * k - off_i, H) - np.maximum(np.arange(S) * k - off_i, 0), 0, None)
    cols = np.clip(np.minimum((np.arange(S) + 1) * k - off_j, W) - np.maximum(np.arange(S) * k - off_j, 0), 0, None)
    cover = np.outer(rows, cols).astype(np.float64)

    mean = np.divide(out_sum, out_cnt, out=np.zeros_like(out_sum), where=out_cnt > 0)
    x = np.empty((len(CHANNELS), S, S), np.float32)
    x[0] = np.log1p(mean) / LOG_SCALE
    x[1] = np.log1p(out_max) / LOG_SCALE
    peak = float(x[0].max())
    x[2] = x[0] / peak if peak > 0 else 0.0
    x[3] = np.divide(cover - out_cnt, cover, out=np.zeros_like(cover), where=cover > 0)
    x[4] = 1.0 - cover / float(k * k)

    # Saturation: a plateau of pixels at the maximum valid value.
    vmax = float(out_max.max()) if out_cnt.any() else 0.0
    level = config.saturation_level if config.saturation_level is not None else vmax
    sat = np.zeros((S, S), np.int64)
    if vmax >= max(level, config.min_saturation_counts) and vmax > 0:
        hit = np.argwhere(out_max >= level).astype(np.int64)
        level_t = arr.dtype.type(level) if arr.dtype.kind in "iu" else level
        total = plateau_counts(arr, k, off_i, off_j, level_t, hit, sat)
        if config.saturation_level is None and total < config.min_plateau:
            sat[:] = 0
    x[5] = np.divide(sat, cover, out=np.zeros_like(cover), where=cover > 0)
    return x


def preprocess_batch(frames, config: PreprocessConfig = PreprocessConfig(), *, pool=None):
    """Preprocess many frames; bad frames are reported, not raised.

    Parameters
    ----------
    frames : sequence of array_like
        2-D frames, shapes and dtypes may differ.
    config : PreprocessConfig
    pool : concurrent.futures.Executor, optional
        Runs frames in parallel; the numba kernel releases the GIL.

    Returns
    -------
    inputs : numpy.ndarray
        ``(M, C, S, S)`` float32 for the ``M`` frames that could be used.
    ok : list of int
        Index in ``frames`` of each row of ``inputs``.
    errors : dict of int -> FrameError
        Frames that could not be used, by index.
    """
    frames = list(frames)

    def one(i):
        try:
            return i, preprocess_frame(frames[i], config), None
        except FrameError as err:
            return i, None, err
        except Exception as err:  # any other failure is still a recorded skip
            return i, None, FrameError(f"preprocessing failed: {type(err).__name__}: {err}",
                                       reason="preprocess_error")

    results = list(pool.map(one, range(len(frames)))) if pool is not None and len(frames) > 1 \
        else [one(i) for i in range(len(frames))]
    ok = [i for i, x, _ in results if x is not None]
    errors = {i: e for i, _, e in results if e is not None}
    S = config.size
    inputs = np.stack([x for _, x, _ in results if x is not None]) if ok else \
        np.zeros((0, len(CHANNELS), S, S), np.float32)
    return inputs, ok, errors
