"""Property-based checks: any frame gives a finite input or a clear FrameError."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bluesky_xsml.errors import FrameError
from bluesky_xsml.preprocess import CHANNELS, PreprocessConfig, preprocess_batch, preprocess_frame

CFG = PreprocessConfig(size=16)
DTYPES = [np.uint8, np.uint16, np.uint32, np.int16, np.int32, np.int64, np.float32, np.float64,
          np.bool_]


@st.composite
def frames(draw):
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(st.tuples(st.integers(1, 70), st.integers(1, 70)))
    if dtype.kind == "f":
        elements = st.floats(allow_nan=True, allow_infinity=True, width=dtype.itemsize * 8)
    else:
        elements = None
    return draw(hnp.arrays(dtype, shape, elements=elements))


@pytest.mark.reliability
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames())
def test_any_frame_gives_finite_input_or_frame_error(frame):
    try:
        x = preprocess_frame(frame, CFG)
    except FrameError as err:
        assert min(frame.shape) < 8 and err.reason == "bad_shape"
        return
    assert x.shape == (len(CHANNELS), 16, 16) and x.dtype == np.float32
    assert np.isfinite(x).all()
    assert (x[CHANNELS.index("invalid")] >= 0).all() and (x[CHANNELS.index("invalid")] <= 1).all()


@pytest.mark.reliability
@settings(max_examples=40, deadline=None)
@given(st.lists(frames(), min_size=1, max_size=6))
def test_batches_never_raise_and_account_for_every_frame(batch):
    inputs, ok, errors = preprocess_batch(batch, CFG)
    assert sorted(ok + list(errors)) == list(range(len(batch)))
    assert len(inputs) == len(ok) and np.isfinite(inputs).all()
    for i in ok:  # batching does not change a frame's input
        np.testing.assert_array_equal(inputs[ok.index(i)], preprocess_frame(batch[i], CFG))


@pytest.mark.reliability
@pytest.mark.parametrize("value", [2**16 - 1, 0, 7])
def test_constant_and_sentinel_only_frames(value):
    x = preprocess_frame(np.full((40, 40), value, np.uint16), CFG)
    assert np.isfinite(x).all()
    if value == 2**16 - 1:
        assert x[CHANNELS.index("invalid")][4:12, 4:12].min() == 1.0
