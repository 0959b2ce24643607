"""Synthetic datasets on disk (zarr v3) and the ``xsml synth`` command.

Layout of a dataset written by :func:`write_dataset` (a zarr v3 group):

=============  ====================  ==============================================
array          shape / dtype         content
=============  ====================  ==============================================
``frames``     (N, S, S) uint32      raw bits of each frame in the top-left corner
                                     of an ``S x S`` canvas (``S`` = ``size``);
                                     4-byte dtypes bit-for-bit, uint16 and uint8 widened;
                                     padding is 0.  One shard per block of frames,
                                     one compressed chunk per frame.
``labels``     (N, 23) float32       tags in ``TAG_NAMES`` order
``shape``      (N, 2) int32          ``(height, width)`` of each frame
``dtype``      (N,) uint8            index into the ``dtypes`` attribute
``params``     (N,) string           the scene of each frame as JSON
``done``       (n_blocks,) uint8     1 once a block is completely written
=============  ====================  ==============================================

Frame ``i`` is generated from :func:`~bluesky_xsml.sim.generator.frame_seed`
``(seed, i)``, so the content never depends on the number of workers or on
interruptions: rerunning the same command resumes at the first unfinished
block and produces the same bytes as an uninterrupted run.

Examples
--------
>>> import tempfile, os
>>> from bluesky_xsml.sim.dataset import write_dataset, open_dataset
>>> path = os.path.join(tempfile.mkdtemp(), "tiny.zarr")
>>> write_dataset(path, n=3, size=64, seed=1, workers=1, block=2, progress=False)
3
>>> ds = open_dataset(path)
>>> len(ds), ds.labels.shape, max(ds.frames(0).shape)
(3, (3, 23), 64)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context

import numpy as np

from ..errors import ConfigurationError, FrameSourceError
from ..tags import TAG_NAMES
from .generator import SCENE_VERSION, SceneGenerator
from .geometry import resolve_detectors
from .variety import PROFILES, resolve_variety

__all__ = ["DTYPES", "FORMAT", "SynthDataset", "add_arguments", "main", "open_dataset",
           "write_dataset"]

FORMAT = "bluesky-xsml-synth"
FORMAT_VERSION = 1
#: Frame dtypes, indexed by the ``dtype`` array.
DTYPES: tuple[str, ...] = ("int32", "uint32", "uint16", "float32", "uint8")
#: Classic-profile stores list only these (their settings are unchanged).
_CLASSIC_DTYPES = DTYPES[:4]
_TARGET_SHARD_BYTES = 64 * 2**20


def _default_block(side: int) -> int:
    return int(max(1, min(256, _TARGET_SHARD_BYTES // (side * side * 4))))


def _settings(n, size, seed, detectors, block, variety: str = "classic") -> dict:
    dets = resolve_detectors(detectors)
    side = int(size) if size is not None else max(max(d.shape) for d in dets)
    classic = resolve_variety(variety).classic
    st = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "n": int(n),
        "size": None if size is None else int(size), "side": side, "seed": int(seed),
        "detectors": [d.name for d in dets], "block": int(block or _default_block(side)),
        "tag_names": list(TAG_NAMES), "dtypes": list(_CLASSIC_DTYPES if classic else DTYPES),
    }
    if not classic:   # classic stores keep the settings they had before profiles existed
        st["variety"] = resolve_variety(variety).name
    return st


def _create(path: str, st: dict) -> None:
    import zarr
    from zarr.codecs import BloscCodec, BloscShuffle

    n, side, block = st["n"], st["side"], st["block"]
    nb = math.ceil(n / block)
    root = zarr.open_group(path, mode="w")
    comp = BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle)
    root.create_array("frames", shape=(n, side, side), chunks=(1, side, side),
                      shards=(block, side, side), dtype="uint32", compressors=comp, fill_value=0)
    root.create_array("labels", shape=(n, len(TAG_NAMES)), chunks=(block, len(TAG_NAMES)),
                      dtype="float32", fill_value=0.0)
    root.create_array("shape", shape=(n, 2), chunks=(block, 2), dtype="int32", fill_value=0)
    root.create_array("dtype", shape=(n,), chunks=(block,), dtype="uint8", fill_value=0)
    root.create_array("params", shape=(n,), chunks=(block,), dtype=str)
    root.create_array("done", shape=(nb,), chunks=(1,), dtype="uint8", fill_value=0)
    root.attrs.update({**st, "scene_version": SCENE_VERSION})


def _write_block(path: str, st: dict, k: int) -> int:
    """Generate and store block ``k``; runs in a worker process."""
    import zarr

    block, n, side = st["block"], st["n"], st["side"]
    i0, i1 = k * block, min(n, (k + 1) * block)
    gen = SceneGenerator(seed=st["seed"], size=st["size"], detectors=st["detectors"],
                         variety=st.get("variety", "classic"))
    bits = np.zeros((i1 - i0, side, side), np.uint32)
    labels = np.zeros((i1 - i0, len(TAG_NAMES)), np.float32)
    shapes = np.zeros((i1 - i0, 2), np.int32)
    codes = np.zeros(i1 - i0, np.uint8)
    params = []
    for j, i in enumerate(range(i0, i1)):
        frame, lab, scene = gen.frame_at(i)
        h, w = frame.shape
        bits[j, :h, :w] = _to_bits(frame)
        labels[j] = lab
        shapes[j] = (h, w)
        codes[j] = DTYPES.index(frame.dtype.name)
        params.append(json.dumps(scene, separators=(",", ":")))
    root = zarr.open_group(path, mode="r+")
    root["frames"][i0:i1] = bits
    root["labels"][i0:i1] = labels
    root["shape"][i0:i1] = shapes
    root["dtype"][i0:i1] = codes
    root["params"][i0:i1] = np.array(params, dtype=object)
    root["done"][k] = 1
    return i1 - i0


def _to_bits(frame: np.ndarray) -> np.ndarray:
    if frame.dtype.itemsize == 4:
        return frame.view(np.uint32)
    if frame.dtype in (np.uint16, np.uint8):
        return frame.astype(np.uint32)
    raise ConfigurationError(
        f"cannot store frames of dtype {frame.dtype}; expected one of {DTYPES}")


def _from_bits(bits: np.ndarray, h: int, w: int, code: int) -> np.ndarray:
    dt = np.dtype(DTYPES[code])
    sub = bits[:h, :w]
    if dt.itemsize == 4:
        return np.ascontiguousarray(sub).view(dt)
    return sub.astype(dt)


def write_dataset(path: str, n: int, *, size: int | None = 256, seed: int = 0,
                  detectors=None, workers: int | None = None, block: int | None = None,
                  limit: int | None = None, overwrite: bool = False,
                  progress: bool = True, variety: str = "classic") -> int:
    """Write (or resume writing) a synthetic dataset.

    Parameters
    ----------
    path : str
        Directory of the zarr store.
    n : int
        Number of frames.
    size : int or None
        Longest side of the frames (``None``: native detector resolution).
    seed : int
        Dataset seed; frame ``i`` uses ``frame_seed(seed, i)``.
    detectors : optional
        Detector selection (see :func:`~bluesky_xsml.sim.geometry.resolve_detectors`).
    workers : int, optional
        Worker processes (default: the CPUs available to this process).
    block : int, optional
        Frames per shard and per task (default: about 64 MiB per shard).
    limit : int, optional
        Write at most this many frames in this call (whole blocks); rerun to continue.
    overwrite : bool
        Replace an existing store written with other settings.
    progress : bool
        Show a tqdm progress bar.
    variety : str
        Generator profile, ``"classic"`` (default) or ``"wide"``.

    Returns
    -------
    int
        Frames complete in the store after this call.

    Raises
    ------
    ConfigurationError
        For invalid arguments, or an existing store with other settings (unless
        ``overwrite``).
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigurationError(f"n must be a positive integer, got {n!r}")
    if size is not None and (not isinstance(size, (int, np.integer)) or size < 16):
        raise ConfigurationError(
            f"size must be an integer >= 16 (or None for native), got {size!r}")
    if block is not None and (not isinstance(block, (int, np.integer)) or block < 1):
        raise ConfigurationError(f"block must be a positive integer, got {block!r}")
    if workers is not None and (not isinstance(workers, (int, np.integer)) or workers < 1):
        raise ConfigurationError(f"workers must be a positive integer, got {workers!r}")
    st = _settings(n, size, seed, detectors, block, variety)
    path = os.fspath(path)
    if os.path.exists(path):
        old = _read_settings(path)
        if old is not None:   # classic stores have no "variety" attribute
            old = {"variety": "classic", **old}
        st_cmp = {"variety": "classic", **st}
        same = old is not None and all(old.get(k) == v for k, v in st_cmp.items())
        if not same:
            if not overwrite:
                if old is None:
                    what = "is not a synthetic dataset"
                else:
                    diff = ", ".join(f"{k}: {old.get(k)!r} != {v!r}"
                                     for k, v in st_cmp.items() if old.get(k) != v)
                    what = f"was written with different settings ({diff})"
                raise ConfigurationError(
                    f"{path} {what}; rerun with the same arguments to resume, use a new --out, "
                    "or pass --overwrite to replace it")
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if not os.path.exists(path):
        _create(path, st)
    import zarr

    done = zarr.open_group(path, mode="r")["done"][:]
    block = st["block"]
    sizes = [min(n, (k + 1) * block) - k * block for k in range(len(done))]
    pending = [k for k in range(len(done)) if not done[k]]
    if limit is not None:
        if limit < 1:
            raise ConfigurationError(f"limit must be a positive integer, got {limit!r}")
        keep, total = [], 0
        for k in pending:
            if total >= limit:
                break
            keep.append(k)
            total += sizes[k]
        pending = keep
    n_done = sum(s for s, d in zip(sizes, done, strict=True) if d)
    workers = workers or _cpus()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, initial=n_done, unit="frame", desc="xsml synth", smoothing=0.05)
    try:
        if workers == 1 or len(pending) <= 1:
            for k in pending:
                n_done += _write_block(path, st, k)
                if bar is not None:
                    bar.update(sizes[k])
        else:
            ctx = get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(workers, len(pending)), mp_context=ctx) as ex:
                todo = iter(pending)
                running = {}
                for k in todo:
                    running[ex.submit(_write_block, path, st, k)] = k
                    if len(running) >= 2 * workers:
                        break
                while running:
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        k = running.pop(fut)
                        n_done += fut.result()
                        if bar is not None:
                            bar.update(sizes[k])
                        nxt = next(todo, None)
                        if nxt is not None:
                            running[ex.submit(_write_block, path, st, nxt)] = nxt
    finally:
        if bar is not None:
            bar.close()
    return n_done


def _cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _read_settings(path: str) -> dict | None:
    import zarr

    try:
        attrs = dict(zarr.open_group(path, mode="r").attrs)
    except Exception:  # noqa: BLE001 - no readable store there (zarr's errors vary): none
        return None
    return attrs if attrs.get("format") == FORMAT else None


class SynthDataset:
    """Read access to a dataset written by :func:`write_dataset`.

    ``len(ds)`` frames; ``ds.frames(i)`` (or ``ds[i]``) returns frame ``i``
    exactly as generated (shape, dtype and sentinels); ``ds.frames(slice)``,
    ``ds[a:b]`` or a list of indices return lists of frames.  ``ds.labels`` is
    the ``(N, 23)`` float32 label matrix and ``ds.params(i)`` the scene dict.
    """

    def __init__(self, path: str):
        import zarr

        st = _read_settings(path)
        if st is None:
            raise FrameSourceError(f"{path} is not a bluesky-xsml synthetic dataset",
                                   reason="missing_file")
        self.path = os.fspath(path)
        self.attrs = st
        self._root = zarr.open_group(path, mode="r")
        self._labels = None
        self._shape = self._root["shape"][:]
        self._dtype = self._root["dtype"][:]
        self._done = self._root["done"][:].astype(bool)
        self.block = int(st["block"])

    def __len__(self) -> int:
        return int(self.attrs["n"])

    @property
    def complete(self) -> bool:
        """Whether every frame has been written."""
        return bool(self._done.all())

    @property
    def written(self) -> np.ndarray:
        """Boolean ``(N,)``: which frames are written."""
        return np.repeat(self._done, self.block)[: len(self)]

    @property
    def labels(self) -> np.ndarray:
        """``(N, 23)`` float32 labels in ``TAG_NAMES`` order (0 for unwritten frames)."""
        if self._labels is None:
            self._labels = self._root["labels"][:]
        return self._labels

    @property
    def shapes(self) -> np.ndarray:
        """``(N, 2)`` int32 frame shapes."""
        return self._shape

    def dtype_of(self, i: int) -> np.dtype:
        return np.dtype(DTYPES[int(self._dtype[self._index(i)])])

    def _index(self, i) -> int:
        i = int(i)
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"frame index {i} out of range for a dataset of {n} frames")
        if not self._done[i // self.block]:
            raise FrameSourceError(
                f"frame {i} of {self.path} has not been written yet; rerun `xsml synth` with "
                "the same arguments to finish the dataset", reason="missing_frame")
        return i

    def _indices(self, key) -> list[int]:
        if isinstance(key, slice):
            return list(range(*key.indices(len(self))))
        if isinstance(key, (int, np.integer)):
            return [int(key)]
        return [int(v) for v in key]

    def frames(self, key):
        """Frame ``key`` (int) or a list of frames (slice or sequence of ints)."""
        if isinstance(key, (int, np.integer)):
            i = self._index(key)
            h, w = self._shape[i]
            return _from_bits(self._root["frames"][i, :h, :w], h, w, int(self._dtype[i]))
        idx = [self._index(i) for i in self._indices(key)]
        if not idx:
            return []
        lo, hi = min(idx), max(idx) + 1
        hmax = int(self._shape[lo:hi, 0].max())
        wmax = int(self._shape[lo:hi, 1].max())
        if hi - lo <= 2 * len(idx):
            bits = self._root["frames"][lo:hi, :hmax, :wmax]
            return [_from_bits(bits[i - lo], *self._shape[i], int(self._dtype[i])) for i in idx]
        return [self.frames(i) for i in idx]

    __getitem__ = frames

    def frame(self, i: int) -> np.ndarray:
        """Frame ``i`` exactly as generated (same as ``frames(i)``)."""
        return self.frames(int(i))

    def read_padded(self, start: int, stop: int):
        """Raw storage of frames ``start:stop`` for fast loaders.

        Returns ``(bits, shapes, dtypes)``: ``(m, S, S)`` uint32 bits, ``(m, 2)``
        shapes and the dtype name of each frame; decode with ``bits[:h, :w]``
        viewed as the dtype (uint16 frames: ``astype``).
        """
        for i in (start, stop - 1):
            self._index(i)
        bits = self._root["frames"][start:stop]
        return bits, self._shape[start:stop], [DTYPES[c] for c in self._dtype[start:stop]]

    def params(self, i: int) -> dict:
        """Scene parameters of frame ``i`` (as passed to ``render_scene``)."""
        i = self._index(i)
        return json.loads(str(self._root["params"][i]))


def open_dataset(path: str) -> SynthDataset:
    """Open a dataset written by :func:`write_dataset` / ``xsml synth``.

    Raises
    ------
    FrameSourceError
        If ``path`` is not such a dataset.
    """
    if not os.path.exists(path):
        raise FrameSourceError(f"no dataset at {path}", reason="missing_file")
    return SynthDataset(path)


# ---------------------------------------------------------------------------
# CLI


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _size(text: str):
    if text.lower() == "native":
        return None
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= 16 or 'native', got {text!r}") from None
    if v < 16:
        raise argparse.ArgumentTypeError(f"size must be >= 16 pixels, got {v}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``xsml synth``."""
    parser.add_argument("--n", type=_positive_int, required=True, help="number of frames")
    parser.add_argument("--out", required=True, help="output zarr directory (e.g. train.zarr)")
    parser.add_argument("--size", type=_size, default=256,
                        help="longest side of the frames in pixels, or 'native' (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--workers", type=_positive_int, default=None,
                        help="worker processes (default: all available CPUs)")
    parser.add_argument("--detectors", nargs="+", default=None, metavar="DET",
                        help="detector names, native shapes HxW, families, or "
                             "train/heldout/all (default: train)")
    parser.add_argument("--block", type=_positive_int, default=None,
                        help="frames per shard/task (default: ~64 MiB per shard)")
    parser.add_argument("--limit", type=_positive_int, default=None,
                        help="write at most this many frames now (whole blocks); rerun to resume")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing dataset written with other settings")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--variety", choices=sorted(PROFILES), default="classic",
                        help="generator profile (default classic; wide: more shape families, "
                             "readouts and geometries, see docs/synthetic-data.md)")


def main(args: argparse.Namespace) -> int:
    """Run ``xsml synth``; returns 0 on success, 2 for bad arguments."""
    try:
        done = write_dataset(args.out, args.n, size=args.size, seed=args.seed,
                             detectors=args.detectors, workers=args.workers, block=args.block,
                             limit=args.limit, overwrite=args.overwrite,
                             progress=not args.no_progress,
                             variety=getattr(args, "variety", "classic"))
    except ConfigurationError as err:
        print(f"xsml synth: error: {err}", file=sys.stderr)
        return 2
    if done < args.n:
        print(f"xsml synth: {done}/{args.n} frames written to {args.out}; rerun the same "
              "command to continue", file=sys.stderr)
    else:
        print(f"xsml synth: {done} frames in {args.out}", file=sys.stderr)
    return 0
