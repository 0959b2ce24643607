"""Tagging runs that are already stored: write a tag stream into an existing run.

Runs that were stored without a tagger in the writer's path, or that should be
tagged again with a newer model, get their tag stream after the fact, through
the Tiled client:

* :func:`append_tag_stream` writes one tag stream (a descriptor and its event
  pages, composed elsewhere) into a stored run, in the same layout the live
  ``TiledWriter`` uses, and updates the run's stop summary.
* :func:`retag_run` reads a run's frames lazily from Tiled, tags them with a
  :class:`~bluesky_xsml.inference.tagger.Tagger`, composes the documents with
  :class:`~bluesky_xsml.documents.compose.TagStreamComposer` and calls
  :func:`append_tag_stream`. A run already tagged by that checkpoint is skipped.

Versioning
----------
A re-tag never replaces a stream: each checkpoint gets its own stream,
:func:`tag_stream_name` (``xsml_tags_<checkpoint_id>``). The stop summary keys
the live callback writes (``xsml_stream``, ``xsml_tags``, ``xsml_tag_counts``,
``xsml_model``, ``xsml_models``, ``xsml_frames``, ``xsml_skipped``) describe
the *current* tagging, which is the most recently appended one unless
``make_current=False``. Every tagging of the run, the live one included, is
kept in ``stop["xsml_by_model"][checkpoint_id]`` (stream, tags, tag_counts,
frames, skipped, models, appended). The stop as it was before the update is
kept as a Tiled metadata revision (``run.metadata_revisions``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..documents.beam_center import parse_beam_center
from ..documents.compose import TagStreamComposer
from ..documents.frames import find_image_keys
from ..errors import XsmlError
from ..inference.results import FrameItem, frames_to_results, split_value
from ..readout import parse_readouts
from ..summary import SUMMARY_KEYS, RunSummary

__all__ = [
    "SUMMARY_KEYS",
    "AppendResult",
    "FrameBlock",
    "RetagResult",
    "TagStreamExistsError",
    "TaggedRun",
    "append_tag_stream",
    "lazy_frame_blocks",
    "plain_container",
    "read_rows",
    "refreshed",
    "retag_run",
    "tag_run",
    "tag_stream_name",
    "tagged_checkpoints",
]

log = logging.getLogger(__name__)


_STRUCTURAL = {"name", "object_keys", "run_start"}  # descriptor keys TiledWriter leaves out
_NUMPY_OF_JSON = {"number": "<f8", "integer": "<i8", "boolean": "|b1", "string": "<U0"}


class TagStreamExistsError(XsmlError, ValueError):
    """The run already has a stream of that name; tag streams are never overwritten."""


@dataclass
class AppendResult:
    """What :func:`append_tag_stream` wrote."""

    uid: str
    stream: str
    rows: int
    stop: dict


@dataclass
class RetagResult:
    """The outcome of :func:`retag_run` for one run.

    ``status`` is ``"tagged"`` (a new stream was written) or ``"skipped"``
    (the run was already tagged by this checkpoint; ``reason`` says where).
    """

    uid: str
    status: str
    stream: str
    checkpoint: str
    frames: int = 0
    skipped: dict = field(default_factory=dict)
    tag_counts: dict = field(default_factory=dict)
    reason: str = ""
    seconds: float = 0.0


def tag_stream_name(checkpoint_id: str, *, base: str = "xsml_tags") -> str:
    """The stream a re-tag by ``checkpoint_id`` writes.

    >>> tag_stream_name("43964cf25583")
    'xsml_tags_43964cf25583'
    """
    name = f"{base}_{checkpoint_id}"
    if not checkpoint_id or "." in name or "/" in name:
        raise ValueError(f"cannot make a stream name from checkpoint {checkpoint_id!r}")
    return name


def plain_container(run_node):
    """The plain Tiled container of a run client (BlueskyRun or Container)."""
    return run_node.base if hasattr(run_node, "base") else run_node


def refreshed(run_node):
    """Re-read the run node so its metadata and keys are current."""
    base = plain_container(run_node)
    return base.refresh() if hasattr(base, "refresh") else base


def _run_stop(md: Mapping, uid: str) -> dict:
    stop = md.get("stop")
    if not stop:
        raise XsmlError(
            f"run {uid} has no stop document (still running, or aborted without one); "
            "tag it after it has finished")
    return dict(stop)


def tagged_checkpoints(metadata: Mapping) -> dict[str, str]:
    """Checkpoints that tagged a whole run, mapped to their stream, from its metadata.

    A checkpoint counts when a recorded tagging of the run used it alone:
    an ``xsml_by_model`` entry, or a live summary whose ``xsml_models`` is
    just that checkpoint (a run hot-swapped between models mid-run counts
    for neither).

    >>> tagged_checkpoints({"stop": {"xsml_stream": "xsml_tags", "xsml_model": "abc",
    ...                              "xsml_models": ["abc"]}})
    {'abc': 'xsml_tags'}
    """
    stop = metadata.get("stop") or {}
    out: dict[str, str] = {}
    models = stop.get("xsml_models")
    if stop.get("xsml_stream") and stop.get("xsml_model") and (
            models is None or list(models) in ([], [stop["xsml_model"]])):
        out[str(stop["xsml_model"])] = str(stop["xsml_stream"])
    for ckpt, entry in (stop.get("xsml_by_model") or {}).items():
        if list(entry.get("models") or [ckpt]) == [ckpt]:
            out[str(ckpt)] = str(entry.get("stream", ""))
    return out


def _by_model_entry(summary: Mapping, stream: str) -> dict:
    return {
        "stream": stream,
        "tags": list(summary.get("xsml_tags", [])),
        "tag_counts": dict(summary.get("xsml_tag_counts", {})),
        "frames": int(summary.get("xsml_frames", 0)),
        "skipped": dict(summary.get("xsml_skipped", {})),
        "models": list(summary.get("xsml_models", [])),
        "appended": time.time(),
    }


def _normalized_data_keys(descriptor: Mapping) -> dict:
    """Data keys as the TiledWriter's normalizer stores them (dtype_numpy, object_name)."""
    data_keys = {k: dict(v) for k, v in descriptor["data_keys"].items()}
    for key, dk in data_keys.items():
        if dk.get("shape"):
            raise ValueError(
                f"append_tag_stream writes scalar data keys only; {key!r} has shape "
                f"{dk['shape']!r}")
        if "external" in dk:
            raise ValueError(f"append_tag_stream writes inline data only; {key!r} is external")
        if "dtype_numpy" not in dk and dk.get("dtype") in _NUMPY_OF_JSON:
            dk["dtype_numpy"] = _NUMPY_OF_JSON[dk["dtype"]]
    for obj, keys in (descriptor.get("object_keys") or {}).items():
        for key in keys:
            if key in data_keys:
                data_keys[key]["object_name"] = obj
    return data_keys


def _arrow_type(key: str, dk: Mapping):
    import pyarrow as pa

    dtype = dk.get("dtype")
    if dtype == "string":
        return pa.string()
    if dtype == "boolean":
        return pa.bool_()
    if dtype == "integer":
        return pa.int64()
    if dtype == "number":
        kind = np.dtype(dk.get("dtype_numpy", "<f8")).kind
        return pa.int64() if kind in "iu" else pa.float64()
    raise ValueError(f"data key {key!r} has dtype {dtype!r}; a tag stream holds "
                     "number, integer, boolean or string values")


def _table(page: Mapping, data_keys: Mapping, schema):
    """One pyarrow table (TiledWriter's column layout) from an event page."""
    import pyarrow as pa

    n = len(page["seq_num"])
    columns: dict[str, Any] = {"seq_num": page["seq_num"], "time": page["time"]}
    for key in data_keys:
        values = page["data"].get(key)
        if values is None or len(values) != n:
            raise ValueError(f"event page {page.get('uid')!r} lacks a value per event for "
                             f"data key {key!r}")
        columns[key] = values
    for key in data_keys:
        columns[f"ts_{key}"] = page["timestamps"].get(key, page["time"])
    return pa.Table.from_pydict(columns, schema=schema)


def append_tag_stream(run_node, descriptor: Mapping, event_pages: Iterable[Mapping],
                      summary: Mapping[str, Any], *, make_current: bool = True,
                      metadata: Mapping | None = None,
                      descriptor_validated: bool = False) -> AppendResult:
    """Write a tag stream into a stored run and update the run's stop summary.

    Contract
    --------
    * ``run_node`` is a stored run (``catalog[uid]``, a ``BlueskyRun`` client
      or its ``.base`` container) on a writable Tiled server, with a stop
      document.
    * ``descriptor`` is a schema-valid event descriptor bound to that run
      (``run_start`` is the run's uid); its ``name`` is the new stream, which
      must not exist in the run yet. Its data keys must be scalars (number,
      integer, boolean, string), as in the tag stream
      :class:`~bluesky_xsml.documents.compose.TagStreamComposer` composes.
    * ``event_pages`` are schema-valid event pages of that descriptor; they
      may be a generator. All are validated first, then written in order in
      one append request. Zero pages write an empty stream.
    * ``summary`` holds the run summary keys for this stream (at least
      ``xsml_model``; normally all of :data:`SUMMARY_KEYS`, as
      ``TaggingCallback`` computes them). ``xsml_stream`` is set to the
      descriptor's name.

    Effects
    -------
    The stream is created as the live ``TiledWriter`` creates it (a
    ``BlueskyEventStream``/``composite`` container whose metadata is the
    descriptor, with an appendable ``internal`` table of columns ``seq_num``,
    ``time``, the data keys and ``ts_<key>``), so ``run[name].read()`` reads
    it like a live tag stream. Then the stop is updated (a new metadata
    revision; the old stop stays readable in ``metadata_revisions``):
    ``num_events[name]`` is the number of rows, ``xsml_by_model[model]``
    records this tagging, and with ``make_current`` the summary keys are
    replaced by ``summary``. A live summary already in the stop is first
    copied into ``xsml_by_model`` so no tagging is forgotten.

    If writing fails part way, the partial stream is deleted (best effort) and
    the error re-raised; the stop is only updated after all rows are written.
    Two processes appending different streams to one run at the same moment
    may lose one ``xsml_by_model`` entry (read-modify-write of the stop);
    appending the same stream name twice fails for the second.

    Parameters
    ----------
    run_node : BlueskyRun or tiled Container
    descriptor : dict
    event_pages : iterable of dict
    summary : dict
    make_current : bool
        Make this tagging the run's current summary (the top-level keys that
        :func:`bluesky_xsml.query.find_runs` searches by default).
    metadata : dict, optional
        The run's metadata as the caller just read it (e.g. from a paged
        listing). Saves the two requests that re-read the run and check for
        the stream; an existing stream is then found by the server refusing
        to create it (HTTP 409), raised as :class:`TagStreamExistsError` all
        the same.
    descriptor_validated : bool
        The caller has just schema-validated ``descriptor`` (it comes from
        ``event_model.compose_descriptor``, as :func:`tag_run`'s does): it is
        not validated a second time. Every page and the new stop always are.

    Returns
    -------
    AppendResult

    Raises
    ------
    TagStreamExistsError
        If the run already has a stream named like the descriptor.
    XsmlError
        If the run has no stop document.
    ValueError
        If a document does not belong to the run or the descriptor, fails
        schema validation, or has non-scalar data keys.
    """
    import event_model
    import pyarrow as pa
    from tiled.structures.core import Spec

    base = refreshed(run_node) if metadata is None else plain_container(run_node)
    md = base.metadata if metadata is None else metadata
    uid = md["start"]["uid"]
    name = descriptor.get("name", "")
    try:
        if not descriptor_validated:
            event_model.schema_validators[event_model.DocumentNames.descriptor].validate(
                descriptor)
    except Exception as err:
        raise ValueError(f"the descriptor of stream {name!r} is not a valid event descriptor: "
                         f"{err}") from err
    if descriptor["run_start"] != uid:
        raise ValueError(f"the descriptor belongs to run {descriptor['run_start']!r}, "
                         f"not to run {uid!r}")
    if "xsml_model" not in summary:
        raise ValueError("summary needs at least 'xsml_model' (the checkpoint that tagged)")
    stop = _run_stop(md, uid)
    exists = TagStreamExistsError(
        f"run {uid} already has a stream {name!r}; tag streams are never overwritten "
        "(a new model writes a new stream, see tag_stream_name)")
    if metadata is None and name in base:
        raise exists

    data_keys = _normalized_data_keys(descriptor)
    schema = pa.schema([("seq_num", pa.int64()), ("time", pa.float64())]
                       + [(k, _arrow_type(k, dk)) for k, dk in data_keys.items()]
                       + [(f"ts_{k}", pa.float64()) for k in data_keys])
    stream_md = {k: v for k, v in descriptor.items() if k not in _STRUCTURAL}
    stream_md["data_keys"] = data_keys
    page_validator = event_model.schema_validators[event_model.DocumentNames.event_page]

    try:
        stream_node = base.create_container(
            key=name, metadata=stream_md,
            specs=[Spec("BlueskyEventStream", version="3.0"), Spec("composite")])
    except Exception as err:
        if _status(err) == 409:  # the server has a node of that name
            raise exists from err
        raise
    rows = 0
    try:
        stream_base = stream_node.base if hasattr(stream_node, "base") else stream_node
        table_node = stream_base.create_appendable_table(schema=schema, key="internal",
                                                          metadata=data_keys)
        # every page is validated and converted first, then appended in one request
        tables = []
        for page in event_pages:
            if page.get("descriptor") != descriptor["uid"]:
                raise ValueError(f"event page {page.get('uid')!r} belongs to descriptor "
                                 f"{page.get('descriptor')!r}, not {descriptor['uid']!r}")
            try:
                page_validator.validate(page)
            except Exception as err:
                raise ValueError(f"event page {page.get('uid')!r} is not valid: {err}") from err
            table = _table(page, data_keys, schema)
            if table.num_rows:
                tables.append(table)
        if tables:
            table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
            table_node.append_partition(0, table)
            rows = table.num_rows
    except BaseException:
        try:
            base.delete_contents(name, recursive=True, external_only=False)
        except Exception:
            log.exception("could not delete the partial stream %r of run %s", name, uid)
        raise

    new_stop = dict(stop)
    num_events = dict(new_stop.get("num_events") or {})
    num_events[name] = rows
    new_stop["num_events"] = num_events
    by_model = {k: dict(v) for k, v in (stop.get("xsml_by_model") or {}).items()}
    if stop.get("xsml_model") and stop.get("xsml_stream") and \
            str(stop["xsml_model"]) not in by_model:
        by_model[str(stop["xsml_model"])] = _by_model_entry(stop, str(stop["xsml_stream"]))
    full = {**summary, "xsml_stream": name}
    model = str(summary["xsml_model"])
    by_model[model] = _by_model_entry(full, name)
    new_stop["xsml_by_model"] = by_model
    if make_current:
        new_stop.update({k: full[k] for k in SUMMARY_KEYS if k in full})
    event_model.schema_validators[event_model.DocumentNames.stop].validate(new_stop)
    base.patch_metadata(_stop_patch(stop, new_stop, model))
    return AppendResult(uid=uid, stream=name, rows=rows, stop=new_stop)


def _status(err: BaseException) -> int:
    """The HTTP status of a Tiled client error (0 if it is not one)."""
    return int(getattr(getattr(err, "response", None), "status_code", 0) or 0)


def _stop_patch(old: Mapping, new: Mapping, model: str) -> list[dict]:
    """JSON Patch (RFC 6902) ops that turn stop ``old`` into ``new``.

    One op per changed stop key, so that the server applies them to the stop
    it holds: a concurrent append of another model to the same run keeps its
    own ``xsml_by_model`` entry (unless both create ``xsml_by_model`` at once).
    Values are replaced whole: ``update_metadata`` would merge dicts and keep
    tag counts of the previous tagging.
    """
    ops: list[dict] = []
    for key, value in new.items():
        if key == "xsml_by_model" and "xsml_by_model" in old:
            for ckpt, entry in value.items():
                if old["xsml_by_model"].get(ckpt) != entry:
                    ops.append({"op": "add", "path": f"/stop/xsml_by_model/{_pointer(ckpt)}",
                                "value": entry})
        elif old.get(key, _MISSING) != value:
            ops.append({"op": "add", "path": f"/stop/{_pointer(key)}", "value": value})
    return ops


_MISSING = object()


def _pointer(key: str) -> str:
    """Escape a key for a JSON Pointer."""
    return str(key).replace("~", "~0").replace("/", "~1")


# ------------------------------------------------------------------ re-tag
def _image_keys(stream_node, image_keys: Sequence[str] | None) -> list[str]:
    meta = stream_node.metadata
    keys = find_image_keys({"data_keys": meta.get("data_keys") or {}}, image_keys)
    out = []
    for key in keys:
        try:
            shape = stream_node[key].shape
        except KeyError:
            continue
        if len(shape) >= 3:  # (events, [frames,] H, W)
            out.append(key)
    return out


def read_rows(array, lo: int, hi: int):
    """Rows ``lo:hi`` of a Tiled array; on failure row by row, errors in their place."""
    try:
        block = np.asarray(array[lo:hi])
        return [block[i] for i in range(hi - lo)]
    except Exception:
        if hi - lo == 1:
            raise
    out: list = []
    for i in range(lo, hi):
        try:
            out.append(np.asarray(array[i:i + 1])[0])
        except Exception as err:  # noqa: BLE001 - a missing external file, a server error
            out.append(err)
    return out


def _tag_rows(tagger, stream: str, key: str, seq_nums, rows, t_read: float,
              beam_center=None, readout=None):
    """FrameResults for the event values ``rows`` (arrays or read errors)."""
    items: list[FrameItem] = []
    for seq, value in zip(seq_nums, rows, strict=False):
        ident = dict(stream=stream, seq_num=seq, event_uid="", key=key, beam_center=beam_center,
                     readout=readout, t_in=t_read)
        if isinstance(value, Exception):
            items.append(FrameItem(skip_reason=f"read_error: {type(value).__name__}: {value}",
                                   **ident))
        else:
            items.extend(split_value(value, **ident))
    return frames_to_results(tagger, items, clock=time.time)


@dataclass
class FrameBlock:
    """The frames of one image data key of one stream of a run, as :func:`tag_run` reads them.

    ``read(lo, hi)`` returns the values of events ``lo:hi`` (arrays, or the
    exception that reading one raised, in its place).
    """

    stream: str
    key: str
    seq_nums: list[int]
    read: Callable[[int, int], list]


def lazy_frame_blocks(base, *, image_keys: Sequence[str] | None = None,
                      streams: Sequence[str] | None = None) -> Iterator[FrameBlock]:
    """The run's image data keys, read from Tiled lazily (a request per batch of events)."""
    wanted = None if streams is None else set(streams)
    for stream in sorted(base):
        if stream.startswith("xsml_tags") or (wanted is not None and stream not in wanted):
            continue
        node = base[stream]
        if "BlueskyEventStream" not in {s.name for s in node.specs}:
            continue
        keys = _image_keys(node, image_keys)
        if not keys:
            continue
        seq_all = [int(s) for s in np.asarray(node["seq_num"].read())]
        for key in keys:
            array = node[key]
            n = min(int(array.shape[0]), len(seq_all))
            yield FrameBlock(stream, key, seq_all[:n],
                             lambda lo, hi, array=array: read_rows(array, lo, hi))


@dataclass
class TaggedRun:
    """A run's tag stream, composed and not written yet (see :func:`tag_run`)."""

    uid: str
    stream: str
    checkpoint: str
    descriptor: dict
    pages: list[dict]
    summary: dict
    frames: int


def tag_run(metadata: Mapping, tagger, blocks: Iterable[FrameBlock], *,
            stream_name: str | None = None, batch_size: int = 16,
            beam_center=None, readout=None) -> TaggedRun:
    """Tag the frames of ``blocks`` and compose the run's tag stream (nothing is written).

    ``metadata`` is the run's (``start`` and ``stop``); ``beam_center`` and
    ``readout`` as in :func:`retag_run`. Frames are tagged ``batch_size``
    events at a time, one event page per batch. The pages are not
    schema-validated here: :func:`append_tag_stream` validates each one
    before it writes anything.

    Raises
    ------
    ConfigurationError
        If ``readout`` (the argument) is malformed; a malformed stored
        ``xsml_readout`` is logged and the run tagged without a readout.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    uid = metadata["start"]["uid"]
    checkpoint = tagger.checkpoint_id
    name = stream_name or tag_stream_name(checkpoint)
    try:
        centers = parse_beam_center(beam_center if beam_center is not None
                                    else metadata["start"].get("xsml_beam_center"))
    except ValueError as err:  # a bad stored value: tag without a centre
        log.warning("run %s: %s; re-tagging without a beam centre", uid, err)
        centers = {}
    if readout is not None:  # the caller's: a bad one is the caller's error
        readouts = parse_readouts(readout, "readout")
    else:
        try:
            readouts = parse_readouts(metadata["start"].get("xsml_readout"))
        except ValueError as err:  # a bad stored value: tag its frames as counts
            log.warning("run %s: %s; re-tagging without a readout", uid, err)
            readouts = {}

    # pages are schema-validated once, by append_tag_stream, before anything is written
    composer = TagStreamComposer(metadata["start"], tagger.tags, tagger.thresholds,
                                 tagger.describe(), name, validate_pages=False)
    pages: list[dict] = []
    summary = RunSummary()
    for block in blocks:
        n = len(block.seq_nums)
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            t_read = time.time()
            rows = block.read(lo, hi)
            results = _tag_rows(tagger, block.stream, block.key, block.seq_nums[lo:hi], rows,
                                t_read, centers.get(block.key, centers.get("*")),
                                readouts.get(block.key, readouts.get("*")))
            summary.add(results)
            if results:
                pages.append(composer.page(results))
    # the descriptor is the composer's, validated by event_model.compose_descriptor
    return TaggedRun(uid=uid, stream=name, checkpoint=checkpoint,
                     descriptor=composer.descriptor, pages=pages,
                     summary=summary.as_dict(stream_name=name, checkpoint_id=checkpoint),
                     frames=summary.frames)


def retag_run(run_node, tagger, *, stream_name: str | None = None, batch_size: int = 16,
              image_keys: Sequence[str] | None = None, streams: Sequence[str] | None = None,
              make_current: bool = True, beam_center=None, readout=None,
              metadata: Mapping | None = None,
              blocks: Iterable[FrameBlock] | None = None) -> RetagResult:
    """Tag a stored run's frames with ``tagger`` and append the tag stream to the run.

    Contract
    --------
    * Idempotent per checkpoint: if the run was already tagged by
      ``tagger.checkpoint_id`` (see :func:`tagged_checkpoints`; the live
      stream counts) or already has a stream named ``stream_name``, nothing
      is written and the result has ``status="skipped"``.
    * Frames are read lazily from Tiled, ``batch_size`` events at a time, from
      every stream of the run (or ``streams``) with image data keys (or
      ``image_keys``); stacks ``(N, H, W)`` in one event give N frames. Only
      the tag pages are kept in memory, never the frames of the whole run.
      A caller that has read the frames already (the batched re-tag of
      :mod:`bluesky_xsml.scaleout.batched`) passes them as ``blocks``.
    * Every frame is accounted for: frames that cannot be read or tagged get
      a row with NaN probabilities and a ``skip_reason``
      (``read_error: ...``, ``bad_shape: ...``, ...), counted in
      ``xsml_skipped``.
    * Documents are composed with
      :class:`~bluesky_xsml.documents.compose.TagStreamComposer` (schema
      validated) and written with :func:`append_tag_stream`, only after all
      frames are tagged; a failure before then writes nothing.
    * ``source_uid`` is ``""``: Tiled keeps no event uids (link rows to
      frames by ``source_stream``, ``source_seq_num``, ``source_key``,
      ``frame_index``).

    Parameters
    ----------
    run_node : BlueskyRun
        ``catalog[uid]`` on a writable Tiled server.
    tagger : Tagger
    stream_name : str, optional
        Default :func:`tag_stream_name` of the checkpoint.
    batch_size : int
        Events read and tagged per step.
    image_keys, streams : sequence of str, optional
        Restrict the frames tagged (ignored when ``blocks`` is given).
    make_current : bool
        See :func:`append_tag_stream`.
    beam_center : [x, y] or dict, optional
        The detector's beam centre for a tagger with a polar head, as
        :class:`~bluesky_xsml.documents.callback.TaggingCallback` takes it.
        Default: the run's start metadata ``xsml_beam_center``, if any.
    readout : Readout, dict or {image key: readout}, optional
        The detector's calibration (:class:`~bluesky_xsml.readout.Readout`),
        as :class:`~bluesky_xsml.documents.callback.TaggingCallback` takes it:
        the stored frames are in ADU and become counts before preprocessing.
        Default: the run's start metadata ``xsml_readout``, if any (a malformed
        one is logged and the frames are tagged as counts).
    metadata : dict, optional
        The run's metadata as just read by the caller: the run is not re-read
        and an existing stream of the same name is found when writing (see
        :func:`append_tag_stream`).
    blocks : iterable of FrameBlock, optional
        The frames to tag (default: :func:`lazy_frame_blocks`).

    Returns
    -------
    RetagResult
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if readout is not None:  # refused before anything is read
        readout = parse_readouts(readout, "readout")
    t0 = time.perf_counter()
    base = refreshed(run_node) if metadata is None else plain_container(run_node)
    md = base.metadata if metadata is None else metadata
    uid = md["start"]["uid"]
    checkpoint = tagger.checkpoint_id
    name = stream_name or tag_stream_name(checkpoint)
    done = tagged_checkpoints(md)
    if checkpoint in done:
        return RetagResult(uid=uid, status="skipped", stream=done[checkpoint],
                           checkpoint=checkpoint,
                           reason=f"already tagged by {checkpoint} in stream {done[checkpoint]!r}")
    if metadata is None and name in base:
        raise TagStreamExistsError(
            f"run {uid} has a stream {name!r} that its stop does not record (an interrupted "
            f"re-tag?); delete it with run.base.delete_contents({name!r}, recursive=True, "
            "external_only=False) and re-tag")
    _run_stop(md, uid)
    if blocks is None:
        blocks = lazy_frame_blocks(base, image_keys=image_keys, streams=streams)
    tagged = tag_run(md, tagger, blocks, stream_name=name, batch_size=batch_size,
                     beam_center=beam_center, readout=readout)
    append_tag_stream(base, tagged.descriptor, tagged.pages, tagged.summary,
                      make_current=make_current, metadata=metadata, descriptor_validated=True)
    return RetagResult(uid=uid, status="tagged", stream=name, checkpoint=checkpoint,
                       frames=tagged.frames, skipped=tagged.summary["xsml_skipped"],
                       tag_counts=tagged.summary["xsml_tag_counts"],
                       seconds=time.perf_counter() - t0)
