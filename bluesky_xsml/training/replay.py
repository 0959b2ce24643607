"""A persistent replay store of labeled frames (zarr), durable before it acknowledges.

Each row is one labeled frame: its preprocessed model input (float16
``(C, S, S)``), its labels (float32, one column per tag name, ``NaN`` where
unknown) and its provenance (a JSON object: where the label came from, which
run/stream/seq_num/key/frame, when, by whom, held out for validation or not).

Layout of the directory (a zarr v3 group)::

    replay.zarr/
      zarr.json            group metadata (attrs: input shape)
      inputs/              (N, C, S, S) float16, one chunk per row
      labels/              (N, T) float32, one chunk per row (up to 256 tag columns)
      provenance/          (N,) JSON strings, one chunk per row
      committed.json       {"count": n, "tags": [...]}: the rows that exist

Appending writes the rows first (every zarr file is written to a temporary
file and renamed, and each is ``fsync``-ed), then replaces ``committed.json``
atomically (temporary file, ``fsync``, ``os.replace``, ``fsync`` of the
folder). Only then does :meth:`ReplayStore.append` return. A crash before the
commit leaves extra rows beyond ``count`` that are ignored and overwritten by
the next append; a crash after it loses nothing. So an acknowledged label
survives a process kill (and a power cut, as far as ``fsync`` reaches).

Examples
--------
>>> import numpy as np, tempfile
>>> from bluesky_xsml.training.replay import ReplayStore
>>> store = ReplayStore(tempfile.mkdtemp() + "/replay.zarr", input_shape=(6, 8, 8),
...                     tags=("a", "b"))
>>> rows = store.append(np.zeros((2, 6, 8, 8)), np.array([[1, np.nan], [0, 1]]),
...                     [{"source": "doc"}, {"source": "doc"}])
>>> rows, len(store)
([0, 1], 2)
>>> store.add_tags(["c"])
('a', 'b', 'c')
>>> store.labels()[0].tolist()
[1.0, nan, nan]
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigurationError
from ..tags import validate_tag_names

__all__ = ["MAX_TAGS", "ReplayStore", "atomic_write_json", "frame_identity"]

#: Most tag columns a store can hold (the label chunk width).
MAX_TAGS = 256
_COMMIT = "committed.json"


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as JSON atomically: temporary file, fsync, rename, fsync folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)
    return path


def frame_identity(prov: Mapping[str, Any]) -> tuple | None:
    """The frame a provenance record refers to, or ``None`` for anonymous rows."""
    if not prov.get("run_uid"):
        return None
    return (prov.get("run_uid"), prov.get("stream"), prov.get("seq_num"), prov.get("key"),
            prov.get("frame_index", 0))


class ReplayStore:
    """Labeled frames kept on disk for fine-tuning and replay.

    Parameters
    ----------
    path : path
        Folder of the zarr store (created if missing).
    input_shape : tuple of int
        ``(C, S, S)`` of a preprocessed input; must match an existing store.
    tags : sequence of str
        Tag columns to start a new store with (an existing store keeps its
        own, in order; :meth:`add_tags` appends).
    fsync : bool
        ``fsync`` every written file before acknowledging (default). Turning it
        off keeps crash safety against a killed process, not against power loss.
    """

    def __init__(self, path: str | os.PathLike, *, input_shape: Sequence[int] = (6, 128, 128),
                 tags: Sequence[str] = (), fsync: bool = True):
        import zarr

        self.path = Path(path)
        self.fsync = bool(fsync)
        self._lock = threading.RLock()
        input_shape = tuple(int(v) for v in input_shape)
        commit = self.path / _COMMIT
        if commit.exists():
            state = json.loads(commit.read_text())
            self._group = zarr.open_group(str(self.path), mode="r+")
            stored = tuple(int(v) for v in self._group.attrs["input_shape"])
            if stored != input_shape:
                raise ConfigurationError(
                    f"replay store {str(self.path)!r} holds inputs of shape {stored}; this "
                    f"model makes {input_shape}. Use another directory for this model.")
            self._count = int(state["count"])
            self._tags = validate_tag_names(state["tags"])
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            self._group = zarr.open_group(str(self.path), mode="a")
            self._group.attrs["input_shape"] = list(input_shape)
            self._group.attrs["format"] = "bluesky-xsml-replay"
            tags = validate_tag_names(tags)
            if len(tags) > MAX_TAGS:
                raise ConfigurationError(f"a replay store holds at most {MAX_TAGS} tags")
            enc = {"name": "default", "configuration": {"separator": "/"}}
            for name, shape, chunks, dtype, fill in (
                ("inputs", (0, *input_shape), (1, *input_shape), "float16", 0.0),
                ("labels", (0, len(tags)), (1, MAX_TAGS), "float32", float("nan")),
            ):
                if name not in self._group:
                    self._group.create_array(name, shape=shape, chunks=chunks, dtype=dtype,
                                             fill_value=fill, chunk_key_encoding=enc)
            if "provenance" not in self._group:
                self._group.create_array("provenance", shape=(0,), chunks=(1,), dtype=str,
                                         chunk_key_encoding=enc)
            self._count, self._tags = 0, tags
            self._commit(0, tags)
        self.input_shape = input_shape
        self._prov_cache: list[dict] | None = None

    # ----------------------------------------------------------------- reading
    def __len__(self) -> int:
        return self._count

    @property
    def tags(self) -> tuple[str, ...]:
        """Label columns, in order."""
        return self._tags

    def inputs(self, rows: Iterable[int] | slice | None = None) -> np.ndarray:
        """Model inputs of committed ``rows`` (default all), float16 ``(n, C, S, S)``."""
        return self._read("inputs", rows)

    def labels(self, rows: Iterable[int] | slice | None = None) -> np.ndarray:
        """Labels of committed ``rows`` in :attr:`tags` order, float32, ``NaN`` unknown."""
        return self._read("labels", rows).astype(np.float32, copy=False)

    def provenance(self, rows: Iterable[int] | slice | None = None) -> list[dict]:
        """Provenance records of committed ``rows``."""
        with self._lock:
            if self._prov_cache is None or len(self._prov_cache) != self._count:
                raw = self._group["provenance"][: self._count] if self._count else []
                self._prov_cache = [json.loads(str(s)) if s else {} for s in raw]
            cache = self._prov_cache
        if rows is None:
            return list(cache)
        idx = range(self._count)[rows] if isinstance(rows, slice) else rows
        return [cache[int(i)] for i in idx]

    def _read(self, name: str, rows) -> np.ndarray:
        with self._lock:
            n = self._count
            arr = self._group[name]
            if rows is None:
                rows = slice(0, n)
            if isinstance(rows, slice):
                start, stop, _ = rows.indices(n)
                out = arr[start:stop] if stop > start else np.zeros((0, *arr.shape[1:]),
                                                                    arr.dtype)
            else:
                idx = np.asarray(list(rows), dtype=np.int64)
                if idx.size and (idx.min() < 0 or idx.max() >= n):
                    raise IndexError(f"replay rows must be in [0, {n}); got {idx.tolist()}")
                out = (arr.get_orthogonal_selection((idx,)) if idx.size
                       else np.zeros((0, *arr.shape[1:]), arr.dtype))
            if name == "labels":
                out = out[:, : len(self._tags)]
        return np.asarray(out)

    def label_counts(self, rows=None) -> dict[str, dict[str, int]]:
        """Known positive and negative labels per tag (JSON-able)."""
        y = self.labels(rows)
        known = np.isfinite(y)
        pos = (np.where(known, y, 0) >= 0.5) & known
        return {t: {"positive": int(pos[:, j].sum()), "negative": int((known & ~pos)[:, j].sum())}
                for j, t in enumerate(self._tags) if known[:, j].any()}

    def merged(self) -> tuple[np.ndarray, np.ndarray, list[dict]]:
        """Rows with repeated labels of the same frame merged.

        Returns ``(rows, labels, provenance)``: for each distinct frame the
        latest row (whose input is used) with labels combined in order, later
        known values overriding earlier ones. Rows without a frame identity
        (direct ``finetune`` data) are kept as they are.
        """
        y = self.labels()
        prov = self.provenance()
        where: dict[tuple, int] = {}
        keep_rows: list[int] = []
        keep_labels: list[np.ndarray] = []
        keep_prov: list[dict] = []
        for i, (row, p) in enumerate(zip(y, prov, strict=False)):
            ident = frame_identity(p)
            if ident is not None and ident in where:
                k = where[ident]
                known = np.isfinite(row)
                keep_labels[k] = np.where(known, row, keep_labels[k])
                keep_rows[k], keep_prov[k] = i, {**keep_prov[k], **p}
                continue
            if ident is not None:
                where[ident] = len(keep_rows)
            keep_rows.append(i)
            keep_labels.append(row.copy())
            keep_prov.append(dict(p))
        labels = (np.stack(keep_labels) if keep_labels
                  else np.zeros((0, len(self._tags)), np.float32))
        return np.asarray(keep_rows, np.int64), labels, keep_prov

    # ----------------------------------------------------------------- writing
    def add_tags(self, names: Iterable[str]) -> tuple[str, ...]:
        """Append tag columns (existing rows get ``NaN``, unknown); returns all tags."""
        with self._lock:
            new = [n for n in dict.fromkeys(str(n) for n in names) if n not in self._tags]
            if not new:
                return self._tags
            tags = validate_tag_names(self._tags + tuple(new))
            if len(tags) > MAX_TAGS:
                raise ConfigurationError(f"a replay store holds at most {MAX_TAGS} tags")
            self._group["labels"].resize((self._group["labels"].shape[0], len(tags)))
            self._sync_meta("labels")
            self._commit(self._count, tags)
            self._tags = tags
            return tags

    def append(self, inputs: np.ndarray, labels: np.ndarray,
               provenance: Sequence[Mapping[str, Any]] | None = None, *,
               tags: Sequence[str] | None = None) -> list[int]:
        """Add labeled frames durably; returns their row numbers once committed.

        Parameters
        ----------
        inputs : array_like
            ``(n, C, S, S)`` preprocessed inputs (stored as float16).
        labels : array_like
            ``(n, len(tags))``: 1 present, 0 absent, ``NaN`` unknown.
        provenance : sequence of dict, optional
            One JSON-able record per row (a ``time`` is added when missing).
        tags : sequence of str, optional
            Column names of ``labels`` (default: :attr:`tags`); names the store
            does not have yet are added.

        Raises
        ------
        ValueError
            Shapes that do not fit, or label values other than 0, 1 and ``NaN``.
        """
        x = np.asarray(inputs)
        if x.ndim == len(self.input_shape):
            x = x[None]
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"replay inputs must be (n, {', '.join(map(str, self.input_shape))})"
                             f"; got {x.shape}")
        y = np.asarray(labels, dtype=np.float32)
        if y.ndim == 1:
            y = y[None]
        names = tuple(tags) if tags is not None else self._tags
        if y.shape != (len(x), len(names)):
            raise ValueError(f"labels must be (n={len(x)}, {len(names)} tags); got {y.shape}")
        bad = np.isfinite(y) & (y != 0) & (y != 1)
        if bad.any():
            raise ValueError(f"labels must be 0, 1 or NaN (unknown); got {y[bad][:5].tolist()}")
        prov = [dict(p) for p in (provenance or [{} for _ in range(len(x))])]
        if len(prov) != len(x):
            raise ValueError(f"need one provenance record per row ({len(x)}); got {len(prov)}")
        now = time.time()
        for p in prov:
            p.setdefault("time", now)
        text = [json.dumps(p, sort_keys=True, default=str) for p in prov]
        with self._lock:
            if any(n not in self._tags for n in names):
                self.add_tags(names)
            col = [self._tags.index(n) for n in names]
            full = np.full((len(x), len(self._tags)), np.nan, np.float32)
            full[:, col] = y
            a, b = self._count, self._count + len(x)
            if len(x) == 0:
                return []
            for name, value in (("inputs", x.astype(np.float16)), ("labels", full),
                                ("provenance", np.asarray(text, dtype=object))):
                arr = self._group[name]
                if arr.shape[0] != b:
                    arr.resize((b, *arr.shape[1:]))
                    self._sync_meta(name)
                if name == "labels":
                    arr[a:b, : len(self._tags)] = value
                else:
                    arr[a:b] = value
                self._sync_rows(name, a, b)
            self._commit(b, self._tags)
            self._count = b
            self._prov_cache = None
            return list(range(a, b))

    # ---------------------------------------------------------------- helpers
    def _sync_rows(self, name: str, a: int, b: int) -> None:
        if not self.fsync:
            return
        base = self.path / name / "c"
        for i in range(a, b):
            for f in (base / str(i)).rglob("*") if (base / str(i)).is_dir() else [base / str(i)]:
                if f.is_file():
                    _fsync_path(f)
            _fsync_path(base / str(i))
        _fsync_path(base)

    def _sync_meta(self, name: str) -> None:
        if self.fsync:
            _fsync_path(self.path / name / "zarr.json")
            _fsync_path(self.path / name)

    def _commit(self, count: int, tags: Sequence[str]) -> None:
        atomic_write_json(self.path / _COMMIT, {"count": int(count), "tags": list(tags),
                                                "format": "bluesky-xsml-replay",
                                                "format_version": 1})

    def describe(self) -> dict:
        """JSON-able summary: path, rows, tags, label counts."""
        return {"path": str(self.path), "rows": len(self), "tags": list(self._tags),
                "label_counts": self.label_counts()}

    def __repr__(self) -> str:
        return f"<ReplayStore {str(self.path)!r}: {len(self)} rows, {len(self._tags)} tags>"
