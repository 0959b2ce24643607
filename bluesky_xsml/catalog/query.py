"""Finding runs and frames by tag in a Tiled catalog of Bluesky runs.

Two levels:

* :func:`find_runs` searches the run summaries in the stop documents (on the
  server, one query): every run with at least ``min_frames`` frames carrying
  a tag, optionally within a time window and with start metadata equal to
  given values. It returns the searched Tiled node, which can be searched
  further, iterated, or passed to :func:`find_frames`.
* :func:`find_frames` reads the tag streams of those runs and returns one row
  per frame whose probability for the tag reaches ``min_prob``, with the run's
  uid and scan_id, the source stream, seq_num, data key and frame index, the
  sample metadata of the run and the motor positions of that event (motors the
  run did not move from its baseline stream or start document): enough to
  plot where on a sample a feature appears.

Both need a Tiled SQL catalog (SQLite or PostgreSQL) written by
bluesky-tiled-plugins' ``TiledWriter``. ``databroker.v2.temp()`` (mongomock)
returns no run for queries on ``stop.*`` keys, and its streams have another
layout: read its tag streams with ``run["xsml_tags"].read()``.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..documents.frame_index import INDEX_KEY, INDEX_VERSION, motor_keys
from ..tags import TAG_NAMES, TAGS

__all__ = ["FRAME_COLUMNS", "find_frames", "find_runs", "run_summaries", "tag_stream_node",
           "to_timestamp"]

log = logging.getLogger(__name__)

#: The first columns of :func:`find_frames`' table (sample and motor columns follow).
FRAME_COLUMNS = ("uid", "scan_id", "stream", "seq_num", "key", "frame_index", "tag",
                 "probability", "tags", "model", "tag_stream", "time")

_THRESHOLD = {t.name: t.threshold for t in TAGS}


def _check_tag(tag: str, strict: bool) -> str:
    if not isinstance(tag, str) or not tag or "." in tag or "/" in tag:
        raise ValueError(f"a tag name is a non-empty string without '.' or '/', got {tag!r}")
    if strict and tag not in TAG_NAMES:
        close = difflib.get_close_matches(tag, TAG_NAMES, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown tag {tag!r}{hint} (known tags: see bluesky_xsml.tags."
                         "TAG_NAMES; pass strict=False for a custom vocabulary)")
    return tag


def to_timestamp(value: Any, *, name: str = "time") -> float:
    """A POSIX timestamp from a number, ``datetime``, ``date`` or ISO 8601 string.

    Naive dates and times are local time, as the RunEngine's ``start.time``
    is a POSIX timestamp taken on the acquisition machine's clock.

    >>> to_timestamp(1_700_000_000)
    1700000000.0
    >>> to_timestamp("2026-11-01T00:00:00+00:00")
    1793491200.0
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a time, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
        return float(value)
    if isinstance(value, str):
        try:
            value = _dt.datetime.fromisoformat(value.strip())
        except ValueError as err:
            raise ValueError(f"{name} {value!r} is not an ISO 8601 date or time "
                             "(e.g. 2026-11-01 or 2026-11-01T08:30)") from err
    if isinstance(value, _dt.datetime):
        return value.timestamp()
    if isinstance(value, _dt.date):
        return _dt.datetime(value.year, value.month, value.day).timestamp()
    raise TypeError(f"{name} must be a number, datetime, date or ISO string, got "
                    f"{type(value).__name__}")


def find_runs(catalog, tag: str, *, min_frames: int = 1, since: Any = None, until: Any = None,
              model: str | None = None, strict: bool = True, **start_metadata_filters: Any):
    """Runs with at least ``min_frames`` frames tagged ``tag``.

    Parameters
    ----------
    catalog : CatalogOfBlueskyRuns
        A Tiled node of runs (possibly already searched).
    tag : str
        A tag name (:data:`bluesky_xsml.tags.TAG_NAMES`).
    min_frames : int
        Least number of frames at or above the tag's threshold, as counted
        in the run's current tag summary (``stop.xsml_tag_counts``).
    since, until : float, datetime, date or str, optional
        Run start time window: ``since <= start.time < until``.
    model : str, optional
        Only runs whose current tagging is by this checkpoint id
        (``stop.xsml_model``).
    strict : bool
        Refuse tag names outside the packaged vocabulary.
    **start_metadata_filters
        ``key=value``: only runs whose start document has exactly that value
        (e.g. ``sample="PS-b-PMMA"``, ``plan_name="grid_scan"``).

    Returns
    -------
    Tiled node
        The searched catalog: ``list(result)`` gives run uids,
        ``result[uid]`` a run, ``len(result)`` the count.

    Notes
    -----
    The query is ``Key("stop.xsml_tag_counts.<tag>") >= min_frames`` (exact
    key; ``Contains("stop.xsml_tags", tag)`` would also match other tags that
    contain the name as a substring, since the SQL catalogs implement it with
    ``LIKE``).

    Examples
    --------
    >>> find_runs(None, "ring_orientd")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown tag 'ring_orientd'; did you mean ring_oriented? (known tags: ...)
    """
    _check_tag(tag, strict)
    if isinstance(min_frames, bool) or not isinstance(min_frames, int) or min_frames < 1:
        raise ValueError(f"min_frames must be an integer >= 1, got {min_frames!r}")
    from tiled.queries import Key

    queries = [Key(f"stop.xsml_tag_counts.{tag}") >= min_frames]
    if since is not None:
        queries.append(Key("start.time") >= to_timestamp(since, name="since"))
    if until is not None:
        queries.append(Key("start.time") < to_timestamp(until, name="until"))
    if since is not None and until is not None and \
            to_timestamp(since) >= to_timestamp(until):
        raise ValueError(f"since ({since!r}) must be before until ({until!r})")
    if model is not None:
        queries.append(Key("stop.xsml_model") == str(model))
    for key, value in start_metadata_filters.items():
        if isinstance(value, (dict, list)):
            raise TypeError(f"start metadata filter {key}= must be a number, string or bool")
        queries.append(Key(f"start.{key}") == value)
    node = catalog
    for q in queries:
        node = node.search(q)
    return node


def run_summaries(runs, tag: str | None = None) -> Any:
    """A pandas DataFrame with one row per run: uid, scan_id, start time, counts.

    ``runs`` is a Tiled node (e.g. :func:`find_runs`' result) or an iterable
    of runs. With ``tag``, a ``frames_with_tag`` column holds its count.
    """
    import pandas as pd

    rows = []
    for run in _iter_runs(runs):
        md = run.metadata
        start, stop = md.get("start") or {}, md.get("stop") or {}
        row = {"uid": start.get("uid"), "scan_id": start.get("scan_id"),
               "start_time": _dt.datetime.fromtimestamp(start["time"]).isoformat(
                   sep=" ", timespec="seconds") if "time" in start else None,
               "plan_name": start.get("plan_name"),
               "frames": stop.get("xsml_frames")}
        if tag is not None:
            row["frames_with_tag"] = (stop.get("xsml_tag_counts") or {}).get(tag, 0)
        row["tags"] = ",".join(stop.get("xsml_tags") or [])
        row["model"] = stop.get("xsml_model")
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------- frames
def _iter_runs(catalog_or_runs) -> Iterable:
    if hasattr(catalog_or_runs, "search") and hasattr(catalog_or_runs, "values") and \
            "BlueskyRun" not in _spec_names(catalog_or_runs):
        return catalog_or_runs.values()
    if "BlueskyRun" in _spec_names(catalog_or_runs):
        return [catalog_or_runs]
    return list(catalog_or_runs)


def _spec_names(node) -> set[str]:
    try:
        return {s.name for s in node.specs}
    except (AttributeError, TypeError):  # a plain sequence of runs, or a node without specs
        return set()


def _tag_stream_of(stop: Mapping, run_keys: Sequence[str], stream: str | None,
                   model: str | None) -> str | None:
    if stream is not None:
        return stream if stream in run_keys else None
    if model is not None:
        entry = (stop.get("xsml_by_model") or {}).get(model)
        if entry and entry.get("stream") in run_keys:
            return entry["stream"]
        if stop.get("xsml_model") == model and stop.get("xsml_stream") in run_keys:
            return stop["xsml_stream"]
        return None
    name = stop.get("xsml_stream") or "xsml_tags"
    return name if name in run_keys else None


def tag_stream_node(run, stream: str | None = None):
    """The tag stream of a stored run: ``stream``, else the one its stop names, else ``xsml_tags``.

    Parameters
    ----------
    run : BlueskyRun
        A Tiled client node of one run.
    stream : str, optional
        A tag stream's name (e.g. a re-tag's ``xsml_tags_<checkpoint>``).

    Returns
    -------
    tuple of (str, node)
        The stream's name and its Tiled node.

    Raises
    ------
    KeyError
        The run has no such stream; the message lists the streams it has.
    """
    md = run.metadata
    start, stop = md.get("start") or {}, md.get("stop") or {}
    name = stream or stop.get("xsml_stream") or "xsml_tags"
    streams = list(run)
    if name not in streams:
        raise KeyError(f"run {str(start.get('uid', '?'))[:8]} has no tag stream {name!r}; its "
                       f"streams are {streams} (was it tagged? see docs/live-tagging.md)")
    return name, run[name]


def _flatten(prefix: str, value: Any, out: dict) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    elif isinstance(value, (list, tuple)):
        out[prefix] = ",".join(map(str, value))
    else:
        out[prefix] = value


def _sample_metadata(start: Mapping, sample_keys: Sequence[str] | None) -> dict:
    out: dict[str, Any] = {}
    for key, value in start.items():
        wanted = (key in sample_keys) if sample_keys is not None else \
            (key == "sample" or key.startswith("sample_"))
        if wanted:
            _flatten(key, value, out)
    return out


def _motor_columns(stream_node, start: Mapping, fields: Sequence[str]) -> list[str]:
    """Data keys of the source stream holding positions of the run's motors (+ ``fields``)."""
    data_keys = stream_node.metadata.get("data_keys") or {}
    cols = motor_keys({"data_keys": data_keys}, start)  # the rule the live index uses
    cols += [f for f in fields if f in data_keys and f not in cols]
    return cols


def _table(stream_node, columns: Sequence[str]):
    """Columns of a stream's internal table (one request)."""
    base = stream_node.base if hasattr(stream_node, "base") else stream_node
    return base["internal"].read(columns=list(columns))


def _run_table(run, stream: str, columns: Sequence[str]):
    """Columns of ``run/stream/internal`` in one HTTP request, or ``None`` if they are not there.

    Tiled's REST route ``GET /api/v1/table/full/{path}?column=...`` (what
    ``DataFrameClient.read`` ends in) asked for directly: no metadata request
    per node on the way down, no dask graph. ``None`` (any HTTP error: no such
    stream or column, or a server failure) sends the caller to the
    node-by-node path, which reports real errors.
    """
    from tiled.serialization.table import deserialize_arrow
    from tiled.utils import APACHE_ARROW_FILE_MIME_TYPE

    self_link = run.item["links"]["self"]
    if "/metadata/" not in self_link:
        return None
    url = self_link.replace("/metadata/", "/table/full/", 1).split("?")[0] + \
        f"/{stream}/internal"
    response = run.context.http_client.get(url, params={"column": list(columns)},
                                           headers={"Accept": APACHE_ARROW_FILE_MIME_TYPE})
    if response.is_error:  # e.g. a column the table lacks (some storages answer 500)
        return None
    return deserialize_arrow(response.read())


def _frames_from_index(start: Mapping, stop: Mapping, tag: str, min_prob: float,
                       stream: str | None, model: str | None, sample_keys,
                       fields: Sequence[str], novel: bool | None = None) -> list[dict] | None:
    """The matching frames from the stop's ``xsml_index``, or ``None`` if it cannot answer.

    It answers only for the stream it describes (the run's current tag stream),
    at or above its ``min_prob``, when it is complete and holds the positions
    asked for; otherwise the caller reads the streams.
    """
    idx = stop.get(INDEX_KEY)
    if model is not None or not isinstance(idx, Mapping) or idx.get("version") != INDEX_VERSION \
            or not idx.get("complete") or not idx.get("positions_known"):
        return None
    current = stop.get("xsml_stream") or "xsml_tags"
    if idx.get("stream") != current or (stream is not None and stream != current):
        return None
    try:
        if min_prob < float(idx["min_prob"]):
            return None
        frames, positions = idx["frames"], idx["positions"]
        if novel is not None and "novel" not in frames:
            return None  # an index written before novelty scores: read the streams
        hits = (idx.get("hits") or {}).get(tag) or {"row": [], "prob": []}
        motors = list(dict.fromkeys([*(start.get("motors") or []), *fields]))
        if not set(fields) <= set(positions):
            return None
        # the same columns the stream path reports: the start's motors when each is a key,
        # else every motor key found in the descriptor
        columns = motors if motors and set(motors) <= set(positions) else \
            [*[k for k in positions if k not in fields], *fields]
        sample = _sample_metadata(start, sample_keys)
        rows = []
        for i, p in zip(hits["row"], hits["prob"], strict=True):
            if not p >= min_prob:
                continue
            if novel is not None and bool(frames["novel"][i]) != novel:
                continue
            row = {"uid": start.get("uid"), "scan_id": start.get("scan_id"),
                   "stream": str(frames["stream"][i]), "seq_num": int(frames["seq_num"][i]),
                   "key": str(frames["key"][i]), "frame_index": int(frames["frame_index"][i]),
                   "tag": tag, "probability": float(p), "tags": str(frames["tags"][i]),
                   "model": str(frames["checkpoint"][i]), "tag_stream": current,
                   "time": float(frames["time"][i])}
            if novel is not None:
                score = frames["novelty"][i]
                row["novelty"] = math.nan if score is None else float(score)
                row["novel"] = bool(frames["novel"][i])
            row.update(sample)
            for c in columns:
                value = positions[c][i]
                row[c] = math.nan if value is None else value
            rows.append(row)
    except (KeyError, IndexError, TypeError, ValueError) as err:
        log.warning("run %s: its xsml_index is malformed (%r); reading its streams",
                    start.get("uid"), err)
        return None
    rows.sort(key=lambda r: (r["stream"], r["seq_num"], r["key"], r["frame_index"]))
    return rows


def _frames_of_run(run, tag: str, min_prob: float, stream: str | None, model: str | None,
                   sample_keys, fields, use_index: bool = True,
                   novel: bool | None = None) -> list[dict]:
    import numpy as np

    md = run.metadata
    start, stop = md.get("start") or {}, md.get("stop") or {}
    if use_index:
        rows = _frames_from_index(start, stop, tag, min_prob, stream, model, sample_keys, fields,
                                  novel)
        if rows is not None:
            return rows
    cols = [tag, "source_stream", "source_seq_num", "source_key", "frame_index", "tags",
            "checkpoint", "time"]
    if novel is not None:
        cols += ["novelty", "novel"]
    df = None
    run_keys: list[str] | None = None
    name = stream if stream is not None else (
        stop.get("xsml_stream") if model is None else None)
    if name is not None:  # fast path: one request for the columns
        df = _run_table(run, name, cols)
        if df is not None and not set(cols) <= set(df.columns):
            df = None  # a column is missing: find out which below
    if df is None:  # the stream, its columns or the model's stream must be looked up
        run_keys = list(run)
        name = _tag_stream_of(stop, run_keys, stream, model)
        if name is None:
            return []
        tag_node = run[name]
        available = set(tag_node.base["internal"].columns) if hasattr(tag_node, "base") else None
        if available is not None and tag not in available:
            return []
        df = _table(tag_node, [c for c in cols if available is None or c in available])
    probs = df[tag].to_numpy(dtype=np.float64)
    ok = np.nan_to_num(probs, nan=-1.0) >= min_prob
    if novel is not None:
        if "novel" not in df.columns:  # a tag stream written before novelty scores
            df = df.assign(novel=False, novelty=math.nan)
        ok &= df["novel"].fillna(False).to_numpy(dtype=bool) == novel
    keep = np.flatnonzero(ok)
    if not len(keep):
        return []
    df = df.iloc[keep]
    sample = _sample_metadata(start, sample_keys)
    positions: dict[str, dict[int, dict]] = {}
    for source in sorted(set(df["source_stream"])):
        # fast path: the start document's motors are the source stream's position columns
        guess = list(dict.fromkeys([*(start.get("motors") or []), *fields]))
        src = _run_table(run, source, ["seq_num", *guess]) if guess else None
        motor_cols = guess
        if src is not None and not {"seq_num", *guess} <= set(src.columns):
            src = None  # a motor is stored under another key, or a field is absent
        if src is None:
            if run_keys is None:
                run_keys = list(run)
            if source not in run_keys:
                continue
            src_node = run[source]
            motor_cols = _motor_columns(src_node, start, fields)
            if not motor_cols:
                continue
            src = _table(src_node, ["seq_num", *motor_cols])
        positions[source] = {int(s): {c: _scalar(src[c].iloc[i]) for c in motor_cols}
                             for i, s in enumerate(src["seq_num"])}
    rows = []
    for _, r in df.iterrows():
        seq = int(r["source_seq_num"])
        row = {"uid": start.get("uid"), "scan_id": start.get("scan_id"),
               "stream": str(r["source_stream"]), "seq_num": seq,
               "key": str(r["source_key"]), "frame_index": int(r["frame_index"]),
               "tag": tag, "probability": float(r[tag]), "tags": str(r.get("tags", "")),
               "model": str(r.get("checkpoint", "")), "tag_stream": name,
               "time": float(r["time"]) if "time" in r else math.nan}
        if novel is not None:
            row["novelty"], row["novel"] = float(r["novelty"]), bool(r["novel"])
        row.update(sample)
        row.update(positions.get(row["stream"], {}).get(seq, {}))
        rows.append(row)
    rows.sort(key=lambda r: (r["stream"], r["seq_num"], r["key"], r["frame_index"]))
    return rows


def _scalar(value):
    try:
        return value.item()
    except AttributeError:
        return value


def _position_columns(runs, per_run: Sequence[list[dict]], fields: Sequence[str],
                      sample_keys) -> list[str]:
    """The position columns of a table: those any run's rows hold, then ``fields``."""
    cols: dict[str, None] = {}
    for run, rows in zip(runs, per_run, strict=True):
        if not rows:
            continue
        sample = _sample_metadata(run.metadata.get("start") or {}, sample_keys)
        for row in rows:
            cols.update((k, None) for k in row if k not in FRAME_COLUMNS and k not in sample)
    cols.update((f, None) for f in fields)
    return list(cols)


def _add_positions_recorded_elsewhere(run, rows: list[dict], wanted: Sequence[str]) -> None:
    """Fill the position columns ``wanted`` that rows of ``run`` lack, where the run has them.

    A motor the run did not scan is read from the source stream's events when
    the plan read it there, else from :func:`~bluesky_xsml.catalog.positions.fixed_positions`
    (the baseline stream, then the start document). A column the run
    recorded nowhere stays absent (NaN in the table).
    """
    from .positions import fixed_positions

    if not rows or all(c in row for row in rows for c in wanted):
        return
    run_keys = list(run)
    for source in sorted({r["stream"] for r in rows}):
        lack = [c for c in wanted if any(c not in r for r in rows if r["stream"] == source)]
        if not lack or source not in run_keys:
            continue
        node = run[source]
        data_keys = node.metadata.get("data_keys") or {}
        have = [c for c in lack if c in data_keys and not data_keys[c].get("shape")]
        if not have:
            continue
        table = _table(node, ["seq_num", *have])
        by_seq = {int(s): i for i, s in enumerate(table["seq_num"])}
        for r in rows:
            i = by_seq.get(r["seq_num"]) if r["stream"] == source else None
            if i is not None:
                for c in have:
                    r.setdefault(c, _scalar(table[c].iloc[i]))
    lack = [c for c in wanted if any(c not in r for r in rows)]
    fixed = fixed_positions(run, lack, run_keys=run_keys) if lack else {}
    for r in rows:
        for c, value in fixed.items():
            r.setdefault(c, float(value))


def find_frames(catalog_or_runs, tag: str, *, min_prob: float = 0.5, stream: str | None = None,
                model: str | None = None, sample_keys: Sequence[str] | None = None,
                fields: Sequence[str] = (), narrow: bool | None = None, strict: bool = True,
                threads: int = 1, use_index: bool = True, novel: bool | None = None):
    """Frames whose probability for ``tag`` is at least ``min_prob``, as a table.

    Parameters
    ----------
    catalog_or_runs : CatalogOfBlueskyRuns, BlueskyRun or iterable of runs
        Where to look. A catalog node is first narrowed with
        :func:`find_runs` (see ``narrow``).
    tag : str
    min_prob : float
        Least probability, in [0, 1]. Skipped frames (NaN) never match.
    stream : str, optional
        Tag stream to read; default each run's current one
        (``stop.xsml_stream``), or the stream of ``model``.
    model : str, optional
        Read the tag stream written by this checkpoint (live or re-tag).
    sample_keys : sequence of str, optional
        Start-document keys copied into every row; default ``sample`` and
        every ``sample_*`` key (dicts are flattened to ``sample.name``...).
    fields : sequence of str
        Extra scalar data keys to add, besides the positions of the start
        document's ``motors`` (e.g. a motor that was read, or not moved).
    narrow : bool, optional
        Search a catalog node with :func:`find_runs` first (one server query,
        runs whose summary counts the tag). Default: when ``min_prob`` is at
        or above the tag's default threshold, where a frame that reaches
        ``min_prob`` is counted in the summary. Never with ``model`` (older
        taggings are not in the searchable current summary).
    strict : bool
        Refuse tag names outside the packaged vocabulary.
    threads : int
        Runs read concurrently. Keep 1 with the embedded catalog: its
        requests take turns on one DuckDB connection, so concurrency gains
        nothing there (``benchmarks/bench_query.py``); a server on PostgreSQL
        may gain from a few.
    use_index : bool
        Answer from each run's stop-document index (``xsml_index``, written by
        :class:`~bluesky_xsml.TaggingCallback`) where it can: no stream is read
        for that run. ``False`` reads every run's streams (the same rows; for
        checking, or for positions the index lacks).
    novel : bool, optional
        ``True``: only frames the tagger flagged novel (``novel`` in the tag
        stream, see docs/novelty.md); ``False``: only frames not flagged.
        Either adds ``novelty`` and ``novel`` columns. Frames tagged before
        novelty scores existed count as not novel.

    Returns
    -------
    pandas.DataFrame
        One row per matching frame: :data:`FRAME_COLUMNS`, then the sample
        metadata and motor position columns, sorted by run start order, then
        seq_num, key and frame index. A position column (a motor any run
        scanned, or one of ``fields``) holds each frame's value from its
        event where the run read it there; for a motor the run did not move,
        the position it recorded in its ``baseline`` stream (as the run
        opened) or in its start document under the motor's name
        (:func:`~bluesky_xsml.catalog.positions.fixed_positions`); NaN where
        the run recorded it nowhere.
    """
    import pandas as pd

    _check_tag(tag, strict)
    if isinstance(min_prob, bool) or not isinstance(min_prob, (int, float)) or \
            not 0.0 <= float(min_prob) <= 1.0:
        raise ValueError(f"min_prob must be a number in [0, 1], got {min_prob!r}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if novel is not None and not isinstance(novel, bool):
        raise ValueError(f"novel must be True, False or None, got {novel!r}")
    source = catalog_or_runs
    is_catalog = hasattr(source, "search") and "BlueskyRun" not in _spec_names(source)
    if is_catalog:
        if narrow is None:
            narrow = model is None and float(min_prob) >= _THRESHOLD.get(tag, 1.0)
        if narrow and model is None:  # older taggings are not in the current summary
            source = find_runs(source, tag, strict=strict)
    runs = list(_iter_runs(source))

    def one(run):
        try:
            return _frames_of_run(run, tag, float(min_prob), stream, model, sample_keys, fields,
                                  use_index, novel)
        except KeyError as err:
            log.warning("run %s: cannot read its tag stream (%s); skipped",
                        run.metadata.get("start", {}).get("uid"), err)
            return []

    def fill(run, rs, wanted):
        # every row gets every position column of the table (the motors any run reported,
        # and ``fields``) where its run recorded that position, scanned or not
        try:
            _add_positions_recorded_elsewhere(run, rs, wanted)
        except KeyError as err:
            log.warning("run %s: cannot read the positions of its unscanned motors (%s)",
                        run.metadata.get("start", {}).get("uid"), err)
        return rs

    if threads == 1 or len(runs) <= 1:
        per_run = [one(r) for r in runs]
        wanted = _position_columns(runs, per_run, fields, sample_keys)
        per_run = [fill(run, rs, wanted) for run, rs in zip(runs, per_run, strict=True)]
    else:
        with ThreadPoolExecutor(min(threads, len(runs)), thread_name_prefix="xsml-query") as ex:
            per_run = list(ex.map(one, runs))
            wanted = _position_columns(runs, per_run, fields, sample_keys)
            per_run = list(ex.map(fill, runs, per_run, [wanted] * len(runs)))
    rows = [row for rs in per_run for row in rs]
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=list(FRAME_COLUMNS))
    extra = [c for c in df.columns if c not in FRAME_COLUMNS]
    df = df[list(FRAME_COLUMNS) + extra]
    return df.reset_index(drop=True)
