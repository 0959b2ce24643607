"""HDF5 files opened for SWMR reading, and the SWMR-aware ``AD_HDF5`` handler.

Split out of :mod:`bluesky_xsml.documents.external` (which re-exports these
names): this module knows how to read rows of an HDF5 dataset that a writer in
another process is still appending to; the rules about *which* files may be
read live in :mod:`~bluesky_xsml.documents.external`.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = ["AD_DATA_PATH", "HDF5Files", "NotYetWritten", "SWMRHDF5Handler", "close_quietly"]

logger = logging.getLogger(__name__)

AD_DATA_PATH = "/entry/data/data"


class NotYetWritten(OSError):
    """The file exists but does not hold the requested frames (yet)."""


class _OpenH5:
    """One open file: its handle, one Dataset object per name, and a lock."""

    def __init__(self, path: str) -> None:
        import h5py

        self.file = h5py.File(path, "r", swmr=True)
        # Only files in the SWMR format (superblock >= 3, libver="latest") can
        # be refreshed safely; refreshing an old-format file while several
        # Dataset objects are open corrupts HDF5's state (RuntimeError "ref-counted
        # page nil", then a segfault at exit; h5py 3.16).
        self.swmr = self.file.id.get_create_plist().get_version()[0] >= 3
        self.datasets: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.closed = False

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.datasets.clear()
            close_quietly(self.file)


class HDF5Files:
    """Thread-safe cache of HDF5 files opened for SWMR reading, one per path.

    Each file is opened once with ``swmr=True`` and each dataset looked up
    once; :meth:`read` refreshes the dataset (SWMR-format files) before
    slicing, so frames appended by a writer in another process are seen
    without reopening.  Files not in SWMR format are never refreshed; when
    they are too short they are closed, so the next :meth:`read` reopens them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[str, _OpenH5] = {}

    def _entry(self, path: str) -> _OpenH5:
        with self._lock:
            entry = self._files.get(path)
            if entry is None or entry.closed:
                entry = self._files[path] = _OpenH5(path)
            return entry

    def read(self, path: str, name: str, start: int, stop: int) -> np.ndarray:
        """Return rows ``[start, stop)`` of dataset ``name`` in ``path``.

        Raises
        ------
        OSError
            The file cannot be opened, or holds fewer than ``stop`` rows
            (an ``OSError`` subclass, so Filler-style callers retry).
        KeyError
            No dataset ``name``.
        """
        entry = self._entry(path)
        with entry.lock:
            if entry.closed:
                raise OSError(f"HDF5 file {path} was closed while being read; retry")
            ds = entry.datasets.get(name)
            if ds is None:
                try:
                    ds = entry.datasets[name] = entry.file[name]
                except KeyError as err:
                    raise KeyError(f"no dataset {name!r} in HDF5 file {path}") from err
            if entry.swmr:
                ds.refresh()
            rows = ds.shape[0] if ds.shape else 0
            if rows >= stop:
                return ds[start:stop]
        if not entry.swmr:
            self.drop(path)
        raise NotYetWritten(
            f"HDF5 file {path} holds {rows} frames in {name}; frames "
            f"{start}..{stop - 1} were requested"
        )

    def drop(self, path: str) -> None:
        """Close and forget ``path`` (the next :meth:`read` reopens it)."""
        with self._lock:
            entry = self._files.pop(path, None)
        if entry is not None:
            entry.close()

    def close(self) -> None:
        with self._lock:
            entries, self._files = list(self._files.values()), {}
        for entry in entries:
            entry.close()

    def __len__(self) -> int:
        return len(self._files)


def close_quietly(obj: Any) -> None:
    try:
        obj.close()
    except Exception:  # closing must not raise
        logger.debug("error closing %r", obj, exc_info=True)


class SWMRHDF5Handler:
    """SWMR-aware handler for the ``AD_HDF5`` and ``AD_HDF5_SWMR`` specs.

    Drop-in for area-detector-handlers' ``AreaDetectorHDF5Handler`` (same
    constructor and call signature, usable in an ``event_model.Filler``), but
    it opens the file lazily with ``swmr=True``, refreshes the dataset before
    every read and returns a NumPy array ``(frame_per_point, H, W)``.  Frames
    not in the file yet raise :class:`OSError`, which Filler-style callers
    retry.

    Parameters
    ----------
    filename : str
        Path to the HDF5 file.
    frame_per_point : int
        Frames per datum.
    key : str
        Dataset path, ``/entry/data/data`` for area detectors.
    file_cache : HDF5Files, optional
        Shared file cache (a private one if not given).
    """

    specs: ClassVar[set[str]] = {"AD_HDF5", "AD_HDF5_SWMR"}

    def __init__(
        self,
        filename: str,
        frame_per_point: int = 1,
        *,
        key: str = AD_DATA_PATH,
        file_cache: HDF5Files | None = None,
    ) -> None:
        self._filename = filename
        self._fpp = int(frame_per_point)
        self._key = key
        self._own_cache = file_cache is None
        self._files = HDF5Files() if file_cache is None else file_cache

    def __call__(self, point_number: int) -> np.ndarray:
        start = int(point_number) * self._fpp
        return self._files.read(self._filename, self._key, start, start + self._fpp)

    def get_file_list(self, datum_kwargs: Any) -> list[str]:
        return [self._filename]

    def close(self) -> None:
        if self._own_cache:
            self._files.close()

    def __enter__(self) -> SWMRHDF5Handler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
