"""Re-tagging stored runs with few, large requests, and reading and writing while tagging.

The per-run path (:func:`bluesky_xsml.catalog.append.retag_run` on
``catalog[uid]``) walks the run node by node: about 23 requests for a run of
one image stream (docs/scale-out.md, "Where a re-tag's time goes"). This
module does the same work in 7 requests per run, and keeps the model busy
while they are in flight:

* :func:`list_run_items` lists the runs with their metadata in pages of up to
  300 (one request per page); the items travel to the workers, so a worker
  neither looks a run up nor re-reads its metadata, and a run this checkpoint
  already tagged is skipped without any request.
* :func:`read_run` reads one run: one deep search (the run's streams, arrays
  and tables with their structure and data sources), one read of each
  stream's ``seq_num`` column and one read per image key of the whole stream
  (or slices of ``memory_budget`` bytes when it is larger). Frames stored in
  external HDF5 files under one of ``read_files_under`` are read from the
  files directly (:func:`direct_hdf5_reader`), the catalog only giving the
  metadata; other frames come over HTTP.
* :func:`retag_items` runs a three-stage pipeline: reader threads fetch the
  next runs while the calling thread tags the current one
  (:func:`bluesky_xsml.catalog.append.tag_run`), and a writer thread writes
  the finished tag streams (create the stream, create its table, one append,
  one stop patch: :func:`bluesky_xsml.catalog.append.append_tag_stream`).

The results are those of ``retag_run``: the same stream name, rows, stop
summary and ``xsml_by_model`` entry, idempotent per checkpoint, and a partial
stream left by a killed re-tag of the same checkpoint is removed and written
again.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np

from ..catalog.append import (
    FrameBlock,
    TagStreamExistsError,
    append_tag_stream,
    plain_container,
    read_rows,
    refreshed,
    tag_run,
    tagged_checkpoints,
)
from ..frames import find_image_keys
from ..readout import parse_readouts
from .retries import with_server_retries

__all__ = [
    "DirectReadRefused",
    "PreparedRun",
    "direct_hdf5_reader",
    "list_run_items",
    "read_run",
    "retag_items",
]

log = logging.getLogger(__name__)

#: Bytes of frames a worker holds for the runs it has read ahead (per run
#: read at once; larger streams are read in slices of this size).
DEFAULT_MEMORY_BUDGET = 256 * 2**20
_PAGE = 300  # tiled's largest page


class DirectReadRefused(Exception):
    """The frames of an array cannot (or may not) be read from its files; use HTTP."""


# ------------------------------------------------------------ listing
def list_run_items(catalog, *, since: float | None = None, until: float | None = None,
                   uids: Iterable[str] | None = None, checkpoint: str | None = None,
                   page_size: int = _PAGE) -> list[dict]:
    """The runs to re-tag as Tiled items (JSON-able dicts with metadata and links), oldest first.

    One request per ``page_size`` runs. With ``checkpoint``, runs already
    tagged by it are still listed (the worker reports them as skipped); the
    listing never reads frames.
    """
    from tiled.queries import Key

    node = catalog
    if since is not None:
        node = node.search(Key("start.time") >= float(since))
    if until is not None:
        node = node.search(Key("start.time") < float(until))
    wanted = None if uids is None else set(uids)
    out = []
    for key, client in node.items().page_size(int(page_size)):
        if wanted is None or key in wanted:
            out.append(dict(client.item))
    return out


# ------------------------------------------------------------ reading
def _get_json(context, link: str, params: Mapping[str, Any]) -> dict:
    from tiled.client.utils import handle_error

    return handle_error(context.http_client.get(
        link, params=dict(params), headers={"Accept": "application/json"})).json()


def _deep_items(context, run_item: Mapping) -> list[dict]:
    """Every node under the run (streams, their arrays and tables) in one request per 300."""
    link = run_item["links"].get("search_deep") or run_item["links"]["self"].replace(
        "/metadata/", "/search-deep/", 1)
    # only the data keys of each node's metadata: a stream's descriptor can carry large
    # configuration readings that re-tagging does not need
    common = {"max_depth": 2, "include_data_sources": True,
              "select_metadata": "{data_keys: data_keys}"}
    params: dict[str, Any] = {**common, "page[limit]": _PAGE}
    out: list[dict] = []
    while link:
        content = _get_json(context, link, params)
        out.extend(content["data"])
        link = content["links"].get("next")
        params = common
    return out


def _within(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def _checked_file(uri: str, roots: Sequence[Path]) -> Path:
    """The local file of ``uri``, if it is a regular file under one of ``roots``."""
    parsed = urlparse(uri)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
        raise DirectReadRefused(f"{uri!r} is not a local file")
    path = Path(unquote(parsed.path))
    if not path.is_absolute():
        raise DirectReadRefused(f"{uri!r} is not an absolute path")
    real = Path(os.path.realpath(path))  # symlinks and '..' resolved before the check
    if not _within(real, roots):
        raise DirectReadRefused(f"{str(path)!r} is not under the directories this worker may "
                                f"read ({', '.join(map(str, roots))})")
    try:
        mode = os.stat(real).st_mode
    except OSError as err:
        raise DirectReadRefused(f"cannot stat {str(path)!r}: {err}") from err
    if not stat.S_ISREG(mode):
        raise DirectReadRefused(f"{str(path)!r} is not a regular file")
    return real


_HDF5_PARAMETERS = {"dataset", "swmr", "locking", "libver"}


def direct_hdf5_reader(array_item: Mapping, roots: Sequence[str | os.PathLike]
                       ) -> Callable[[int, int], np.ndarray]:
    """A reader of rows ``lo:hi`` of an external HDF5 array, straight from its files.

    ``array_item`` is the array's Tiled item with its data sources
    (``include_data_sources``). Only what tiled's own HDF5 adapter would
    read is read: the data source's assets (``data_uris``, in order,
    concatenated along the first axis), its ``dataset``, reshaped to the
    array's structure; the dtype must match the structure's.

    Raises
    ------
    DirectReadRefused
        If the array is not one plain external HDF5 data source (a slice or
        squeeze parameter, several data sources, another format), or a file
        is not a regular file under one of ``roots`` (symlinks resolved).
        The caller reads over HTTP then.
    """
    if not roots:
        raise DirectReadRefused("no directories to read files from")
    sources = array_item["attributes"].get("data_sources") or []
    if len(sources) != 1:
        raise DirectReadRefused(f"{len(sources)} data sources")
    source = sources[0]
    if source.get("mimetype") != "application/x-hdf5":
        raise DirectReadRefused(f"mimetype {source.get('mimetype')!r}")
    params = dict(source.get("parameters") or {})
    if set(params) - _HDF5_PARAMETERS or not params.get("dataset"):
        raise DirectReadRefused(f"parameters {sorted(params)!r}")
    assets = [a for a in source.get("assets") or [] if a.get("parameter") == "data_uris"]
    if not assets:
        raise DirectReadRefused("no data_uris assets")
    assets.sort(key=lambda a: a.get("num") or 0)
    resolved = [Path(r).resolve() for r in roots]
    files = [_checked_file(a["data_uri"], resolved) for a in assets]
    structure = source["structure"]
    shape = tuple(int(n) for n in array_item["attributes"]["structure"]["shape"])
    try:
        from tiled.structures.array import BuiltinDtype

        dtype = BuiltinDtype.from_json(structure["data_type"]).to_numpy_dtype()
    except Exception as err:  # a structured dtype, say: not ours to read
        raise DirectReadRefused(f"data type {structure.get('data_type')!r}: {err}") from err
    dataset = str(params["dataset"])
    swmr = bool(params.get("swmr", True))

    def read(lo: int, hi: int) -> np.ndarray:
        import h5py

        per_row = math.prod(shape[1:])
        parts = []
        offset = 0  # in first-axis units of the files
        want_lo, want_hi = lo * per_row, hi * per_row  # in elements
        for path in files:
            with h5py.File(path, "r", swmr=swmr, locking=False) as f:
                ds = f[dataset]
                if ds.dtype != dtype:
                    raise ValueError(f"{path}: dtype {ds.dtype} != the catalog's {dtype}")
                row = math.prod(ds.shape[1:]) or 1
                n = int(ds.shape[0]) * row
                a, b = max(want_lo, offset), min(want_hi, offset + n)
                if a < b:
                    if a % row or b % row:
                        raise DirectReadRefused("rows do not align with the file's frames")
                    parts.append(np.asarray(ds[(a - offset) // row:(b - offset) // row]))
                offset += n
        flat = np.concatenate([p.reshape(-1) for p in parts]) if parts else np.zeros(0, dtype)
        if flat.size != (hi - lo) * per_row:
            raise ValueError(f"the files hold {offset} values, the catalog's shape {shape} "
                             f"needs rows {lo}:{hi}")
        return flat.reshape((hi - lo, *shape[1:]))

    return read


@dataclass
class PreparedRun:
    """One run read ahead: its item, the frame blocks to tag, or why it needs no tagging."""

    item: dict
    blocks: list = field(default_factory=list)
    status: str = "ready"        # "ready", "skipped" or "error"
    reason: str = ""
    bytes_read: int = 0
    direct: int = 0              # blocks read from files
    seconds: float = 0.0


class _Block:
    """The frames of one (stream, key), read at once or in budget-sized slices."""

    def __init__(self, http_read: Callable[[int, int], np.ndarray],
                 direct_read: Callable[[int, int], np.ndarray] | None,
                 n: int, row_bytes: int, budget: int):
        self.http_read, self.direct_read = http_read, direct_read
        self.n, self.step = n, max(1, budget // max(1, row_bytes))
        self.cache: tuple[int, int, Any] | None = None
        self.bytes = 0
        self.direct_used = False

    def _fetch(self, lo: int, hi: int):
        if self.direct_read is not None:
            try:
                out = self.direct_read(lo, hi)
                self.direct_used = True
                return out
            except DirectReadRefused as err:
                log.info("reading over HTTP: %s", err)
                self.direct_read = None
            except Exception as err:  # noqa: BLE001 - a broken file: the server's read decides
                log.warning("direct read failed (%r); reading over HTTP", err)
                self.direct_read = None
        return self.http_read(lo, hi)

    def load(self, lo: int, hi: int) -> None:
        try:
            value = self._fetch(lo, hi)
            self.bytes += int(getattr(value, "nbytes", 0))
        except Exception as err:  # noqa: BLE001 - kept; read row by row on failure
            value = err
        self.cache = (lo, hi, value)

    def rows(self, lo: int, hi: int, fallback: Callable[[int, int], list]) -> list:
        if self.cache is None or not (self.cache[0] <= lo and hi <= self.cache[1]):
            start = lo - lo % self.step
            self.load(start, min(self.n, max(hi, start + self.step)))
        c_lo, _, value = self.cache
        if isinstance(value, Exception):
            return fallback(lo, hi)
        return [value[i - c_lo] for i in range(lo, hi)]


def read_run(catalog, item: Mapping, checkpoint: str, *, stream_name: str | None = None,
             image_keys: Sequence[str] | None = None, streams: Sequence[str] | None = None,
             read_files_under: Sequence[str | os.PathLike] = (),
             memory_budget: int = DEFAULT_MEMORY_BUDGET) -> PreparedRun:
    """Read one run for tagging (see the module docstring); no request if it is already tagged."""
    from tiled.client.utils import client_for_item


    t0 = time.perf_counter()
    item = dict(item)
    md = item["attributes"]["metadata"]
    done = tagged_checkpoints(md)
    if checkpoint in done:
        return PreparedRun(item, status="skipped",
                           reason=f"already tagged by {checkpoint} in stream {done[checkpoint]!r}")
    if not md.get("stop"):
        return PreparedRun(item, status="error",
                           reason=f"run {md['start']['uid']} has no stop document (still "
                                  "running, or aborted without one); tag it after it has finished")
    context, clients = catalog.context, catalog.structure_clients
    nodes = _deep_items(context, item)
    run_depth = len(item["attributes"]["ancestors"]) + 1
    children: dict[str, dict[str, dict]] = {}
    stream_items: dict[str, dict] = {}
    for node in nodes:
        anc = node["attributes"]["ancestors"]
        if len(anc) == run_depth:
            stream_items[node["id"]] = node
        elif len(anc) == run_depth + 1:
            children.setdefault(anc[-1], {})[node["id"]] = node
    wanted = None if streams is None else set(streams)
    prepared = PreparedRun(item)
    for stream in sorted(stream_items):
        if stream.startswith("xsml_tags") or (wanted is not None and stream not in wanted):
            continue
        snode = stream_items[stream]
        if "BlueskyEventStream" not in {s["name"] for s in snode["attributes"]["specs"]}:
            continue
        meta = (snode["attributes"].get("metadata") or {}).get("selected") or {}
        keys = [k for k in find_image_keys({"data_keys": meta.get("data_keys") or {}},
                                           image_keys)
                if k in children.get(stream, {}) and len(
                    children[stream][k]["attributes"]["structure"]["shape"]) >= 3]
        if not keys:
            continue
        table = children[stream].get("internal")
        if table is None:
            raise ValueError(f"stream {stream!r} has no 'internal' table with seq_num")
        seq = client_for_item(context, clients, table).read(["seq_num"])["seq_num"]
        seq_all = [int(s) for s in np.asarray(seq)]
        for key in keys:
            aitem = children[stream][key]
            array = client_for_item(context, clients, aitem)
            shape = tuple(aitem["attributes"]["structure"]["shape"])
            n = min(int(shape[0]), len(seq_all))
            direct = None
            if read_files_under:
                try:
                    direct = direct_hdf5_reader(aitem, list(read_files_under))
                except DirectReadRefused as err:
                    log.info("run %s %s/%s over HTTP: %s", md["start"]["uid"], stream, key, err)
            row_bytes = math.prod(shape[1:]) * np.dtype(array.dtype).itemsize
            block = _Block(lambda lo, hi, a=array: np.asarray(a.read(slice=np.s_[lo:hi])),
                           direct, n, row_bytes, memory_budget)
            if n:
                block.load(0, min(n, block.step))  # read ahead, here in the reader thread
            prepared.blocks.append(FrameBlock(
                stream, key, seq_all[:n],
                lambda lo, hi, b=block, a=array: b.rows(lo, hi, lambda x, y: read_rows(a, x, y))))
            prepared.bytes_read += block.bytes
            prepared.direct += int(block.direct_used)
    prepared.seconds = time.perf_counter() - t0
    return prepared


# ------------------------------------------------------------ the pipeline
def _run_client(catalog, item: Mapping):
    from tiled.client.utils import client_for_item


    return plain_container(client_for_item(catalog.context, catalog.structure_clients, dict(item)))


def _write(catalog, item: Mapping, tagged, *, make_current: bool, stream_name: str | None,
           retries: int) -> dict:
    """Write a tagged run; a partial stream of an interrupted re-tag is replaced."""

    base = _run_client(catalog, item)
    md = item["attributes"]["metadata"]
    uid = md["start"]["uid"]

    def write(metadata):
        append_tag_stream(base, tagged.descriptor, tagged.pages, tagged.summary,
                          make_current=make_current, metadata=metadata,
                          descriptor_validated=True)

    row: dict[str, Any] = {}
    try:
        with_server_retries(lambda: write(md), retries=retries, what=f"writing run {uid}")
    except TagStreamExistsError:
        fresh = refreshed(base)
        done = tagged_checkpoints(fresh.metadata)
        if tagged.checkpoint in done:  # another re-tag got there first
            return {"status": "skipped", "frames": 0, "stream": done[tagged.checkpoint],
                    "reason": f"already tagged by {tagged.checkpoint}"}
        if stream_name is not None:  # a name the user chose may not be ours
            raise
        log.warning("run %s: removing the partial stream %r of an interrupted re-tag", uid,
                    tagged.stream)
        fresh.delete_contents(tagged.stream, recursive=True, external_only=False)
        with_server_retries(lambda: write(fresh.metadata), retries=retries,
                            what=f"writing run {uid}")
        row["repaired"] = tagged.stream
    return {"status": "tagged", "stream": tagged.stream, "checkpoint": tagged.checkpoint,
            "frames": tagged.frames, "skipped": tagged.summary["xsml_skipped"],
            "tag_counts": tagged.summary["xsml_tag_counts"], **row}


def retag_items(catalog, items: Iterable[Mapping], tagger, *, stream_name: str | None = None,
                batch_size: int = 16, make_current: bool = True, beam_center=None,
                readout=None, image_keys: Sequence[str] | None = None,
                streams: Sequence[str] | None = None,
                read_files_under: Sequence[str | os.PathLike] = (),
                memory_budget: int = DEFAULT_MEMORY_BUDGET, prefetch: int = 2,
                threads_io: int = 1, retries: int = 2,
                on_row: Callable[[dict], None] | None = None) -> tuple[list[dict], dict]:
    """Re-tag the runs ``items`` (from :func:`list_run_items`): read ahead, tag, write behind.

    Parameters
    ----------
    catalog : CatalogOfBlueskyRuns
        The runs container the items come from (its HTTP client is shared by
        the reader and writer threads).
    items : iterable of dict
    tagger : Tagger
    stream_name, batch_size, make_current, beam_center, readout, image_keys, streams
        As for :func:`~bluesky_xsml.catalog.append.retag_run` (each run's
        start metadata ``xsml_readout`` is the default readout).
    read_files_under : sequence of path
        Directories whose external HDF5 frames this process reads itself.
    memory_budget : int
        Bytes of frames read at once per image key.
    prefetch : int
        Runs read ahead of the one being tagged, and written behind it.
    threads_io : int
        Reader threads.
    retries : int
        Retries after a server error (HTTP 5xx), per read and per write.
    on_row : callable, optional
        Called with each run's row as soon as it is final.

    Returns
    -------
    rows, stats
        One dict per run (``run``, ``status``, ``frames``, ``seconds``, ...,
        as ``retag_runs_task`` reports them) in the order of ``items``, and
        the seconds spent per stage (``read_s``, ``tag_s``, ``write_s``,
        ``wait_read_s``, ``wait_write_s``), ``bytes_read`` and
        ``direct_blocks``.

    Raises
    ------
    ConfigurationError
        If ``readout`` is malformed (before any run is read).
    """

    if readout is not None:
        readout = parse_readouts(readout, "readout")  # refused before any run is read
    items = list(items)
    checkpoint = tagger.checkpoint_id
    stats = {"read_s": 0.0, "tag_s": 0.0, "write_s": 0.0, "wait_read_s": 0.0,
             "wait_write_s": 0.0, "bytes_read": 0, "direct_blocks": 0}
    lock = threading.Lock()
    rows: list[dict | None] = [None] * len(items)
    t_start: list[float] = [0.0] * len(items)

    def finish(i: int, row: dict) -> None:
        row = {"run": _uid(items[i]), **row}
        row["seconds"] = time.perf_counter() - t_start[i]
        row["worker_pid"] = os.getpid()
        rows[i] = row
        if on_row is not None:
            on_row(row)

    def read(i: int) -> PreparedRun:
        t_start[i] = time.perf_counter()
        out = with_server_retries(
            lambda: read_run(catalog, items[i], checkpoint, stream_name=stream_name,
                             image_keys=image_keys, streams=streams,
                             read_files_under=read_files_under, memory_budget=memory_budget),
            retries=retries, what=f"reading run {_uid(items[i])}")
        with lock:
            stats["read_s"] += out.seconds
            stats["bytes_read"] += out.bytes_read
            stats["direct_blocks"] += out.direct
        return out

    def write(i: int, tagged) -> dict:
        t0 = time.perf_counter()
        try:
            return _write(catalog, items[i], tagged, make_current=make_current,
                          stream_name=stream_name, retries=retries)
        finally:
            with lock:
                stats["write_s"] += time.perf_counter() - t0

    readers = ThreadPoolExecutor(max(1, threads_io), thread_name_prefix="retag-read")
    writer = ThreadPoolExecutor(1, thread_name_prefix="retag-write")
    reads: deque[tuple[int, Future]] = deque()
    writes: deque[tuple[int, Future]] = deque()
    todo = iter(range(len(items)))

    def collect_write() -> None:
        i, fut = writes.popleft()
        t0 = time.perf_counter()
        try:
            row = fut.result()
        except Exception as err:
            log.exception("writing run %s failed", _uid(items[i]))
            row = {"status": "error", "frames": 0, "error": f"{type(err).__name__}: {err}"}
        stats["wait_write_s"] += time.perf_counter() - t0
        finish(i, row)

    try:
        for i in todo:
            reads.append((i, readers.submit(read, i)))
            if len(reads) > prefetch:
                break
        while reads:
            i, fut = reads.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                reads.append((nxt, readers.submit(read, nxt)))
            t0 = time.perf_counter()
            try:
                prepared = fut.result()
            except Exception as err:
                log.exception("reading run %s failed", _uid(items[i]))
                prepared = PreparedRun(dict(items[i]), status="error",
                                       reason=f"{type(err).__name__}: {err}")
            stats["wait_read_s"] += time.perf_counter() - t0
            if prepared.status == "skipped":
                finish(i, {"status": "skipped", "frames": 0, "reason": prepared.reason})
                continue
            if prepared.status == "error":
                finish(i, {"status": "error", "frames": 0, "error": prepared.reason})
                continue
            t0 = time.perf_counter()
            try:
                tagged = tag_run(prepared.item["attributes"]["metadata"], tagger,
                                 prepared.blocks, stream_name=stream_name,
                                 batch_size=batch_size, beam_center=beam_center,
                                 readout=readout)
            except Exception as err:
                log.exception("tagging run %s failed", _uid(items[i]))
                finish(i, {"status": "error", "frames": 0,
                           "error": f"{type(err).__name__}: {err}"})
                continue
            finally:
                stats["tag_s"] += time.perf_counter() - t0
            prepared.blocks = []  # the frames are no longer needed
            writes.append((i, writer.submit(write, i, tagged)))
            while len(writes) > prefetch:
                collect_write()
        while writes:
            collect_write()
    finally:
        for _, fut in reads:
            fut.cancel()
        readers.shutdown(wait=True)
        writer.shutdown(wait=True)
    return [r for r in rows if r is not None], stats


def _uid(item: Mapping) -> str:
    return str(item.get("id") or item["attributes"]["metadata"]["start"]["uid"])
