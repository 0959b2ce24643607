"""The preprocessing's documented rules, each on a small frame with a known answer.

Which pixel values count (per dtype), the extra sentinels, which frames are refused and how,
how a frame is placed on the square canvas, small frames enlarged, the saturation plateau and
an explicit saturation level, batches with bad frames and a pool, and the first-use lock.
Pure numpy and the numba kernel: the whole file runs in seconds (the mutation group
``preprocess`` runs it for every mutant of ``bluesky_xsml/preprocess.py``).
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import Executor, Future, ThreadPoolExecutor

import numpy as np
import pytest

from bluesky_xsml import preprocess
from bluesky_xsml.errors import FrameError
from bluesky_xsml.preprocess import (
    CHANNELS,
    LOG_SCALE,
    PreprocessConfig,
    frame_layout,
    preprocess_batch,
    preprocess_frame,
)

CFG = PreprocessConfig(size=32)


def ch(x: np.ndarray, name: str) -> np.ndarray:
    return x[CHANNELS.index(name)]


def log_of(v: float) -> np.float32:
    """The log channels' value for ``v`` counts."""
    return np.float32(np.log1p(np.float32(v)) * np.float32(1.0 / LOG_SCALE))


# ------------------------------------------------------------------ the configuration
def test_config_defaults_checks_and_round_trip():
    assert CHANNELS == ("log_mean", "log_max", "relative", "invalid", "outside", "saturated")
    assert LOG_SCALE == pytest.approx(math.log1p(2.0**20), rel=1e-12)
    d = PreprocessConfig()
    assert (d.size, d.sentinels, d.saturation_level, d.min_plateau,
            d.min_saturation_counts) == (128, (), None, 4, 256.0)
    for bad in (7, 8.0, "32", None):
        with pytest.raises(ValueError) as info:
            PreprocessConfig(size=bad)
        assert str(info.value) == f"PreprocessConfig.size must be an int >= 8, got {bad!r}"
    assert PreprocessConfig(size=8).size == 8
    cfg = PreprocessConfig(size=32, sentinels=[7, -3], saturation_level=1000.0, min_plateau=2,
                           min_saturation_counts=50.0)
    assert cfg.sentinels == (7.0, -3.0) and all(type(s) is float for s in cfg.sentinels)
    assert cfg.to_dict() == {"size": 32, "sentinels": [7.0, -3.0], "saturation_level": 1000.0,
                             "min_plateau": 2, "min_saturation_counts": 50.0,
                             "channels": list(CHANNELS)}
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    # keys of other versions are ignored; a stored list of sentinels becomes a tuple
    assert PreprocessConfig.from_dict({"size": 16, "sentinels": [1.0], "future": 1}) == \
        PreprocessConfig(size=16, sentinels=(1.0,))


# ------------------------------------------------------------------ the canvas layout
@pytest.mark.parametrize(("shape", "size", "layout"), [
    ((256, 300), 128, (3, 64, 42)),
    ((128, 128), 128, (1, 0, 0)),
    ((50, 60), 128, (1, 39, 34)),
    ((129, 10), 128, (2, 63, 123)),
    ((10, 129), 128, (2, 123, 63)),
    ((384, 384), 128, (3, 0, 0)),
    ((385, 8), 128, (4, 63, 252)),
])
def test_frame_layout_centres_the_frame(shape, size, layout):
    got = frame_layout(shape, size)
    assert got == layout and all(type(v) is int for v in got)


def test_outside_channel_follows_the_layout():
    # 40 x 64 at size 32: k = 2, the frame's 20 block rows sit in rows 6..25
    x = preprocess_frame(np.full((40, 64), 3, np.uint16), CFG)
    outside = ch(x, "outside")
    assert outside[:6].min() == 1.0 and outside[26:].min() == 1.0
    assert outside[6:26].max() == 0.0
    assert ch(x, "invalid").max() == 0.0


# ------------------------------------------------------------------ valid values per dtype
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
def test_unsigned_maximum_is_masked_and_one_below_it_counts(dtype):
    top = np.iinfo(dtype).max
    frame = np.zeros((32, 32), dtype)          # zeros are valid counts
    frame[:16, :16] = top - 1
    frame[16:, 16:] = top
    x = preprocess_frame(frame, CFG)
    invalid = ch(x, "invalid")
    assert invalid[:16, :].max() == 0.0 and invalid[16:, :16].max() == 0.0
    assert invalid[16:, 16:].min() == 1.0
    assert ch(x, "log_max")[0, 0] == pytest.approx(log_of(float(top - 1)), rel=1e-6)
    assert ch(x, "log_max")[16:, 16:].max() == 0.0   # masked pixels read as no counts


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64])
def test_signed_maximum_counts_and_negatives_are_masked(dtype):
    top = np.iinfo(dtype).max
    frame = np.zeros((32, 32), dtype)
    frame[:16, :16] = top
    frame[16:, 16:] = -1                      # Pilatus gaps
    frame[16:, :16] = -2                      # Pilatus bad pixels
    x = preprocess_frame(frame, CFG)
    invalid = ch(x, "invalid")
    assert invalid[:16, :].max() == 0.0
    assert invalid[16:, :].min() == 1.0
    assert ch(x, "log_max")[0, 0] == pytest.approx(log_of(float(top)), rel=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_range_nan_and_inf(dtype):
    frame = np.full((32, 32), 0.5, dtype)
    frame[0, :] = 0.0
    frame[1, :] = 1e18
    frame[2, :] = 2e18                        # no detector counts that high
    frame[3, :] = -0.5
    frame[4, :] = np.nan
    frame[5, :] = np.inf
    frame[6, :] = -np.inf
    x = preprocess_frame(frame, CFG)
    invalid = ch(x, "invalid")
    assert invalid[[0, 1, 7, 31]].max() == 0.0
    assert invalid[2:7].min() == 1.0
    assert ch(x, "log_max")[1, 0] == pytest.approx(log_of(float(dtype(1e18))), rel=1e-6)
    assert ch(x, "log_mean")[20, 20] == pytest.approx(log_of(0.5), rel=1e-6)
    assert np.isfinite(x).all()


def test_relative_channel_is_log_mean_over_its_peak():
    frame = np.full((32, 32), 100, np.uint16)
    frame[:16] = 10
    x = preprocess_frame(frame, CFG)
    assert ch(x, "log_mean")[20, 0] == pytest.approx(log_of(100), rel=1e-6)
    np.testing.assert_allclose(ch(x, "relative"), ch(x, "log_mean") / log_of(100), rtol=1e-6)
    assert ch(preprocess_frame(np.zeros((32, 32), np.uint16), CFG), "relative").max() == 0.0


# ------------------------------------------------------------------ frames that are refused
def reason_and_message(frame, config=CFG):
    with pytest.raises(FrameError) as info:
        preprocess_frame(frame, config)
    return info.value.reason, str(info.value)


def test_unreadable_frames_and_dtypes_without_counts_are_refused():
    reason, msg = reason_and_message([[1, 2, 3], [4, 5]])
    assert reason == "bad_frame" and msg.startswith("frame cannot be read as an array: ")
    reason, msg = reason_and_message(np.full((16, 16), "x"))
    assert reason == "bad_dtype"
    assert msg == ("frame dtype <U1 is not supported; expected unsigned/signed integers, "
                   "floats or booleans")
    for dtype in (np.complex64, object, "datetime64[s]", "V4"):
        assert reason_and_message(np.zeros((16, 16), dtype))[0] == "bad_dtype"


def test_shapes_one_leading_axis_is_dropped_others_refused():
    frame = np.arange(16 * 20, dtype=np.uint16).reshape(16, 20)
    np.testing.assert_array_equal(preprocess_frame(frame[None], CFG), preprocess_frame(frame, CFG))
    reason, msg = reason_and_message(np.stack([frame, frame]))
    assert reason == "bad_shape"
    assert msg == ("a frame must be 2-D (H, W); got shape (2, 16, 20). Stacks (N, H, W) are "
                   "split into frames by the caller (Tagger.predict accepts them).")
    assert reason_and_message(np.ones(400, np.uint16))[0] == "bad_shape"
    assert reason_and_message(np.ones((1, 1, 16, 16), np.uint16))[0] == "bad_shape"


@pytest.mark.parametrize("shape", [(7, 100), (100, 7), (7, 7)])
def test_a_side_under_eight_pixels_is_refused(shape):
    reason, msg = reason_and_message(np.ones(shape, np.uint16))
    assert reason == "bad_shape"
    assert msg == f"frame of shape {shape} is too small: both sides must be >= 8 pixels"


@pytest.mark.parametrize("shape", [(8, 8), (8, 100), (100, 8)])
def test_eight_pixels_is_enough(shape):
    x = preprocess_frame(np.ones(shape, np.uint16), CFG)
    assert x.shape == (len(CHANNELS), 32, 32) and np.isfinite(x).all()


# ------------------------------------------------------------------ dtypes and memory layouts
def test_other_dtypes_and_layouts_give_the_input_of_their_values():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 200, (40, 50)).astype(np.uint8)
    same = lambda a, b: np.testing.assert_array_equal(  # noqa: E731
        preprocess_frame(a, CFG), preprocess_frame(b, CFG))
    same(base > 100, (base > 100).astype(np.uint8))                   # booleans count 0 / 1
    same(base.astype(np.float16), base.astype(np.float32))
    same(base.astype(np.longdouble), base.astype(np.float64))
    same(base.astype(">u2"), base.astype(np.uint16))                  # big-endian
    same(base.astype(">f8"), base.astype(np.float64))
    masked = base.astype(np.uint16)
    masked[:5] = 65535                                                # keeps its meaning
    same(masked.astype(">u2"), masked)
    same(base.astype(np.uint16)[:, ::2], np.ascontiguousarray(base.astype(np.uint16)[:, ::2]))
    same(np.asfortranarray(base), base)
    same(base.tolist(), base.astype(np.int64))                        # nested lists


# ------------------------------------------------------------------ small frames
def test_small_frames_are_enlarged_by_whole_pixel_repetition():
    rng = np.random.default_rng(4)
    f16 = rng.integers(1, 50, (16, 16)).astype(np.uint16)
    doubled = np.repeat(np.repeat(f16, 2, axis=0), 2, axis=1)
    np.testing.assert_array_equal(preprocess_frame(f16, CFG), preprocess_frame(doubled, CFG))
    assert ch(preprocess_frame(f16, CFG), "outside").max() == 0.0     # fills the canvas
    # 10 x 10 at 32: three times, 30 x 30, one block of border all round
    out = ch(preprocess_frame(np.ones((10, 10), np.uint16), CFG), "outside")
    assert out[1:31, 1:31].max() == 0.0
    assert out[0].min() == out[31].min() == out[:, 0].min() == out[:, 31].min() == 1.0
    # 10 x 20: 32 // 20 = 1, not enlarged; 10 rows centred at 11..20, 20 columns at 6..25
    out = ch(preprocess_frame(np.ones((10, 20), np.uint16), CFG), "outside")
    inside = np.zeros((32, 32), bool)
    inside[11:21, 6:26] = True
    np.testing.assert_array_equal(out, np.where(inside, 0.0, 1.0))


# ------------------------------------------------------------------ extra sentinels
def test_extra_sentinels_are_masked_and_the_dtype_rules_still_hold():
    frame = np.full((32, 32), 5, np.uint16)
    frame[:8] = 7                               # the extra sentinel
    frame[8:16] = 65535                         # masked by the unsigned rule
    frame[16:24] = 65534                        # a valid count
    x = preprocess_frame(frame, PreprocessConfig(size=32, sentinels=(7,)))
    invalid = ch(x, "invalid")
    assert invalid[:16].min() == 1.0 and invalid[16:].max() == 0.0
    assert ch(x, "log_max")[:16].max() == 0.0
    assert ch(x, "log_max")[20, 0] == pytest.approx(log_of(65534), rel=1e-6)
    # a config with sentinels changes nothing for a frame that holds none of them
    clean = np.random.default_rng(5).integers(0, 60000, (32, 32)).astype(np.uint16)
    clean[clean == 7] = 8
    with_sentinel = preprocess_frame(clean, PreprocessConfig(size=32, sentinels=(7,)))
    np.testing.assert_array_equal(with_sentinel, preprocess_frame(clean, CFG))


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.uint32, np.int64])
def test_a_sentinel_masks_only_its_own_value(dtype):
    """``2**24 + 1`` is not ``2**24``, although a float32 copy cannot tell them apart."""
    big = min(2**24, np.iinfo(dtype).max - 2)
    frame = np.full((32, 32), 5, dtype)
    frame[:, 0] = big
    frame[:, 1] = big + 1
    if np.iinfo(dtype).min < 0:
        frame[:, 2] = -1
    x = preprocess_frame(frame, PreprocessConfig(size=32, sentinels=(big + 1,)))
    invalid = ch(x, "invalid")
    assert invalid[:, 0].max() == 0.0 and invalid[:, 1].min() == 1.0
    assert invalid[:, 2].min() == (1.0 if np.iinfo(dtype).min < 0 else 0.0)
    assert invalid[:, 3:].max() == 0.0


def test_float_sentinels():
    frame = np.full((32, 32), 2.0, np.float32)
    frame[0] = 1.5
    frame[1] = np.nan
    x = preprocess_frame(frame, PreprocessConfig(size=32, sentinels=(1.5,)))
    assert ch(x, "invalid")[:2].min() == 1.0 and ch(x, "invalid")[2:].max() == 0.0


# ------------------------------------------------------------------ saturation
def plateau_frame(n: int, value: int, dtype=np.int32) -> np.ndarray:
    """64 x 64 (k = 2 at size 32) of 10 counts, with ``n`` pixels at ``value`` in block (5, 5)
    and, when ``n`` > 4, the rest in block (20, 20)."""
    frame = np.full((64, 64), 10, dtype)
    spots = [(10, 10), (10, 11), (11, 10), (11, 11), (40, 40), (40, 41), (41, 40), (41, 41)]
    for i, j in spots[:n]:
        frame[i, j] = value
    return frame


def test_saturation_is_a_plateau_of_at_least_min_plateau_pixels():
    sat = ch(preprocess_frame(plateau_frame(4, 1000), CFG), "saturated")
    assert sat[5, 5] == 1.0 and np.count_nonzero(sat) == 1
    sat = ch(preprocess_frame(plateau_frame(6, 1000), CFG), "saturated")
    assert sat[5, 5] == 1.0 and sat[20, 20] == 0.5 and np.count_nonzero(sat) == 2
    assert ch(preprocess_frame(plateau_frame(3, 1000), CFG), "saturated").max() == 0.0
    three = PreprocessConfig(size=32, min_plateau=3)
    sat = ch(preprocess_frame(plateau_frame(3, 1000), three), "saturated")
    assert sat[5, 5] == 0.75 and np.count_nonzero(sat) == 1


def test_a_plateau_below_min_saturation_counts_is_not_saturation():
    assert ch(preprocess_frame(plateau_frame(4, 255), CFG), "saturated").max() == 0.0
    assert ch(preprocess_frame(plateau_frame(4, 256), CFG), "saturated")[5, 5] == 1.0
    low = PreprocessConfig(size=32, min_saturation_counts=100.0)
    assert ch(preprocess_frame(plateau_frame(4, 120), low), "saturated")[5, 5] == 1.0


def test_masked_pixels_are_not_a_plateau():
    frame = plateau_frame(0, 0, np.uint16)
    frame[:8, :8] = 65535                    # many masked pixels at the dtype's maximum
    assert ch(preprocess_frame(frame, CFG), "saturated").max() == 0.0


def test_an_explicit_level_needs_no_plateau():
    frame = np.full((64, 64), 10, np.int32)
    frame[10, 10] = 600
    frame[40, 40] = 700
    frame[20, 20] = 499
    sat = ch(preprocess_frame(frame, PreprocessConfig(size=32, saturation_level=500)), "saturated")
    assert sat[5, 5] == sat[20, 20] == 0.25 and np.count_nonzero(sat) == 2
    # a fractional level is rounded up for integer frames: 500.5 -> 501
    frame[10, 10], frame[40, 40] = 500, 501
    sat = ch(preprocess_frame(frame, PreprocessConfig(size=32, saturation_level=500.5)),
             "saturated")
    assert sat[20, 20] == 0.25 and np.count_nonzero(sat) == 1
    # a level no pixel reaches
    none = PreprocessConfig(size=32, saturation_level=5000)
    assert ch(preprocess_frame(frame, none), "saturated").max() == 0.0


def test_a_level_outside_the_dtype_is_clamped_to_it():
    frame = np.full((32, 32), 300, np.int16)
    frame[:4, :4] = np.iinfo(np.int16).max
    sat = ch(preprocess_frame(frame, PreprocessConfig(size=32, saturation_level=1e6)),
             "saturated")
    assert sat[:4, :4].min() == 1.0 and np.count_nonzero(sat) == 16
    # below the range: every valid pixel is at or above it
    frame = np.full((32, 32), 300, np.uint16)
    frame[0, 0] = 65535
    sat = ch(preprocess_frame(frame, PreprocessConfig(size=32, saturation_level=-5)), "saturated")
    assert sat[0, 0] == 0.0 and np.count_nonzero(sat) == 32 * 32 - 1
    # uint8: the level clamps to 255, the masked maximum, so nothing is saturated
    frame = np.full((32, 32), 254, np.uint8)
    level = PreprocessConfig(size=32, saturation_level=1000, min_saturation_counts=0)
    assert ch(preprocess_frame(frame, level), "saturated").max() == 0.0


def test_float_frames_use_the_level_as_given():
    frame = np.full((32, 32), 10.0, np.float32)
    frame[0, 0] = 1000.0
    frame[1, 1] = 999.9
    sat = ch(preprocess_frame(frame, PreprocessConfig(size=32, saturation_level=1000.0)),
             "saturated")
    assert sat[0, 0] == 1.0 and np.count_nonzero(sat) == 1
    # a level of 0 is a level (every valid count reaches it), not "no level"
    zero = PreprocessConfig(size=32, saturation_level=0.0, min_saturation_counts=0.0)
    frame = np.full((32, 32), 0.5, np.float32)
    frame[0, 0] = np.nan
    sat = ch(preprocess_frame(frame, zero), "saturated")
    assert sat[0, 0] == 0.0 and np.count_nonzero(sat == 1.0) == 32 * 32 - 1


# ------------------------------------------------------------------ batches
def test_batch_accounts_for_every_frame_and_keeps_each_frames_input():
    rng = np.random.default_rng(6)
    good = [rng.integers(0, 100, (40, 30)).astype(np.uint16),
            rng.random((20, 50), dtype=np.float32) * 100,
            rng.integers(0, 100, (64, 64)).astype(np.uint16)]
    batch = [good[0], np.ones(50), good[1], np.full((16, 16), "x"), good[2]]
    inputs, ok, errors = preprocess_batch(batch, CFG)
    assert ok == [0, 2, 4]
    assert sorted(errors) == [1, 3]
    assert errors[1].reason == "bad_shape" and errors[3].reason == "bad_dtype"
    assert inputs.shape == (3, len(CHANNELS), 32, 32) and inputs.dtype == np.float32
    for row, frame in zip(inputs, good, strict=True):
        np.testing.assert_array_equal(row, preprocess_frame(frame, CFG))
    inputs, ok, errors = preprocess_batch([], CFG)
    assert inputs.shape == (0, len(CHANNELS), 32, 32) and ok == [] and errors == {}


def test_any_other_failure_is_a_recorded_skip(monkeypatch):
    real = preprocess._prepared

    def failing(frame, config, *rest):
        if frame is marker:
            raise MemoryError("no room")
        return real(frame, config, *rest)

    marker = np.ones((16, 16), np.uint16)
    monkeypatch.setattr(preprocess, "_prepared", failing)
    inputs, ok, errors = preprocess_batch([np.ones((16, 16), np.uint16), marker], CFG)
    assert ok == [0] and len(inputs) == 1
    assert errors[1].reason == "preprocess_error"
    assert str(errors[1]) == "preprocessing failed: MemoryError: no room"


class CountingPool(ThreadPoolExecutor):
    def __init__(self, workers):
        super().__init__(workers)
        self.submitted = 0

    def submit(self, fn, *args, **kwargs):
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def test_a_pool_splits_the_groups_and_changes_no_input():
    rng = np.random.default_rng(7)
    batch = [rng.integers(0, 100, (32 + i, 40)).astype(np.uint16) for i in range(5)]
    batch += [rng.random((30, 30)) * 50, rng.random((40, 30)) * 50]
    want, ok, _ = preprocess_batch(batch, CFG)
    with CountingPool(2) as pool:
        got, ok_pool, errors = preprocess_batch(batch, CFG, pool=pool)
        # uint16 (5 frames) in two parts, float64 (2 frames) in two
        assert pool.submitted == 4
        assert ok_pool == ok == list(range(7)) and errors == {}
        np.testing.assert_array_equal(got, want)
        preprocess_batch(batch[:1], CFG, pool=pool)   # one part: run here, not submitted
        assert pool.submitted == 4
    with CountingPool(3) as pool:
        got, _, _ = preprocess_batch(batch[:5], CFG, pool=pool)
        assert pool.submitted == 3
        np.testing.assert_array_equal(got, want[:5])
    with CountingPool(2) as pool:                      # two parts are enough to submit
        got, _, _ = preprocess_batch(batch[:2], CFG, pool=pool)
        assert pool.submitted == 2
        np.testing.assert_array_equal(got, want[:2])
    with CountingPool(1) as pool:                      # one worker: one part, run here
        got, _, _ = preprocess_batch(batch[:3], CFG, pool=pool)
        assert pool.submitted == 0
        np.testing.assert_array_equal(got, want[:3])


class BareExecutor(Executor):
    """An executor that does not say how many workers it has (no ``_max_workers``)."""

    def __init__(self):
        self.submitted = 0

    def submit(self, fn, *args, **kwargs):
        self.submitted += 1
        future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def test_an_executor_of_unknown_size_gets_one_part_per_dtype():
    rng = np.random.default_rng(8)
    batch = [rng.integers(0, 100, (32, 40)).astype(np.uint16) for _ in range(3)]
    batch.append(rng.random((30, 30)) * 50)
    pool = BareExecutor()
    got, ok, errors = preprocess_batch(batch, CFG, pool=pool)
    assert ok == [0, 1, 2, 3] and errors == {}
    assert pool.submitted == 2                          # uint16 and float64, one part each
    np.testing.assert_array_equal(got, preprocess_batch(batch, CFG)[0])


# ------------------------------------------------------------------ the first-use lock
def test_later_calls_do_not_take_the_first_use_lock():
    frame = np.ones((16, 16), np.uint16)
    want = preprocess_frame(frame, CFG)              # uint16 is warm now
    result = {}
    with preprocess._FIRST_USE_LOCK:
        t = threading.Thread(target=lambda: result.setdefault("x", preprocess_frame(frame, CFG)),
                             daemon=True)
        t.start()
        t.join(60)
        finished = not t.is_alive()
    t.join(60)
    assert finished, "a call for a warm dtype waited on the first-use lock"
    np.testing.assert_array_equal(result["x"], want)


def test_the_first_call_for_each_dtype_takes_the_first_use_lock(monkeypatch):
    monkeypatch.setattr(preprocess, "_warm_dtypes", set())        # no dtype used yet
    for dtype in (np.uint16, np.float32):
        frame = np.ones((16, 16), dtype)
        done = threading.Event()
        with preprocess._FIRST_USE_LOCK:
            t = threading.Thread(target=lambda f=frame, d=done: (preprocess_frame(f, CFG), d.set()),
                                 daemon=True)
            t.start()
            waited = not done.wait(1.0)
        t.join(60)
        assert waited, f"the first {np.dtype(dtype)} call did not wait for the lock"
        assert done.is_set()

