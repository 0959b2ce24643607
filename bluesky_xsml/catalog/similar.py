"""Frames like this one: nearest neighbours of a frame's embedding across runs.

Every tag event carries the frame's embedding (``embedding``: base64 of an
L2-normalised float16 vector, see :mod:`bluesky_xsml.novelty`), so the
embeddings are stored with the tag stream and any Tiled user can read them.
A :class:`SimilarityIndex` gathers them (one request per run), and answers
"which stored frames are most like this one" by cosine similarity: one
``(N, D) @ (D,)`` product over float16 rows (exact, brute force).

Scale (docs/novelty.md): brute force over ``N`` frames of ``D = 64`` float16
dimensions holds ``128 N`` bytes (128 MB per million frames) and costs ``N D``
multiply-adds per query (about 64 M per million, tens of milliseconds on one
core). Past a few million frames an approximate index replaces the product:
IVF-PQ (e.g. FAISS ``IndexIVFPQ`` with 4096 lists and 16 bytes per code: about
16 MB per million frames plus the ids) or HNSW (about ``4 D + 2 M * 4`` bytes
per frame, ~0.4 GB per million with ``M = 32``, over float32 vectors).
:meth:`SimilarityIndex.save` writes the side index next to a catalog so it need
not be rebuilt.

Examples
--------
>>> import numpy as np
>>> rows = [{"uid": "a", "seq_num": i, "stream": "primary", "key": "img",
...          "frame_index": 0, "tags": ""} for i in range(3)]
>>> vecs = np.array([[1, 0], [0.8, 0.6], [0, 1]], np.float16)
>>> idx = SimilarityIndex(vecs, rows)
>>> [r["seq_num"] for r in idx.nearest(vecs[0], k=2)]
[0, 1]
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..novelty import decode_embedding

__all__ = ["SimilarityIndex", "find_similar", "ROW_FIELDS"]

log = logging.getLogger(__name__)

#: What each indexed frame records besides its embedding.
ROW_FIELDS = ("uid", "scan_id", "stream", "seq_num", "key", "frame_index", "tags", "novelty")

_COLUMNS = ["source_stream", "source_seq_num", "source_key", "frame_index", "tags", "novelty",
            "embedding"]


class SimilarityIndex:
    """Embeddings of stored frames, searchable by cosine similarity.

    Parameters
    ----------
    vectors : (N, D) array
        L2-normalised embeddings (stored as float16).
    rows : sequence of dict
        One per vector: :data:`ROW_FIELDS`.
    """

    def __init__(self, vectors: np.ndarray, rows: Sequence[Mapping[str, Any]]):
        v = np.asarray(vectors, np.float16)
        if v.ndim != 2 or len(v) != len(rows):
            raise ValueError(f"need (N, D) vectors and N rows; got {v.shape} and {len(rows)} rows")
        self.vectors = np.ascontiguousarray(v)
        self.rows = [dict(r) for r in rows]
        self._where = {(r["uid"], r["stream"], int(r["seq_num"]), r["key"],
                        int(r["frame_index"])): i for i, r in enumerate(self.rows)}

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes of the vectors (what a million frames would need is ``nbytes / N * 1e6``)."""
        return int(self.vectors.nbytes)

    # ------------------------------------------------------------ building
    @classmethod
    def from_catalog(cls, catalog_or_runs, *, stream: str | None = None) -> SimilarityIndex:
        """Read the embeddings of every tagged frame of the runs (one request per run).

        Frames without an embedding (skipped, or tagged by a model without
        novelty statistics) are left out.
        """
        from .query import _iter_runs

        vecs: list[np.ndarray] = []
        rows: list[dict] = []
        for run in _iter_runs(catalog_or_runs):
            try:
                v, r = _run_embeddings(run, stream)
            except KeyError as err:
                log.info("similar: run skipped (%s)", err)
                continue
            vecs.extend(v)
            rows.extend(r)
        dim = len(vecs[0]) if vecs else 0
        return cls(np.asarray(vecs, np.float16).reshape(len(vecs), dim), rows)

    # ------------------------------------------------------------ querying
    def position(self, uid: str, seq_num: int, *, stream: str | None = None,
                 key: str | None = None, frame_index: int = 0) -> int:
        """Row of a frame (``stream``/``key``: the only ones the run has, when not given).

        Raises
        ------
        KeyError
            No such frame in the index (the message says what the run has).
        """
        cands = [i for (u, s, q, k, f), i in self._where.items()
                 if (u == uid or (len(uid) >= 8 and u.startswith(uid))) and q == int(seq_num)
                 and (stream is None or s == stream) and (key is None or k == key)
                 and f == int(frame_index)]
        if len(cands) != 1:
            have = sorted({(s, k) for (u, s, q, k, f) in self._where
                           if u == uid or (len(uid) >= 8 and u.startswith(uid))})
            what = "no frame" if not cands else f"{len(cands)} frames"
            raise KeyError(f"{what} with embedding at run {uid!r} seq_num {seq_num} frame "
                           f"{frame_index} (stream/key given: {stream!r}/{key!r}; the run's "
                           f"indexed (stream, key): {have or 'none'})")
        return cands[0]

    def nearest(self, vector: np.ndarray, k: int = 10, *, exclude: int | None = None
                ) -> list[dict]:
        """The ``k`` rows most similar to ``vector``, best first, with ``similarity``."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.asarray(vector, np.float32).ravel()
        if q.shape != (self.dim,):
            raise ValueError(f"query has {q.size} dimensions; the index has {self.dim}")
        n = len(self)
        if n == 0:
            return []
        sims = self.vectors @ q.astype(np.float16)
        sims = sims.astype(np.float32)
        if exclude is not None:
            sims[exclude] = -np.inf
        kk = min(k, n - (exclude is not None))
        if kk <= 0:
            return []
        top = np.argpartition(-sims, kk - 1)[:kk]
        top = top[np.lexsort((top, -sims[top]))]
        return [{**self.rows[i], "similarity": float(sims[i])} for i in top]

    def similar_to(self, uid: str, seq_num: int, k: int = 10, **where) -> list[dict]:
        """The ``k`` stored frames most like frame (``uid``, ``seq_num``), itself left out."""
        i = self.position(uid, seq_num, **where)
        return self.nearest(self.vectors[i], k, exclude=i)

    # ------------------------------------------------------------ storage
    def save(self, path: str | os.PathLike) -> Path:
        """Write the side index (``.npz``, no pickle) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, vectors=self.vectors,
                         rows=np.asarray(json.dumps(self.rows, default=_plain)))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> SimilarityIndex:
        with np.load(path, allow_pickle=False) as z:
            return cls(z["vectors"], json.loads(str(z["rows"])))


def _plain(o):
    if isinstance(o, np.generic):
        return o.item()
    return str(o)


def _run_embeddings(run, stream: str | None) -> tuple[list[np.ndarray], list[dict]]:
    from .query import _run_table, tag_stream_node

    md = run.metadata
    start, stop = md.get("start") or {}, md.get("stop") or {}
    name = stream or stop.get("xsml_stream") or "xsml_tags"
    df = _run_table(run, name, _COLUMNS)
    if df is None or not set(_COLUMNS) <= set(df.columns):
        name, node = tag_stream_node(run, stream)
        base = node.base if hasattr(node, "base") else node
        available = set(base["internal"].columns)
        if "embedding" not in available:
            return [], []
        df = base["internal"].read(columns=[c for c in _COLUMNS if c in available])
    dim = None
    vecs, rows = [], []
    for rec in df.to_dict("records"):
        v = decode_embedding(rec.get("embedding") or "", dim)
        if v is None:
            continue
        dim = len(v)
        nov = rec.get("novelty", math.nan)
        vecs.append(v)
        rows.append({"uid": start.get("uid"), "scan_id": start.get("scan_id"),
                     "stream": str(rec["source_stream"]), "seq_num": int(rec["source_seq_num"]),
                     "key": str(rec["source_key"]), "frame_index": int(rec["frame_index"]),
                     "tags": str(rec.get("tags", "")),
                     "novelty": float(nov) if nov is not None else math.nan})
    return vecs, rows


def find_similar(catalog_or_runs, run: str, seq: int, k: int = 10, *, stream: str | None = None,
                 key: str | None = None, frame_index: int = 0,
                 index: SimilarityIndex | None = None):
    """The ``k`` stored frames most like one frame, across runs, as a table.

    Parameters
    ----------
    catalog_or_runs : catalog node, run or iterable of runs
        Where to look (ignored when ``index`` is given).
    run : str
        The query frame's run uid (or its first 8+ characters).
    seq : int
        The query frame's seq_num in its source stream.
    k : int
        How many neighbours.
    stream, key, frame_index
        Which frame of that event, when the run has several image streams,
        keys or frames per event.
    index : SimilarityIndex, optional
        A prebuilt index (:meth:`SimilarityIndex.from_catalog` or
        :meth:`SimilarityIndex.load`); built from ``catalog_or_runs`` when not given.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`ROW_FIELDS` and ``similarity`` (cosine, 1 is identical),
        best first; the query frame itself is left out.

    Raises
    ------
    KeyError
        The query frame has no stored embedding.
    """
    import pandas as pd

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if index is None:
        index = SimilarityIndex.from_catalog(catalog_or_runs, stream=None)
    found = index.similar_to(str(run), int(seq), k, stream=stream, key=key,
                             frame_index=int(frame_index))
    return pd.DataFrame(found, columns=[*ROW_FIELDS, "similarity"])

