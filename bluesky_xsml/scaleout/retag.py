"""Re-tag stored runs with a (new) model on a Dask cluster: ``xsml retag``.

::

    xsml retag --catalog http://tiled:8000?api_key=... --since 2026-11-01 \\
               --model new.pt --scheduler tcp://dask-scheduler:8786
    xsml retag --catalog http://127.0.0.1:8000?api_key=... --workers 2   # a LocalCluster

The driver lists the runs to tag (a Tiled query on ``start.time``), then
sends them in small groups to ``dask.distributed`` workers (a ``LocalCluster``
of worker processes when no scheduler is given; GPU workers where a site has
them: each worker runs the tagger on its own device). Each worker opens the
catalog over HTTP, loads the model once, reads each run's frames lazily from
Tiled, tags them in batches and writes a new tag stream into the run with
:func:`bluesky_xsml.catalog.append.retag_run`.

Re-tagging is idempotent and resumable: ``retag_run`` skips a run already
tagged with the same checkpoint, so running the same command again after an
interruption (Ctrl-C, a lost worker, a killed job) tags only what is left.
At most ``in_flight`` groups are queued on the cluster at any time, so an
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

__all__ = [
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
        make = lambda: Tagger.from_checkpoint_dict(dict(model), source="<scattered>")
    else:
        key = ("tagger", str(model))
        make = lambda: Tagger.load(model)
    tagger = _cached(key, make)
    if threads:
        import torch

        torch.set_num_threads(int(threads))
        tagger.set_num_threads(int(threads))
    return tagger


def _open(catalog_uri: str, container: str | None):
    from ..catalog.embedded import connect

    return _cached(("catalog", catalog_uri, container),
                   lambda: connect(catalog_uri, container=container))


def retag_runs_task(catalog_uri: str, uids: Sequence[str], model: Any, *,
                    container: str | None = "raw", stream_name: str | None = None,
                    threads: int | None = 1, options: Mapping[str, Any] | None = None,
                    retries: int = 2) -> list[dict]:
    """Re-tag ``uids`` (runs one after another); runs on a Dask worker.

    Returns one JSON-able dict per run: ``run``, ``status`` (``"tagged"``,
    ``"skipped"`` or ``"error"``), ``frames``, ``seconds`` and, from
    :func:`~bluesky_xsml.catalog.append.retag_run`, the stream written. A run
    that fails is reported, not raised, so one bad run does not stop the rest.
    A server error (HTTP 5xx) is retried up to ``retries`` times: the
    embedded catalog's table storage (DuckDB) fails now and then when several
    processes append at once.
    """
    catalog = _open(catalog_uri, container)
    tagger = _load_tagger(model, threads)
    out = []
    for uid in uids:
        t0 = time.perf_counter()
        try:
            row = {"run": uid, **with_server_retries(
                lambda uid=uid: _retag_one(catalog[uid], tagger, stream_name, dict(options or {})),
                retries=retries, what=f"re-tagging run {uid}")}
        except Exception as err:  # reported per run; the others go on
            log.exception("re-tagging run %s failed", uid)
            row = {"run": uid, "status": "error", "frames": 0,
                   "error": f"{type(err).__name__}: {err}"}
        row["seconds"] = time.perf_counter() - t0
        row["worker_pid"] = os.getpid()
        out.append(row)
    return out


def is_server_error(err: BaseException) -> bool:
    """Whether ``err`` is an HTTP 5xx from the Tiled server (worth a retry)."""
    response = getattr(err, "response", None)
    return getattr(response, "status_code", 0) >= 500


def with_server_retries(fn: Callable[[], Any], *, retries: int = 2, delay: float = 1.0,
                        what: str = "a catalog call") -> Any:
    """``fn()``, called again (up to ``retries`` times) after a Tiled server error."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as err:
            if attempt >= retries or not is_server_error(err):
                raise
            log.warning("%s: server error (%s); retrying (%d/%d)", what, err, attempt + 1,
                        retries)
            time.sleep(delay * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover


def _retag_one(run, tagger, stream_name: str | None, options: dict) -> dict:
    """``retag_run``, clearing first a partial stream a killed re-tag of this model left."""
    from ..catalog.append import TagStreamExistsError, retag_run, tag_stream_name

    try:
        return _normalize(retag_run(run, tagger, stream_name=stream_name, **options))
    except TagStreamExistsError:
        name = stream_name or tag_stream_name(tagger.checkpoint_id)
        base = run.base if hasattr(run, "base") else run
        stop = base.metadata.get("stop") or {}
        recorded = name in (stop.get("num_events") or {}) or any(
            entry.get("stream") == name for entry in (stop.get("xsml_by_model") or {}).values())
        if recorded or stream_name is not None:  # a name the user chose may not be ours
            raise
        # the stream is ours (named after this checkpoint) and the stop never recorded it:
        # a re-tag was killed while writing it. Nothing else refers to it; write it again.
        log.warning("run %s: removing the partial stream %r of an interrupted re-tag",
                    base.metadata["start"]["uid"], name)
        base.delete_contents(name, recursive=True, external_only=False)
        row = _normalize(retag_run(run, tagger, stream_name=stream_name, **options))
        row["repaired"] = name
        return row


def _normalize(result: Any) -> dict:
    """Turn what ``retag_run`` returns into ``{status, frames, stream, ...}``."""
    if result is None:
        return {"status": "skipped", "frames": 0}
    if isinstance(result, Mapping):
        d = dict(result)
    elif hasattr(result, "model_dump"):
        d = dict(result.model_dump())
    elif hasattr(result, "__dataclass_fields__"):
        from dataclasses import asdict

        d = asdict(result)
    else:
        d = {"stream": str(result)}
    status = d.get("status")
    if status is None:
        skipped = d.get("skipped")
        status = "skipped" if skipped else "tagged"
    d["status"] = str(status)
    frames = d.get("frames", d.get("n_frames", d.get("xsml_frames", 0)))
    d["frames"] = int(frames or 0) if d["status"] == "tagged" else int(d.get("frames") or 0)
    return {k: (v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v))
            for k, v in d.items()}


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
                  runs_per_task: int = 1, in_flight: int | None = None,
                  stream_name: str | None = None, limit: int | None = None,
                  progress: bool = False, options: Mapping[str, Any] | None = None
                  ) -> RetagReport:
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
        Runs per Dask task (more amortises task overhead on tiny runs).
    in_flight : int, optional
        Most tasks queued at once (default: 2 per worker thread).
    stream_name : str, optional
        Passed to ``retag_run`` (default: its versioned naming).
    limit : int, optional
        Tag at most this many runs in this call (the rest on the next call).
    progress : bool
        Show a progress bar (tqdm) on standard error.
    options : dict, optional
        More keyword options for ``retag_run`` (e.g. ``batch_size``).

    Returns
    -------
    RetagReport
    """
    from distributed import Client, LocalCluster, as_completed

    from ..catalog.embedded import connect

    if runs_per_task < 1:
        raise ValueError(f"runs_per_task must be >= 1, got {runs_per_task}")
    t0 = time.perf_counter()
    catalog = connect(catalog_uri, container=container)
    todo = select_runs(catalog, since=parse_time(since), until=parse_time(until), uids=uids)
    if limit is not None:
        todo = todo[:int(limit)]
    report = RetagReport(runs=len(todo))
    groups = [todo[i:i + runs_per_task] for i in range(0, len(todo), runs_per_task)]

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
    bar = _progress(len(todo)) if progress else None
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
                                 threads=threads_per_worker, options=options, pure=False)

        futures = as_completed([submit(g) for _, g in zip(range(window), pending)])
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
                    bar.update(1)
                    bar.set_postfix(tagged=report.tagged, skipped=report.skipped,
                                    errors=report.errors)
            nxt = next(pending, None)
            if nxt is not None:
                futures.add(submit(nxt))
    except KeyboardInterrupt:
        report.interrupted = True
        log.warning("re-tag interrupted; run the same command again to continue")
    finally:
        if bar is not None:
            bar.close()
        if own_client:
            client.close()
        if cluster is not None:
            cluster.close()
    report.seconds = time.perf_counter() - t0
    return report


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: no bar then
        return None
    return tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True)


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
    parser.add_argument("--runs-per-task", type=int, default=1,
                        help="runs per Dask task; more amortise task overhead on tiny runs "
                             "(default 1)")
    parser.add_argument("--stream-name", default=None,
                        help="tag stream name (default: retag_run's versioned name)")
    parser.add_argument("--limit", type=int, default=None,
                        help="tag at most this many runs now (continue later)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    import json

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        since, until = parse_time(args.since), parse_time(args.until)
    except ValueError as err:
        print(f"xsml retag: {err}", file=sys.stderr)
        return 2
    report = retag_catalog(args.catalog, model=args.model, container=args.container or None,
                           since=since, until=until, scheduler=args.scheduler,
                           n_workers=args.workers, threads_per_worker=args.threads_per_worker,
                           runs_per_task=args.runs_per_task, stream_name=args.stream_name,
                           limit=args.limit, progress=not args.no_progress)
    for row in report.rows:
        if row.get("status") == "error":
            print(f"xsml retag: run {row['run']}: {row.get('error')}", file=sys.stderr)
    print(json.dumps(report.to_dict()))
    if report.interrupted:
        return 130
    return 1 if report.errors else 0
