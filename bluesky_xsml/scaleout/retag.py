"""Re-tag stored runs with a (new) model on a Dask cluster: ``xsml retag``.

::

    xsml retag --catalog http://tiled:8000?api_key=... --since 2026-11-01 \\
               --model new.pt --scheduler tcp://dask-scheduler:8786
    xsml retag --catalog http://127.0.0.1:8000?api_key=... --workers 2   # a LocalCluster

The driver lists the runs to tag with their metadata (a Tiled query on
``start.time``, pages of 300 runs per request), then sends them in groups to
``dask.distributed`` workers (a ``LocalCluster`` of worker processes when no
scheduler is given; GPU workers where a site has them: each worker runs the
tagger on its own device). Each worker opens the catalog over HTTP, loads the
model once and runs its group through the pipeline of
:mod:`bluesky_xsml.scaleout.batched`: about 7 requests per run (one deep
search for the run's layout, ``seq_num``, the frames of a stream in one read,
and four writes), the next runs read while one is tagged, the tag streams
written behind. Frames in external HDF5 files under ``--read-files-under``
are read from the files directly.

Re-tagging is idempotent and resumable: a run already tagged with the same
checkpoint is skipped (without a request: the listing carries the metadata),
so running the same command again after an interruption (Ctrl-C, a lost
worker, a killed job) tags only what is left; a partial stream that a killed
re-tag of the same checkpoint left is removed and written again. At most
``in_flight`` groups are queued on the cluster at any time, so an
interruption wastes little work and a very large catalog does not flood the
scheduler.

Examples
--------
>>> from bluesky_xsml.scaleout.retag import parse_time
>>> parse_time("2026-11-01")
1793491200.0
>>> parse_time("1793491200")
1793491200.0
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .retries import is_server_error, with_server_retries  # noqa: F401 (re-exported)

__all__ = [
    "Progress",
    "RetagReport",
    "add_arguments",
    "main",
    "parse_time",
    "retag_catalog",
    "retag_runs_task",
    "select_runs",
]

log = logging.getLogger(__name__)


def parse_time(text: str | float | None) -> float | None:
    """A UNIX time from ``"YYYY-MM-DD[THH:MM[:SS]]"`` (UTC unless it says otherwise) or seconds.

    Raises
    ------
    ValueError
        If ``text`` is neither.
    """
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        return float(text)
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(str(text))
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a time: give YYYY-MM-DD, an ISO 8601 "
                         "date-time or UNIX seconds") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def select_runs(catalog, *, since: float | None = None, until: float | None = None,
                uids: Iterable[str] | None = None) -> list[str]:
    """Uids of the runs to re-tag, oldest first.

    Parameters
    ----------
    catalog : CatalogOfBlueskyRuns
    since, until : float, optional
        Bounds on the start time (UNIX seconds; ``until`` exclusive).
    uids : iterable of str, optional
        Only these runs (still filtered by time).
    """
    from tiled.queries import Key

    node = catalog
    if since is not None:
        node = node.search(Key("start.time") >= float(since))
    if until is not None:
        node = node.search(Key("start.time") < float(until))
    found = list(node)  # keys in the catalog's order (by creation)
    if uids is not None:
        wanted = set(uids)
        found = [u for u in found if u in wanted]
    return found


# ------------------------------------------------------------ worker side
_CACHE: dict[Any, Any] = {}
_CACHE_LOCK = threading.Lock()


def _cached(key, make: Callable[[], Any]):
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = make()
        return _CACHE[key]


def _load_tagger(model: Any, threads: int | None):
    """The tagger for ``model`` (a checkpoint path, ``None``, or a checkpoint dict), cached."""
    from ..inference.tagger import Tagger

    if isinstance(model, Mapping):
        key = ("tagger", str(model.get("metadata", {}).get("checkpoint_id")))
        def make():
            return Tagger.from_checkpoint_dict(dict(model), source="<scattered>")
    else:
        key = ("tagger", str(model))
        def make():
            return Tagger.load(model)
    tagger = _cached(key, make)
    if threads:
        import torch

        torch.set_num_threads(int(threads))
        tagger.set_num_threads(int(threads))
    return tagger


#: Public name of the per-process cached loader (benchmarks warm the cache retag uses).
load_tagger = _load_tagger


def _open(catalog_uri: str, container: str | None):
    from ..catalog.embedded import connect

    return _cached(("catalog", catalog_uri, container),
                   lambda: connect(catalog_uri, container=container))


def retag_runs_task(catalog_uri: str, runs: Sequence[str | Mapping], model: Any, *,
                    container: str | None = "raw", stream_name: str | None = None,
                    threads: int | None = 1, options: Mapping[str, Any] | None = None,
                    retries: int = 2, read_files_under: Sequence[str] = (),
                    prefetch: int = 2) -> list[dict]:
    """Re-tag ``runs`` (uids, or items from the driver's listing); runs on a Dask worker.

    The runs go through :func:`bluesky_xsml.scaleout.batched.retag_items`:
    the next runs are read while one is tagged and the previous ones are
    written. Returns one JSON-able dict per run: ``run``, ``status``
    (``"tagged"``, ``"skipped"`` or ``"error"``), ``frames``, ``seconds``,
    the stream written, ``repaired`` when a partial stream of an interrupted
    re-tag was replaced, and the pipeline's stage times in the first row
    (``stats``). A run that fails is reported, not raised, so one bad run does
    not stop the rest. A server error (HTTP 5xx) is retried up to ``retries``
    times per read and per write.
    """
    from .batched import retag_items

    catalog = _open(catalog_uri, container)
    tagger = _load_tagger(model, threads)
    items = [dict(r) if isinstance(r, Mapping) else dict(catalog[str(r)].item) for r in runs]
    opts = dict(options or {})
    rows, stats = retag_items(catalog, items, tagger, stream_name=stream_name,
                              read_files_under=list(read_files_under), prefetch=prefetch,
                              retries=retries, **opts)
    if rows:
        rows[0]["stats"] = {k: round(v, 4) if isinstance(v, float) else v
                            for k, v in stats.items()}
    return rows


# ------------------------------------------------------------ driver side
@dataclass
class RetagReport:
    """What one ``retag_catalog`` call did."""

    runs: int = 0
    tagged: int = 0
    skipped: int = 0
    errors: int = 0
    frames: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    rows: list[dict] = field(default_factory=list)

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else math.nan

    def to_dict(self) -> dict:
        return {"runs": self.runs, "tagged": self.tagged, "skipped": self.skipped,
                "errors": self.errors, "frames": self.frames,
                "seconds": round(self.seconds, 3),
                "frames_per_second": round(self.frames_per_second, 2)
                if self.frames else 0.0, "interrupted": self.interrupted}


def retag_catalog(catalog_uri: str, *, model: Any = None, container: str | None = "raw",
                  since: float | str | None = None, until: float | str | None = None,
                  uids: Iterable[str] | None = None, scheduler: str | Any | None = None,
                  n_workers: int = 1, threads_per_worker: int = 1,
                  runs_per_task: int = 16, in_flight: int | None = None,
                  stream_name: str | None = None, limit: int | None = None,
                  progress: bool = False, options: Mapping[str, Any] | None = None,
                  read_files_under: Sequence[str | os.PathLike] = (), prefetch: int = 2,
                  progress_file=None, model_threads: int | None = None) -> RetagReport:
    """Re-tag the stored runs of a catalog on a Dask cluster.

    Parameters
    ----------
    catalog_uri : str
        The Tiled server (``http(s)://...``, an ``?api_key=`` is passed on to
        the workers, which connect themselves).
    model : str, path, Tagger or None
        A checkpoint path readable by every worker, a :class:`Tagger` (its
        checkpoint is broadcast to the workers), or ``None`` for the packaged
        default model.
    container : str or None
        The ``CatalogOfBlueskyRuns`` container (``None``: the URI points at it).
    since, until : float or str, optional
        Start-time bounds (see :func:`parse_time`).
    uids : iterable of str, optional
        Only these runs.
    scheduler : str or distributed.Client, optional
        ``tcp://host:8786`` of a running scheduler, or a ``Client``. Default:
        a ``LocalCluster`` of ``n_workers`` processes with
        ``threads_per_worker`` threads each, closed at the end.
    runs_per_task : int
        Runs per Dask task. A task is a pipeline (read ahead, tag, write
        behind) over its runs, so larger tasks keep the model busier; smaller
        ones lose less work to a killed worker.
    in_flight : int, optional
        Most tasks queued at once (default: 2 per worker thread).
    stream_name : str, optional
        Passed to ``retag_run`` (default: its versioned naming).
    limit : int, optional
        Tag at most this many runs in this call (the rest on the next call).
    progress : bool
        Show progress on standard error (runs done, frames/s, ETA).
    options : dict, optional
        More keyword options for
        :func:`~bluesky_xsml.scaleout.batched.retag_items` (``batch_size``,
        ``make_current``, ``memory_budget``, ``threads_io``, ``readout``, ...).
        Without ``readout`` each run's start metadata ``xsml_readout`` (if any)
        turns its frames into counts.
    read_files_under : sequence of path
        Directories whose external (HDF5) frame files the workers read
        themselves instead of through the server; a file elsewhere, or not a
        regular file, is read over HTTP.
    prefetch : int
        Runs each worker reads ahead (and writes behind).
    progress_file : file, optional
        Where progress goes (default: standard error).
    model_threads : int, optional
        Torch threads of each worker's model (default ``threads_per_worker``).

    Returns
    -------
    RetagReport
    """
    from distributed import Client, LocalCluster, as_completed

    from ..catalog.embedded import connect
    from .batched import list_run_items

    if runs_per_task < 1:
        raise ValueError(f"runs_per_task must be >= 1, got {runs_per_task}")
    t0 = time.perf_counter()
    catalog = connect(catalog_uri, container=container)
    todo = list_run_items(catalog, since=parse_time(since), until=parse_time(until), uids=uids)
    if limit is not None:
        todo = todo[:int(limit)]
    report = RetagReport(runs=len(todo))
    groups = [todo[i:i + runs_per_task] for i in range(0, len(todo), runs_per_task)]
    roots = [os.fspath(p) for p in read_files_under]

    cluster = None
    own_client = not hasattr(scheduler, "submit")
    if scheduler is None:
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker,
                               processes=True, dashboard_address=None)
        client = Client(cluster)
    elif own_client:
        client = Client(scheduler)
    else:
        client = scheduler
    bar = Progress(len(todo), file=progress_file) if progress else None
    try:
        model_arg = model
        if model is not None and hasattr(model, "checkpoint_dict"):
            model_arg = client.scatter(model.checkpoint_dict(), broadcast=True)
        elif model is not None:
            model_arg = os.fspath(model)
        nthreads = sum(client.nthreads().values()) or 1
        window = in_flight or 2 * nthreads
        pending = iter(groups)

        def submit(group):
            return client.submit(retag_runs_task, catalog_uri, group, model_arg,
                                 container=container, stream_name=stream_name,
                                 threads=model_threads or threads_per_worker, options=options,
                                 read_files_under=roots, prefetch=prefetch, pure=False)

        futures = as_completed([submit(g) for _, g in zip(range(window), pending, strict=False)])
        for future in futures:
            for row in future.result():
                report.rows.append(row)
                status = row.get("status")
                if status == "tagged":
                    report.tagged += 1
                    report.frames += int(row.get("frames") or 0)
                elif status == "skipped":
                    report.skipped += 1
                else:
                    report.errors += 1
            if bar is not None:
                bar.update(report)
            nxt = next(pending, None)
            if nxt is not None:
                futures.add(submit(nxt))
    except KeyboardInterrupt:
        report.interrupted = True
        log.warning("re-tag interrupted; run the same command again to continue")
    finally:
        if bar is not None:
            bar.close(report)
        if own_client:
            client.close()
        if cluster is not None:
            cluster.close()
    report.seconds = time.perf_counter() - t0
    return report


class Progress:
    """One line of progress on a terminal (or a line per update elsewhere): runs, frames/s, ETA.

    >>> import io
    >>> out = io.StringIO()
    >>> p = Progress(10, file=out, clock=iter([0.0, 2.0, 2.0]).__next__)
    >>> p.update(RetagReport(runs=10, tagged=4, frames=16))
    >>> print(out.getvalue().strip())
    retag: 4/10 runs (4 tagged, 0 skipped, 0 errors), 16 frames, 8.0 frames/s, ETA 3 s
    """

    def __init__(self, total: int, *, file=None, clock: Callable[[], float] = time.monotonic):
        self.total, self.file, self.clock = total, file or sys.stderr, clock
        self.t0 = clock()
        self.tty = bool(getattr(self.file, "isatty", lambda: False)())

    def line(self, report: RetagReport) -> str:
        done = report.tagged + report.skipped + report.errors
        elapsed = max(1e-9, self.clock() - self.t0)
        fps = report.frames / elapsed
        rate = done / elapsed
        eta = (self.total - done) / rate if rate > 0 else math.inf
        eta_text = "?" if not math.isfinite(eta) else (
            f"{eta:.0f} s" if eta < 120 else f"{eta / 60:.0f} min" if eta < 7200
            else f"{eta / 3600:.1f} h")
        return (f"retag: {done}/{self.total} runs ({report.tagged} tagged, {report.skipped} "
                f"skipped, {report.errors} errors), {report.frames} frames, {fps:.1f} frames/s, "
                f"ETA {eta_text}")

    def update(self, report: RetagReport) -> None:
        text = self.line(report)
        self.file.write(("\r" + text) if self.tty else text + "\n")
        self.file.flush()

    def close(self, report: RetagReport) -> None:
        if self.tty:
            self.file.write("\n")
            self.file.flush()


# ------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--catalog", required=True, metavar="URI",
                        help="Tiled server with the runs (http(s)://...?api_key=...)")
    parser.add_argument("--container", default="raw",
                        help="CatalogOfBlueskyRuns container (default: raw)")
    parser.add_argument("--since", help="runs started at or after (YYYY-MM-DD, ISO or UNIX s)")
    parser.add_argument("--until", help="runs started before (same forms)")
    parser.add_argument("--model", metavar="CKPT",
                        help="checkpoint every worker can read (default: packaged model)")
    parser.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                        help="a running Dask scheduler (default: a LocalCluster)")
    parser.add_argument("--workers", type=int, default=1,
                        help="LocalCluster worker processes (default 1)")
    parser.add_argument("--threads-per-worker", type=int, default=1,
                        help="threads of each LocalCluster worker (default 1)")
    parser.add_argument("--runs-per-task", type=int, default=16,
                        help="runs per Dask task, pipelined inside it (default 16)")
    parser.add_argument("--prefetch", type=int, default=2,
                        help="runs each worker reads ahead and writes behind (default 2)")
    parser.add_argument("--read-files-under", action="append", default=[], metavar="DIR",
                        help="read external HDF5 frame files under DIR directly (repeatable); "
                             "other frames come over HTTP")
    parser.add_argument("--stream-name", default=None,
                        help="tag stream name (default: retag_run's versioned name)")
    parser.add_argument("--limit", type=int, default=None,
                        help="tag at most this many runs now (continue later)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--readout", default=None, metavar="JSON",
                        help="a detector readout (JSON) for every run, replacing each "
                             "run's own, e.g. '{\"gain\": 3.6, \"offset\": 100, "
                             "\"saturated_value\": 65535}' (default: each run's start "
                             "metadata xsml_readout, if any)")


def main(args: argparse.Namespace) -> int:
    import json

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        since, until = parse_time(args.since), parse_time(args.until)
    except ValueError as err:
        print(f"xsml retag: {err}", file=sys.stderr)
        return 2
    options = {}
    if getattr(args, "readout", None):
        from ..readout import readout_option

        try:
            options["readout"] = {key: r.to_dict() for key, r in
                                  readout_option(args.readout).items()}
        except ValueError as err:  # ConfigurationError
            print(f"xsml retag: {err}", file=sys.stderr)
            return 2
    report = retag_catalog(args.catalog, model=args.model, container=args.container or None,
                           since=since, until=until, scheduler=args.scheduler,
                           n_workers=args.workers, threads_per_worker=args.threads_per_worker,
                           runs_per_task=args.runs_per_task, stream_name=args.stream_name,
                           limit=args.limit, progress=not args.no_progress,
                           read_files_under=args.read_files_under, prefetch=args.prefetch,
                           options=options or None)
    for row in report.rows:
        if row.get("status") == "error":
            print(f"xsml retag: run {row['run']}: {row.get('error')}", file=sys.stderr)
    print(json.dumps(report.to_dict()))
    if report.interrupted:
        return 130
    return 1 if report.errors else 0
