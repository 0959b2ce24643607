"""Simulated x-ray area detectors that draw frames from a Python callable.

Three real devices, one per way a Bluesky run can carry detector frames:

:class:`InlineImageDetector`
    ophyd v1 device (``ophyd.sim`` style); the 2-D array (or an ``(N, H, W)``
    stack) is put inline in each event.
:class:`HDF5ResourceDetector`
    ophyd v1 device in the area-detector style; frames are appended to an
    SWMR HDF5 file and each event holds a datum id that points at them through
    ``resource`` (spec ``"AD_HDF5"``) and ``datum`` documents.
:class:`StreamResourceDetector`
    ophyd-async :class:`~ophyd_async.core.StandardDetector`; frames are
    appended to an SWMR HDF5 file announced through ``stream_resource`` and
    ``stream_datum`` documents; events carry no value for the image key.

Every device takes ``frame_source``, a callable with no arguments that returns
one 2-D :class:`numpy.ndarray` (any shape and dtype; all calls in one run must
agree).  Frames are written in the order ``frame_source`` produced them.

This module imports ophyd, ophyd-async and h5py; import it explicitly
(``from bluesky_xsml.sim.detectors import ...``).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path, PurePath

import h5py
import numpy as np
from ophyd import Component as Cpt
from ophyd import Device, Signal
from ophyd.status import Status
from ophyd_async.core import (
    DetectorAcquireLogic,
    DetectorDataLogic,
    DetectorTriggerLogic,
    PathProvider,
    SignalR,
    StandardDetector,
    StaticPathProvider,
    StreamableDataProvider,
    StreamResourceDataProvider,
    StreamResourceInfo,
    TriggerInfo,
    UUIDFilenameProvider,
    soft_signal_r_and_setter,
)

__all__ = [
    "DATA_PATH",
    "FrameSource",
    "HDF5FrameWriter",
    "HDF5ResourceDetector",
    "InlineImageDetector",
    "StreamResourceDetector",
]

FrameSource = Callable[[], np.ndarray]
"""A callable with no arguments returning one 2-D frame."""

DATA_PATH = "/entry/data/data"
"""Dataset that holds the frames, as in area-detector HDF5 files."""


def _check_frame(frame: object, *, where: str) -> np.ndarray:
    arr = np.asarray(frame)
    if arr.ndim != 2:
        raise ValueError(
            f"{where}: frame_source must return a 2-D array, got shape {arr.shape}"
        )
    return arr


class _FrameDrawer:
    """Draw frames from ``frame_source``, able to peek at the next one.

    Peeking (to learn shape and dtype before the first exposure) keeps the
    frame and hands it out on the next :meth:`next` call, so the frames seen
    downstream are exactly the sequence ``frame_source`` returned.
    """

    def __init__(self, frame_source: FrameSource, *, owner: str):
        if not callable(frame_source):
            raise TypeError(f"{owner}: frame_source must be callable, got {frame_source!r}")
        self._source = frame_source
        self._owner = owner
        self._pending: np.ndarray | None = None

    def peek(self) -> np.ndarray:
        if self._pending is None:
            self._pending = _check_frame(self._source(), where=self._owner)
        return self._pending

    def next(self) -> np.ndarray:
        frame = self.peek()
        self._pending = None
        return frame


class HDF5FrameWriter:
    """Append frames to ``/entry/data/data`` of an HDF5 file in SWMR mode.

    The dataset is chunked one frame per chunk and resizable along axis 0.
    SWMR mode is switched on right after the dataset is created, so readers
    that open the file with ``swmr=True`` and call ``dataset.refresh()`` see
    every frame once :meth:`append` returns.

    Parameters
    ----------
    path : str or Path
        File to create (truncated if it exists).
    shape, dtype
        Shape ``(H, W)`` and dtype of one frame.

    Examples
    --------
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "f.h5")
    >>> w = HDF5FrameWriter(path, (2, 3), "<u2")
    >>> w.append(np.ones((2, 3), "<u2"))
    1
    >>> w.close()
    >>> with h5py.File(path, "r") as f:
    ...     f[DATA_PATH].shape
    (1, 2, 3)
    """

    def __init__(self, path: str | os.PathLike, shape: Sequence[int], dtype: np.dtype | str):
        self.path = str(path)
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self._lock = threading.Lock()
        self._file = h5py.File(self.path, "w", libver="latest")
        self._dataset = self._file.create_dataset(
            DATA_PATH,
            shape=(0, *self.shape),
            maxshape=(None, *self.shape),
            chunks=(1, *self.shape),
            dtype=self.dtype,
        )
        self._file.swmr_mode = True
        self.frames_written = 0

    def append(self, frame: np.ndarray) -> int:
        """Append one frame, flush it, return the number of frames in the file."""
        frame = np.asarray(frame)
        if frame.shape != self.shape:
            raise ValueError(
                f"frame shape {frame.shape} differs from the file's frame shape "
                f"{self.shape} ({self.path})"
            )
        with self._lock:
            if self._file is None:
                raise RuntimeError(f"HDF5FrameWriter for {self.path} is closed")
            n = self.frames_written
            self._dataset.resize(n + 1, axis=0)
            self._dataset[n] = frame
            self._dataset.flush()
            self.frames_written = n + 1
            return self.frames_written

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    @property
    def closed(self) -> bool:
        return self._file is None


# ---------------------------------------------------------------------------
# ophyd v1: inline images
# ---------------------------------------------------------------------------


class _InlineArraySignal(Signal):
    """Signal holding an ndarray; describes itself from a peeked frame if empty."""

    def describe(self):
        res = super().describe()
        value = self._readback
        if value is None:
            value = self.parent._expected_value()
        value = np.asarray(value)
        res[self.name].update(
            dtype="array", shape=list(value.shape), dtype_numpy=value.dtype.str
        )
        return res


class InlineImageDetector(Device):
    """ophyd v1 detector whose events carry the frame itself.

    Parameters
    ----------
    name : str
        Device name; the data key is ``f"{name}_image"``.
    frame_source : callable
        ``frame_source() -> np.ndarray``, one 2-D frame per call.
    frames_per_event : int, optional
        ``None`` (default): each event holds one ``(H, W)`` frame.  An int
        ``N``: each event holds an ``(N, H, W)`` stack of ``N`` frames.

    Notes
    -----
    ``describe()`` reports ``dtype="array"``, ``shape=[H, W]`` (or
    ``[N, H, W]``) and ``dtype_numpy``; no ``external`` key.  ``trigger()``
    draws the frame(s) synchronously and returns a finished status.

    Examples
    --------
    >>> from bluesky import RunEngine
    >>> from bluesky.plans import count
    >>> det = InlineImageDetector("det", lambda: np.zeros((4, 5), "u2"))
    >>> docs = []
    >>> RE = RunEngine()
    >>> RE(count([det], 2), lambda name, doc: docs.append((name, doc)))  # doctest: +ELLIPSIS
    (...)
    >>> [d["data"]["det_image"].shape for n, d in docs if n == "event"]
    [(4, 5), (4, 5)]
    """

    image = Cpt(_InlineArraySignal, kind="hinted")

    def __init__(
        self,
        name: str,
        frame_source: FrameSource,
        *,
        frames_per_event: int | None = None,
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        if frames_per_event is not None and int(frames_per_event) < 1:
            raise ValueError(f"frames_per_event must be >= 1 or None, got {frames_per_event}")
        self.frames_per_event = None if frames_per_event is None else int(frames_per_event)
        self._drawer = _FrameDrawer(frame_source, owner=f"InlineImageDetector {name!r}")

    def _expected_value(self) -> np.ndarray:
        frame = self._drawer.peek()
        if self.frames_per_event is None:
            return frame
        return np.empty((self.frames_per_event, *frame.shape), frame.dtype)

    def _draw(self) -> np.ndarray:
        if self.frames_per_event is None:
            return self._drawer.next()
        return np.stack([self._drawer.next() for _ in range(self.frames_per_event)])

    def trigger(self):
        self.image.put(self._draw(), timestamp=time.time())
        status = Status(obj=self, settle_time=0)
        status.set_finished()
        return status


# ---------------------------------------------------------------------------
# ophyd v1: area-detector style resource / datum
# ---------------------------------------------------------------------------


class _DatumIdSignal(Signal):
    """Signal holding a datum id; describes the external array it points at."""

    def describe(self):
        res = super().describe()
        res[self.name] = self.parent._image_data_key(self.name)
        return res


class HDF5ResourceDetector(Device):
    """ophyd v1 detector writing frames to HDF5, area-detector style.

    On ``stage()`` it draws the first frame (to learn shape and dtype) and
    creates ``{root_dir}/{uuid}.h5`` with a chunked, resizable
    ``/entry/data/data`` in SWMR mode, and queues a ``resource`` document
    (spec ``"AD_HDF5"``, ``root=root_dir``, ``resource_path`` relative to
    it, ``resource_kwargs={"frame_per_point": frames_per_point}``).  Each
    ``trigger()`` appends ``frames_per_point`` frames and queues a ``datum``
    (``datum_kwargs={"point_number": i}``); the event holds its datum id.
    Documents go out through ``collect_asset_docs`` (the RunEngine emits them
    before the event).  ``unstage()`` closes the file.

    Parameters
    ----------
    name : str
        Device name; the data key is ``f"{name}_image"``.
    frame_source : callable
        ``frame_source() -> np.ndarray``, one 2-D frame per call.
    root_dir : str or Path
        Directory to write into (created if missing); recorded as the
        resource ``root``.
    frames_per_point : int
        Frames written per trigger (the ``frame_per_point`` of AD_HDF5).
    spec : str
        Resource spec; ``"AD_HDF5"`` (default) or ``"AD_HDF5_SWMR"``.

    Notes
    -----
    ``describe()`` gives, like ophyd's ``DetectorBase.make_data_key``,
    ``dtype="array"``, ``shape=[frames_per_point, H, W]``, ``dtype_numpy``
    and ``external="FILESTORE:"``.

    Examples
    --------
    >>> import tempfile
    >>> from bluesky import RunEngine
    >>> from bluesky.plans import count
    >>> det = HDF5ResourceDetector("det", lambda: np.ones((4, 5), "u2"), tempfile.mkdtemp())
    >>> names = []
    >>> RE = RunEngine()
    >>> RE(count([det], 2), lambda name, doc: names.append(name))  # doctest: +ELLIPSIS
    (...)
    >>> names
    ['start', 'descriptor', 'resource', 'datum', 'event', 'datum', 'event', 'stop']
    """

    image = Cpt(_DatumIdSignal, kind="hinted", value="")

    def __init__(
        self,
        name: str,
        frame_source: FrameSource,
        root_dir: str | os.PathLike,
        *,
        frames_per_point: int = 1,
        spec: str = "AD_HDF5",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        if int(frames_per_point) < 1:
            raise ValueError(f"frames_per_point must be >= 1, got {frames_per_point}")
        self.frames_per_point = int(frames_per_point)
        self.root_dir = Path(root_dir).absolute()
        self.spec = spec
        self._drawer = _FrameDrawer(frame_source, owner=f"HDF5ResourceDetector {name!r}")
        self._writer: HDF5FrameWriter | None = None
        self._resource_uid: str | None = None
        self._points: itertools.count | None = None
        self._asset_docs: deque = deque()

    @property
    def file_path(self) -> str | None:
        """The file being written while staged, else ``None``."""
        return None if self._writer is None else self._writer.path

    def _image_data_key(self, signal_name: str) -> dict:
        frame = self._drawer.peek() if self._writer is None else None
        shape = frame.shape if frame is not None else self._writer.shape
        dtype = frame.dtype if frame is not None else self._writer.dtype
        return {
            "source": f"SIM:{signal_name}",
            "dtype": "array",
            "shape": [self.frames_per_point, *shape],
            "dtype_numpy": np.dtype(dtype).str,
            "external": "FILESTORE:",
        }

    def stage(self):
        self.root_dir.mkdir(parents=True, exist_ok=True)
        first = self._drawer.peek()
        relative = f"{uuid.uuid4()}.h5"
        self._writer = HDF5FrameWriter(self.root_dir / relative, first.shape, first.dtype)
        self._resource_uid = str(uuid.uuid4())
        self._points = itertools.count()
        self._asset_docs.clear()
        self._asset_docs.append(
            (
                "resource",
                {
                    "uid": self._resource_uid,
                    "spec": self.spec,
                    "root": str(self.root_dir),
                    "resource_path": relative,
                    "resource_kwargs": {"frame_per_point": self.frames_per_point},
                    "path_semantics": "posix" if os.name == "posix" else "windows",
                },
            )
        )
        try:
            return super().stage()
        except Exception:
            self._close()
            raise

    def trigger(self):
        if self._writer is None:
            raise RuntimeError(f"{self.name} must be staged before it is triggered")
        for _ in range(self.frames_per_point):
            self._writer.append(self._drawer.next())
        point = next(self._points)
        datum_id = f"{self._resource_uid}/{point}"
        self._asset_docs.append(
            (
                "datum",
                {
                    "resource": self._resource_uid,
                    "datum_id": datum_id,
                    "datum_kwargs": {"point_number": point},
                },
            )
        )
        self.image.put(datum_id, timestamp=time.time())
        status = Status(obj=self, settle_time=0)
        status.set_finished()
        return status

    def collect_asset_docs(self):
        while self._asset_docs:
            yield self._asset_docs.popleft()

    def _close(self):
        if self._writer is not None:
            self._writer.close()
        self._writer = None
        self._resource_uid = None
        self._points = None

    def unstage(self):
        try:
            return super().unstage()
        finally:
            self._close()
            self._asset_docs.clear()


# ---------------------------------------------------------------------------
# ophyd-async: stream_resource / stream_datum
# ---------------------------------------------------------------------------


class _FrameFileState:
    """Shared state of one StreamResourceDetector: the open file and counters."""

    def __init__(self, frame_source: FrameSource, owner: str):
        self.drawer = _FrameDrawer(frame_source, owner=owner)
        self.writer: HDF5FrameWriter | None = None
        self.frames_per_trigger = 1
        self.period = 0.0
        self.images_written, self._set_images_written = soft_signal_r_and_setter(int, 0)

    def open_file(self, path: PurePath) -> HDF5FrameWriter:
        first = self.drawer.peek()
        self.close_file()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.writer = HDF5FrameWriter(path, first.shape, first.dtype)
        return self.writer

    def reset_count(self) -> None:
        self._set_images_written(0)

    async def write_frames(self) -> None:
        writer = self.writer
        if writer is None:
            raise RuntimeError("StreamResourceDetector: no file open (prepare not run)")
        for _ in range(self.frames_per_trigger):
            if self.period:
                await asyncio.sleep(self.period)
            # frame_source may be slow: keep the RunEngine's event loop free
            frame = await asyncio.to_thread(self.drawer.next)
            self._set_images_written(await asyncio.to_thread(writer.append, frame))

    def close_file(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class _FrameTriggerLogic(DetectorTriggerLogic):
    def __init__(self, state: _FrameFileState):
        self._state = state

    async def prepare_internal(self, num: int, livetime: float, deadtime: float):
        self._state.frames_per_trigger = num
        self._state.period = livetime + deadtime

    async def default_trigger_info(self) -> TriggerInfo:
        return TriggerInfo()


class _FrameAcquireLogic(DetectorAcquireLogic):
    def __init__(self, state: _FrameFileState):
        self._state = state
        self._task: asyncio.Task | None = None

    async def start_acquiring(self):
        self._task = asyncio.create_task(self._state.write_frames())

    async def wait_for_idle(self):
        if self._task is not None:
            await self._task

    async def ensure_stopped(self):
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class _FrameDataLogic(DetectorDataLogic):
    def __init__(self, state: _FrameFileState, path_provider: PathProvider):
        self._state = state
        self._path_provider = path_provider

    async def prepare_unbounded(self, datakey_name: str) -> StreamableDataProvider:
        info = self._path_provider(datakey_name)
        writer = await asyncio.to_thread(
            self._state.open_file, info.directory_path / f"{info.filename}.h5"
        )
        self._state.reset_count()  # on the event loop: signal callbacks are not thread-safe
        resource = StreamResourceInfo(
            data_key=datakey_name,
            shape=writer.shape,
            chunk_shape=(1, *writer.shape),
            dtype_numpy=writer.dtype.str,
            parameters={"dataset": DATA_PATH},
        )
        return StreamResourceDataProvider(
            uri=f"{info.directory_uri}{info.filename}.h5",
            resources=[resource],
            mimetype="application/x-hdf5",
            collections_written_signal=self._state.images_written,
        )

    async def stop(self) -> None:
        self._state.close_file()

    def get_hinted_fields(self, datakey_name: str) -> Sequence[str]:
        return [datakey_name]


class StreamResourceDetector(StandardDetector):
    """ophyd-async detector writing ``frame_source`` frames to SWMR HDF5.

    Built like ``ophyd_async.sim.SimBlobDetector`` (trigger, acquire and data
    logic on a :class:`~ophyd_async.core.StandardDetector`), but the frames
    come from ``frame_source``.  On ``prepare`` (implicit on the first
    ``trigger`` of a step scan) it draws the first frame to learn shape and
    dtype and creates ``{filename}.h5`` from the path provider; each
    ``trigger`` appends ``collections_per_event`` frames (1 by default).

    Documents: ``stream_resource`` (mimetype ``application/x-hdf5``,
    ``uri="file://localhost/..."``, ``parameters={"dataset":
    "/entry/data/data", "chunk_shape": (1, H, W)}``) after the descriptor,
    then one ``stream_datum`` per event, emitted *before* that event.  The
    descriptor data key ``name`` has ``shape=[collections_per_event, H, W]``,
    ``dtype="array"``, ``dtype_numpy`` and ``external="STREAM:"``; events have
    no value at all for it.

    Parameters
    ----------
    frame_source : callable
        ``frame_source() -> np.ndarray``, one 2-D frame per call.
    root_dir : str or Path, optional
        Directory for files named by uuid; ignored when ``path_provider`` is
        given.  One of the two is required.
    path_provider : PathProvider, optional
        Any ophyd-async path provider.
    name : str
        Device and data key name.  Empty names are filled by
        ``init_devices`` from the variable name.
    config_sigs : sequence of SignalR
        Extra signals for ``read_configuration``.

    Examples
    --------
    >>> import tempfile
    >>> from bluesky import RunEngine
    >>> from bluesky.plans import count
    >>> from ophyd_async.core import init_devices
    >>> RE = RunEngine()  # before init_devices: it owns the event loop
    >>> with init_devices():
    ...     det = StreamResourceDetector(lambda: np.ones((4, 5), "u2"), tempfile.mkdtemp())
    >>> names = []
    >>> RE(count([det], 2), lambda name, doc: names.append(name))  # doctest: +ELLIPSIS
    (...)
    >>> names  # doctest: +NORMALIZE_WHITESPACE
    ['start', 'descriptor', 'stream_resource', 'stream_datum', 'event',
     'stream_datum', 'event', 'stop']
    """

    def __init__(
        self,
        frame_source: FrameSource,
        root_dir: str | os.PathLike | None = None,
        *,
        path_provider: PathProvider | None = None,
        name: str = "",
        config_sigs: Sequence[SignalR] = (),
    ) -> None:
        if path_provider is None:
            if root_dir is None:
                raise TypeError("StreamResourceDetector needs root_dir or path_provider")
            path_provider = StaticPathProvider(UUIDFilenameProvider(), Path(root_dir).absolute())
        self._state = _FrameFileState(frame_source, owner=f"StreamResourceDetector {name!r}")
        self.add_detector_logics(
            _FrameTriggerLogic(self._state),
            _FrameAcquireLogic(self._state),
            _FrameDataLogic(self._state, path_provider),
        )
        self.add_config_signals(*config_sigs)
        super().__init__(name=name)

    @property
    def file_path(self) -> str | None:
        """The file being written while prepared, else ``None``."""
        writer = self._state.writer
        return None if writer is None else writer.path
