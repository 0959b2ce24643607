"""Reading detector frames stored outside the documents.

Two ways a Bluesky run points at externally stored frames:

* ``resource`` + ``datum`` (ophyd v1 area detectors): the event holds a datum
  id; a handler chosen by the resource ``spec`` reads the frames.  Handlers
  follow event-model's Filler protocol, ``handler_class(path,
  **resource_kwargs)(**datum_kwargs)``, so any Filler handler registry works.
* ``stream_resource`` + ``stream_datum`` (ophyd-async): events carry nothing
  for the image key; a ``stream_datum`` says which rows (``indices``) of the
  HDF5 dataset belong to which events (``seq_nums``).

:class:`ExternalFrames` keeps one run's documents.  :meth:`ExternalFrames.register`
is cheap (no file I/O) and is meant for the RunEngine thread;
:meth:`ExternalFrames.read` blocks and is meant for a worker thread.  Documents
are never modified.

HDF5 files are opened with ``swmr=True`` and datasets are refreshed before
each read, so frames appended after the file was first opened are seen.
Files are opened once per path and cached until :meth:`ExternalFrames.forget`.

Documents choose the files, and documents may come from a network, so every
read is checked first (:meth:`ExternalFrames.read`):

* **containment**: the file's real path (symlinks resolved) must lie under the
  resource's own ``root`` (after ``root_map``): ``..`` in ``resource_path``, an
  absolute ``resource_path`` or a symlink cannot leave it. With
  ``allowed_roots`` (or ``XSML_ALLOWED_ROOTS``, paths separated by ``:``) it
  must also lie under one of those; a ``stream_resource`` has no root, so only
  that list confines it.
* **regular files only**: ``os.stat`` before any open; a FIFO, a device or a
  socket would block (or worse) the reader while it holds the GIL.
* **a time limit** (``read_timeout``): each attempt runs on its own thread; a
  read that does not finish in time is recorded as skipped and abandoned.
* **no paths in skip reasons**: reasons and error messages name the file by
  its base name at most; full paths go to the log.
"""

from __future__ import annotations

import importlib
import logging
import os
import posixpath
import re
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlparse

from bluesky_xsml.errors import FrameSourceError

from .hdf5 import HDF5Files, NotYetWritten, SWMRHDF5Handler, close_quietly

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = [
    "ALLOWED_ROOTS_ENV",
    "DEFAULT_HANDLERS",
    "ExternalFrames",
    "FrameRef",
    "HDF5Files",
    "SWMRHDF5Handler",
]

logger = logging.getLogger(__name__)

#: Environment variable with extra allowed roots (``os.pathsep``-separated).
ALLOWED_ROOTS_ENV = "XSML_ALLOWED_ROOTS"
#: Specs whose ``path`` is the one file read (others name a directory or a template).
_SINGLE_FILE_SPECS = frozenset({"AD_HDF5", "AD_HDF5_SWMR"})
HDF5_MIMETYPE = "application/x-hdf5"

DEFAULT_HANDLERS: dict[str, str] = {
    # SWMR-aware replacements: area-detector-handlers 0.0.10's AD_HDF5 builds a
    # dask array once (later frames invisible) and its AD_HDF5_SWMR fails on
    # refresh (AttributeError: 'Array' object has no attribute 'id').
    "AD_HDF5": "bluesky_xsml.documents.hdf5:SWMRHDF5Handler",
    "AD_HDF5_SWMR": "bluesky_xsml.documents.hdf5:SWMRHDF5Handler",
    "AD_TIFF": "area_detector_handlers.handlers:AreaDetectorTiffHandler",
    "AD_SPE": "area_detector_handlers.handlers:AreaDetectorSPEHandler",
    "AD_CBF": "area_detector_handlers.handlers:PilatusCBFHandler",
    "AD_HDF5_SINGLE": "area_detector_handlers.handlers:AreaDetectorHDF5SingleHandler",
    "TPX_HDF5": "area_detector_handlers.handlers:TimepixHDF5Handler",
    "IMM": "area_detector_handlers.handlers:IMMHandler",
    "AD_EIGER": "area_detector_handlers.eiger:EigerHandler",
    "AD_EIGER2": "area_detector_handlers.eiger:EigerHandler",
    "AD_EIGER_SLICE": "area_detector_handlers.eiger:EigerHandler",
    "NPY_SEQ": "ophyd.sim:NumpySeqHandler",
}
"""Spec -> handler (``"module:attribute"``, imported on first use).

Timestamp specs (``AD_HDF5_TS``, ``AD_HDF5_SWMR_TS``) are left out: they hold
no frames.  A ``handler_registry`` given to :class:`ExternalFrames` is laid
over this mapping (its entries win; a value of ``None`` removes a spec).
"""


@dataclass(frozen=True)
class FrameRef:
    """A light, hashable handle to one event's worth of external frames.

    Attributes
    ----------
    kind : {"datum", "stream"}
        Which document family the frames come from.
    key : str
        The datum id (``kind="datum"``) or the stream_datum uid
        (``kind="stream"``).
    resource : str
        uid of the resource or stream_resource.
    spec : str
        Resource spec (``"AD_HDF5"``, ...) or stream mimetype
        (``"application/x-hdf5"``).
    path : str
        Local file (or, for per-frame specs such as AD_TIFF, directory) after
        ``root_map``.
    data_key : str
        The descriptor data key (``kind="stream"``; ``""`` for datum refs,
        whose key the event names).
    dataset : str
        HDF5 dataset (``kind="stream"``).
    start, stop : int
        Rows ``[start, stop)`` of ``dataset`` (``kind="stream"``).
    root : str
        The directory the file must stay in: the resource's ``root`` after
        ``root_map`` (``""``: none declared; stream refs).

    A datum ref is read by the :class:`ExternalFrames` that made it (the
    datum kwargs and the handler live there); a stream ref is self-contained.
    """

    kind: Literal["datum", "stream"]
    key: str
    resource: str
    spec: str
    path: str
    data_key: str = ""
    dataset: str = ""
    start: int = 0
    stop: int = 0
    root: str = ""

    @property
    def n_frames(self) -> int | None:
        """Frames this ref covers, where known without reading (stream refs)."""
        return self.stop - self.start if self.kind == "stream" else None


def _resolve(spec: str, handler: Any) -> Callable:
    if isinstance(handler, str):
        module, _, attr = handler.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise FrameSourceError(
                f"handler {handler!r} for spec {spec!r} cannot be imported: {err}",
                reason="unknown_spec",
            ) from err
    return handler



def _short(path: str) -> str:
    """The base name of ``path``: what skip reasons may say about a file."""
    return os.path.basename(str(path).rstrip("/")) or "/"


def _scrub(text: str) -> str:
    """``text`` with the directories of absolute paths removed (``/a/b/c.h5`` -> ``c.h5``)."""
    return re.sub(r"/(?:[^/\s'\",()]+/)+", "", text)


def _within(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or below it (both already real paths)."""
    root = root.rstrip(os.sep) or os.sep
    return path == root or path.startswith(root if root == os.sep else root + os.sep)


def default_allowed_roots() -> tuple[str, ...]:
    """Roots from ``XSML_ALLOWED_ROOTS`` (separated by ``os.pathsep``; empty: none)."""
    value = os.environ.get(ALLOWED_ROOTS_ENV, "")
    return tuple(part for part in value.split(os.pathsep) if part.strip())


def _remap_prefix(path: str, root_map: Mapping[str, str]) -> tuple[str, str | None]:
    """Replace the longest ``root_map`` key that is a directory prefix of ``path``."""
    best = None
    for old in root_map:
        stripped = old.rstrip("/") or "/"
        if path == stripped or path.startswith(stripped.rstrip("/") + "/"):
            if best is None or len(stripped) > len(best):
                best = old
    if best is None:
        return path, None
    stripped = best.rstrip("/") or "/"
    rest = path[len(stripped):].lstrip("/")
    new = root_map[best]
    return (posixpath.join(new, rest) if rest else new), best


def _squeeze_single(arr: np.ndarray) -> np.ndarray:
    return arr[0] if arr.ndim >= 3 and arr.shape[0] == 1 else arr


class ExternalFrames:
    """One run's external frames: register documents, then read frames.

    Parameters
    ----------
    handler_registry : dict, optional
        ``spec -> handler class`` (or ``"module:attribute"``), laid over
        :data:`DEFAULT_HANDLERS`; ``None`` as a value removes a spec.
        Handlers follow the event-model Filler protocol.
    root_map : dict, optional
        ``old -> new`` roots for files moved since acquisition.  For a
        ``resource``, a ``root`` equal to a key is replaced (as databroker
        and ``event_model.Filler`` do); otherwise, and for a
        ``stream_resource`` uri, the longest key that is a directory prefix
        of the file path is replaced.
    retries : int
        Extra attempts after the first for files that are missing, truncated
        or do not hold the frames yet.
    retry_delay : float
        Seconds between attempts (so a hopeless read gives up after about
        ``retries * retry_delay`` seconds).
    allowed_roots : sequence of str, optional
        Directories every file read must lie under (after symlinks are
        resolved), on top of its resource's own ``root``. Default: the
        ``XSML_ALLOWED_ROOTS`` environment variable, else none (only the
        resource's ``root`` confines; a ``stream_resource`` is then not
        confined).
    read_timeout : float or None
        Seconds one read attempt may take; a read still running then is
        abandoned and the frame skipped (``"read_timeout"``). ``None``: no limit
        (and no extra thread).

    Notes
    -----
    :meth:`register`, :meth:`datum_ref` and :meth:`stream_refs` do no file
    I/O.  :meth:`read` blocks; it may be called from any thread, concurrently.
    :meth:`read` returns ``(H, W)`` for one frame and ``(N, H, W)`` for a
    stack; a leading axis of length 1 is dropped.

    Examples
    --------
    >>> frames = ExternalFrames(retries=0)
    >>> frames.register("resource", {"uid": "r1", "spec": "AD_HDF5", "root": "/d",
    ...     "resource_path": "a.h5", "resource_kwargs": {"frame_per_point": 1},
    ...     "path_semantics": "posix"})
    >>> frames.register("datum", {"datum_id": "r1/0", "resource": "r1",
    ...     "datum_kwargs": {"point_number": 0}})
    >>> frames.datum_ref("r1/0").path
    '/d/a.h5'
    >>> try:
    ...     frames.read(frames.datum_ref("r1/0"))
    ... except FrameSourceError as err:
    ...     print(err.reason, "|", err)
    missing_file | cannot read datum r1/0 (spec 'AD_HDF5'): file a.h5 does not exist (1 attempt)
    """

    def __init__(
        self,
        *,
        handler_registry: Mapping[str, Any] | None = None,
        root_map: Mapping[str, str] | None = None,
        retries: int = 5,
        retry_delay: float = 0.1,
        allowed_roots: Sequence[str] | None = None,
        read_timeout: float | None = 30.0,
    ) -> None:
        if read_timeout is not None and read_timeout <= 0:
            raise ValueError(f"read_timeout must be > 0 or None, got {read_timeout}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if retry_delay < 0:
            raise ValueError(f"retry_delay must be >= 0, got {retry_delay}")
        registry: dict[str, Any] = dict(DEFAULT_HANDLERS)
        for spec, handler in (handler_registry or {}).items():
            if handler is None:
                registry.pop(spec, None)
            else:
                registry[spec] = handler
        self._registry = registry
        self.root_map: dict[str, str] = dict(root_map or {})
        self.retries = int(retries)
        self.retry_delay = float(retry_delay)
        self.allowed_roots: tuple[str, ...] = tuple(
            str(r) for r in (default_allowed_roots() if allowed_roots is None else allowed_roots))
        self._real_allowed: tuple[str, ...] | None = None  # resolved on the reading thread
        self.read_timeout = None if read_timeout is None else float(read_timeout)
        self._resources: dict[str, dict] = {}
        self._datums: dict[str, dict] = {}
        self._stream_resources: dict[str, dict] = {}
        self._descriptors: dict[str, dict] = {}
        self._files = HDF5Files()
        self._handlers: dict[str, Any] = {}
        self._handler_lock = threading.Lock()

    # ------------------------------------------------------------------ registering

    def register(self, name: str, doc: Mapping[str, Any]) -> None:
        """Remember what later refs and reads need from ``doc``; no file I/O.

        Accepts ``resource``, ``datum``, ``datum_page``, ``stream_resource``,
        ``stream_datum`` and ``descriptor``; other names are ignored.  The
        document is not modified.
        """
        if name == "resource":
            self._resources[doc["uid"]] = doc
        elif name == "datum":
            self._datums[doc["datum_id"]] = doc
        elif name == "datum_page":
            kwargs = doc["datum_kwargs"]
            for i, datum_id in enumerate(doc["datum_id"]):
                self._datums[datum_id] = {
                    "datum_id": datum_id,
                    "resource": doc["resource"],
                    "datum_kwargs": {k: v[i] for k, v in kwargs.items()},
                }
        elif name == "stream_resource":
            self._stream_resources[doc["uid"]] = doc
        elif name == "descriptor":
            self._descriptors[doc["uid"]] = doc
        # stream_datum carries everything stream_refs needs; nothing to keep.

    # ------------------------------------------------------------------ refs

    def _resource_location(self, resource: Mapping[str, Any]) -> tuple[str, str]:
        """``(path, root)`` of a resource after ``root_map``; no file I/O."""
        root = resource.get("root", "") or ""
        rel = resource["resource_path"]
        if root in self.root_map:
            root = self.root_map[root]
            return (os.path.join(root, rel) if root else rel), root
        path = os.path.join(root, rel) if root else rel
        if root:
            root = _remap_prefix(root, self.root_map)[0]
        return _remap_prefix(path, self.root_map)[0], root

    def datum_ref(self, datum_id: str) -> FrameRef:
        """Return the ref for a datum id found in an event's data.

        Raises
        ------
        FrameSourceError
            ``reason="unknown_datum"`` if the datum or its resource was never
            registered.
        """
        datum = self._datums.get(datum_id)
        if datum is None:
            raise FrameSourceError(
                f"unknown datum id {datum_id!r}: no datum or datum_page document "
                f"with it was registered ({len(self._datums)} datums known)",
                reason="unknown_datum",
            )
        resource = self._resources.get(datum["resource"])
        if resource is None:
            raise FrameSourceError(
                f"datum {datum_id!r} refers to resource {datum['resource']!r}, "
                "which was never registered",
                reason="unknown_datum",
            )
        path, root = self._resource_location(resource)
        return FrameRef(
            kind="datum",
            key=datum_id,
            resource=resource["uid"],
            spec=resource["spec"],
            path=path,
            root=root,
        )

    def documents_for(self, ref: FrameRef) -> tuple[tuple[str, Mapping[str, Any]], ...]:
        """The ``(name, document)`` pairs another :class:`ExternalFrames` needs to read ``ref``.

        Lets a tagging process read a frame by reference: it registers these
        documents in its own instance (with the same options) and calls
        :meth:`read`. No file I/O.
        """
        if ref.kind == "datum":
            docs: list[tuple[str, Mapping[str, Any]]] = []
            resource = self._resources.get(ref.resource)
            if resource is not None:
                docs.append(("resource", resource))
            datum = self._datums.get(ref.key)
            if datum is not None:
                docs.append(("datum", datum))
            return tuple(docs)
        sres = self._stream_resources.get(ref.resource)
        return (("stream_resource", sres),) if sres is not None else ()

    def _frames_per_index(self, sres: Mapping[str, Any], descriptor_uid: str | None) -> int:
        multiplier = sres.get("parameters", {}).get("multiplier")
        if multiplier:
            return int(multiplier)
        descriptor = self._descriptors.get(descriptor_uid or "")
        if descriptor is not None:
            key = descriptor["data_keys"].get(sres["data_key"])
            # ophyd-async >= 0.10 describes images as [frames_per_event, H, W]
            # and counts stream_datum indices in events.
            if key is not None and len(key.get("shape") or ()) == 3:
                return int(key["shape"][0] or 1)
        return 1

    def stream_refs(self, stream_datum: Mapping[str, Any]) -> list[tuple[str, int, FrameRef]]:
        """Return ``(data_key, seq_num, ref)`` for each event a stream_datum covers.

        Index ``i`` of ``indices`` covers dataset rows ``[i * n, (i + 1) * n)``
        where ``n`` is the stream_resource ``multiplier`` parameter if present,
        else the leading axis of a 3-D descriptor shape (ophyd-async's
        ``[collections_per_event, H, W]``), else 1.  Register the descriptor
        first to get stacks right.  If ``seq_nums`` is empty, events are
        numbered ``index + 1``.

        Raises
        ------
        FrameSourceError
            ``reason="unknown_datum"`` if its stream_resource was never
            registered.
        """
        sres_uid = stream_datum["stream_resource"]
        sres = self._stream_resources.get(sres_uid)
        if sres is None:
            raise FrameSourceError(
                f"stream_datum {stream_datum.get('uid')!r} refers to stream_resource "
                f"{sres_uid!r}, which was never registered",
                reason="unknown_datum",
            )
        path = _remap_prefix(unquote(urlparse(sres["uri"]).path), self.root_map)[0]
        dataset = sres.get("parameters", {}).get("dataset", "")
        n = self._frames_per_index(sres, stream_datum.get("descriptor"))
        i0, i1 = stream_datum["indices"]["start"], stream_datum["indices"]["stop"]
        seq = stream_datum.get("seq_nums") or {}
        s0, s1 = seq.get("start", 0), seq.get("stop", 0)
        if s1 - s0 != i1 - i0:
            if s1 - s0:
                logger.warning(
                    "stream_datum %s covers %d indices but %d seq_nums; numbering "
                    "events index + 1",
                    stream_datum.get("uid"),
                    i1 - i0,
                    s1 - s0,
                )
            s0 = i0 + 1
        out = []
        for k, index in enumerate(range(i0, i1)):
            ref = FrameRef(
                kind="stream",
                key=stream_datum["uid"],
                resource=sres_uid,
                spec=sres["mimetype"],
                path=path,
                data_key=sres["data_key"],
                dataset=dataset,
                start=index * n,
                stop=(index + 1) * n,
            )
            out.append((sres["data_key"], s0 + k, ref))
        return out

    # ------------------------------------------------------------------ reading

    def _handler(self, ref: FrameRef) -> Any:
        with self._handler_lock:
            handler = self._handlers.get(ref.resource)
            if handler is not None:
                return handler
            cls = self._registry.get(ref.spec)
            if cls is None:
                raise FrameSourceError(
                    f"cannot read datum {ref.key}: no handler for spec {ref.spec!r} "
                    f"(known specs: {', '.join(sorted(self._registry))})",
                    reason="unknown_spec",
                )
            cls = _resolve(ref.spec, cls)
            kwargs = dict(self._resources[ref.resource].get("resource_kwargs") or {})
            if isinstance(cls, type) and issubclass(cls, SWMRHDF5Handler):
                kwargs["file_cache"] = self._files
            handler = cls(ref.path, **kwargs)
            self._handlers[ref.resource] = handler
            return handler

    def _read_stream(self, ref: FrameRef) -> Any:
        if ref.spec != HDF5_MIMETYPE:
            raise FrameSourceError(
                f"cannot read stream_datum {ref.key}: mimetype {ref.spec!r} is not "
                f"supported (only {HDF5_MIMETYPE!r})",
                reason="unknown_spec",
            )
        return self._files.read(ref.path, ref.dataset, ref.start, ref.stop)

    # ------------------------------------------------------------------ checks

    def _refuse(self, ref: FrameRef, path: str, reason: str, message: str) -> None:
        logger.warning("xsml refused to read %s for %s %s (resource %s): %s", path, ref.kind,
                       ref.key, ref.resource, message)
        raise FrameSourceError(message, reason=reason)

    def _contained(self, ref: FrameRef, path: str) -> str:
        """The real path of ``path`` if it stays where it must; else refuse."""
        real = os.path.realpath(path)
        if ref.root and not _within(real, os.path.realpath(ref.root)):
            self._refuse(ref, path, "outside_allowed_roots", "file outside its resource's root")
        if self.allowed_roots:
            if self._real_allowed is None:
                self._real_allowed = tuple(os.path.realpath(r) for r in self.allowed_roots)
            if not any(_within(real, root) for root in self._real_allowed):
                self._refuse(ref, path, "outside_allowed_roots", "file outside the allowed roots")
        return real

    def _check_file(self, ref: FrameRef, path: str) -> None:
        """Containment, then a regular file (``FileNotFoundError`` if missing: retried)."""
        real = self._contained(ref, path)
        mode = os.stat(real).st_mode
        if not stat.S_ISREG(mode):
            self._refuse(ref, path, "not_regular_file", "not a regular file")

    def _checked_read(self, ref: FrameRef) -> Any:
        """One read attempt: the checks, then the read (on the calling thread)."""
        if ref.kind == "stream":
            if ref.spec == HDF5_MIMETYPE:  # an unsupported mimetype is refused as such
                self._check_file(ref, ref.path)
            return self._read_stream(ref)
        handler = self._handler(ref)  # an unknown spec is refused as such
        datum_kwargs = self._datums[ref.key]["datum_kwargs"]
        if isinstance(handler, SWMRHDF5Handler):  # reads exactly ref.path
            self._check_file(ref, ref.path)
        else:  # a directory, a template or a user's handler: check the files it lists
            self._contained(ref, ref.path)
            list_files = getattr(handler, "get_file_list", None)
            files: list = []
            if list_files is not None:
                try:
                    files = list(list_files([datum_kwargs]))
                except Exception:  # a handler that cannot list still reads
                    logger.debug("%r cannot list its files", handler, exc_info=True)
            for name in files:
                self._check_file(ref, str(name))
        return handler(**datum_kwargs)

    def _bounded(self, ref: FrameRef, what: str) -> Any:
        """:meth:`_checked_read` on its own thread, abandoned after ``read_timeout``."""
        if self.read_timeout is None:
            return self._checked_read(ref)
        box: dict[str, Any] = {}
        done = threading.Event()

        def attempt() -> None:
            try:
                box["value"] = self._checked_read(ref)
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                box["error"] = err
            finally:
                done.set()

        threading.Thread(target=attempt, name="xsml-file-read", daemon=True).start()
        if not done.wait(self.read_timeout):
            logger.error("xsml: reading %s from %s did not finish within %g s; abandoned "
                         "(the thread is left behind)", what, ref.path, self.read_timeout)
            raise FrameSourceError(
                f"reading {what} did not finish within {self.read_timeout:g} s",
                reason="read_timeout",
            )
        if "error" in box:
            raise box["error"]
        return box["value"]

    def read(self, ref: FrameRef) -> np.ndarray:
        """Read the frames behind ``ref``; blocking, with bounded retries.

        Before each attempt the file is checked (module docstring): its real
        path must stay under the resource's root and the allowed roots, and it
        must be a regular file; a refused file is not retried. Missing files,
        files that cannot be opened (truncated, locked by a writer not in SWMR
        mode) and files that do not hold the frames yet are retried
        ``retries`` times, ``retry_delay`` seconds apart. HDF5 files stay open
        between reads; SWMR-format datasets are refreshed before every
        attempt, older-format files are reopened when too short.

        Returns
        -------
        numpy.ndarray
            ``(H, W)`` for one frame, ``(N, H, W)`` for a stack.

        Raises
        ------
        FrameSourceError
            With ``reason`` ``"missing_file"``, ``"truncated_file"`` (cannot
            be opened as its format, or holds fewer frames than the documents
            say), ``"unknown_spec"`` (no handler / unsupported mimetype),
            ``"outside_allowed_roots"``, ``"not_regular_file"``,
            ``"read_timeout"`` (none of these four retried) or
            ``"read_error"`` (anything else). Messages name the file by its
            base name only; the full path is logged.
        """
        import numpy as np

        what = (
            f"datum {ref.key} (spec {ref.spec!r})"
            if ref.kind == "datum"
            else f"stream_datum {ref.key} rows {ref.start}..{ref.stop - 1} of "
            f"{ref.dataset}"
        )
        attempts = self.retries + 1
        error: BaseException | None = None
        for attempt in range(attempts):
            if attempt:
                time.sleep(self.retry_delay)
            try:
                payload = self._bounded(ref, what)
                return _squeeze_single(np.asarray(payload))
            except FrameSourceError:
                raise
            except NotYetWritten as err:
                error = err
            except OSError as err:
                error = err
                if ref.kind == "stream" or ref.spec in _SINGLE_FILE_SPECS:
                    self._files.drop(ref.path)
                with self._handler_lock:
                    # Other handlers may cache a failed open: rebuild them.
                    stale = self._handlers.get(ref.resource)
                    if stale is not None and not isinstance(stale, SWMRHDF5Handler):
                        del self._handlers[ref.resource]
                    else:
                        stale = None
                if stale is not None and hasattr(stale, "close"):
                    close_quietly(stale)
            except Exception as err:  # handler bugs, bad dataset names, ...
                logger.warning("xsml: reading %s from %s failed", what, ref.path, exc_info=True)
                raise FrameSourceError(
                    f"cannot read {what} from {_short(ref.path)}: {type(err).__name__}: "
                    f"{_scrub(str(err))}",
                    reason="read_error",
                ) from err
        reason, detail = self._classify(ref, error)
        n = "attempt" if attempts == 1 else "attempts"
        logger.info("xsml: giving up on %s in %s: %s", what, ref.path, error)
        raise FrameSourceError(
            f"cannot read {what}: {detail} ({attempts} {n})", reason=reason
        ) from error

    def _classify(self, ref: FrameRef, error: BaseException | None) -> tuple[str, str]:
        text = _scrub(str(error))
        name = _short(ref.path)
        if isinstance(error, NotYetWritten):
            return "truncated_file", f"file {name} is short: {text}"
        single_file = ref.kind == "stream" or ref.spec in _SINGLE_FILE_SPECS
        if single_file and not os.path.exists(ref.path):
            return "missing_file", f"file {name} does not exist"
        if isinstance(error, FileNotFoundError):
            return "missing_file", f"file not found under {name}: {text}"
        if "truncated" in text or "signature" in text:
            return "truncated_file", f"file {name} is truncated or not HDF5: {text}"
        return "read_error", f"reading {name} failed: {type(error).__name__}: {text}"

    def forget(self) -> None:
        """Close open files and handlers; registered documents are kept."""
        with self._handler_lock:
            handlers, self._handlers = list(self._handlers.values()), {}
        for handler in handlers:
            close = getattr(handler, "close", None)
            if close is not None:
                close_quietly(handler)
        self._files.close()

    def __enter__(self) -> ExternalFrames:
        return self

    def __exit__(self, *exc: object) -> None:
        self.forget()
