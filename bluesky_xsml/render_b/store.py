"""Write renderer B's frames in the project's synthetic-dataset format.

The layout is the one documented in :mod:`bluesky_xsml.sim.dataset` (a zarr v3
group with ``frames``, ``labels``, ``shape``, ``dtype``, ``params`` and
``done``), so :func:`bluesky_xsml.sim.dataset.open_dataset`, ``xsml train`` and
``xsml evaluate`` read it unchanged.  Only the format is shared; this module
writes it itself and imports nothing from ``bluesky_xsml.sim``.  Each frame's
``params`` is renderer B's scene, with ``geometry.beam_center`` ``[x, y]`` and
``detector.name`` where the training code looks for them.

Frame ``i`` comes from :func:`~bluesky_xsml.render_b.frame_rng` ``(seed, i)``,
so a store's bytes do not depend on the number of workers, and an interrupted
run resumes at the first unfinished block.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict

import numpy as np

from ..tags import TAG_NAMES

__all__ = ["DTYPES", "FORMAT", "write"]

#: The format name and the frame dtypes (indexed by ``dtype``) of ``xsml synth`` stores.
FORMAT = "bluesky-xsml-synth"
FORMAT_VERSION = 1
DTYPES: tuple[str, ...] = ("int32", "uint32", "uint16", "float32")


def _settings(n, seed, block, sampler) -> dict:
    from . import RENDERER_VERSION
    from .detectors import detector

    side = max(max(detector(d).shape) for d in sampler.detectors)
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "n": int(n), "size": None,
            "side": int(side), "seed": int(seed), "detectors": list(sampler.detectors),
            "block": int(block), "tag_names": list(TAG_NAMES), "dtypes": list(DTYPES),
            "renderer": "render_b", "renderer_version": RENDERER_VERSION,
            "sampler": json.loads(json.dumps(asdict(sampler), default=str))}


def _create(path: str, st: dict) -> None:
    import zarr
    from zarr.codecs import BloscCodec, BloscShuffle

    n, side, block = st["n"], st["side"], st["block"]
    root = zarr.open_group(path, mode="w")
    comp = BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.bitshuffle)
    root.create_array("frames", shape=(n, side, side), chunks=(1, side, side),
                      shards=(block, side, side), dtype="uint32", compressors=comp, fill_value=0)
    root.create_array("labels", shape=(n, len(TAG_NAMES)), chunks=(block, len(TAG_NAMES)),
                      dtype="float32", fill_value=0.0)
    root.create_array("shape", shape=(n, 2), chunks=(block, 2), dtype="int32", fill_value=0)
    root.create_array("dtype", shape=(n,), chunks=(block,), dtype="uint8", fill_value=0)
    root.create_array("params", shape=(n,), chunks=(block,), dtype=str)
    root.create_array("done", shape=(math.ceil(n / block),), chunks=(1,), dtype="uint8",
                      fill_value=0)
    root.attrs.update(st)


def _bits(frame: np.ndarray) -> np.ndarray:
    if frame.dtype.itemsize == 4:
        return frame.view(np.uint32)
    if frame.dtype == np.uint16:
        return frame.astype(np.uint32)
    raise ValueError(f"cannot store frames of dtype {frame.dtype}")


def _write_block(path: str, st: dict, k: int, sampler_fields: dict) -> int:
    import zarr

    from . import render_scene
    from .sampler import SceneSampler

    sampler = SceneSampler(**sampler_fields)
    block, n, side = st["block"], st["n"], st["side"]
    i0, i1 = k * block, min(n, (k + 1) * block)
    bits = np.zeros((i1 - i0, side, side), np.uint32)
    labels = np.zeros((i1 - i0, len(TAG_NAMES)), np.float32)
    shapes = np.zeros((i1 - i0, 2), np.int32)
    codes = np.zeros(i1 - i0, np.uint8)
    params = []
    for j, i in enumerate(range(i0, i1)):
        frame, lab, scene = render_scene(st["seed"], i, sampler)
        h, w = frame.shape
        bits[j, :h, :w] = _bits(frame)
        labels[j], shapes[j] = lab, (h, w)
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


def write(path, n: int, *, seed: int = 0, workers: int = 1, block: int = 16,
          sampler=None, overwrite: bool = False, progress: bool = False) -> int:
    """Write (or resume) ``n`` frames of renderer B at ``path``.

    Parameters
    ----------
    path : path-like
        Directory of the zarr store.
    n : int
        Number of frames.
    seed : int
        Dataset seed.
    workers : int
        Processes rendering blocks (1: in this process).
    block : int
        Frames per shard and per task.
    sampler : SceneSampler, optional
        Scene distributions (default ``SceneSampler()``).
    overwrite : bool
        Replace a store written with other settings (otherwise ``ValueError``).
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    int
        Frames complete in the store.
    """
    from .sampler import SceneSampler

    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"block must be a positive integer, got {block!r}")
    sampler = sampler or SceneSampler()
    st = _settings(n, seed, block, sampler)
    path = os.fspath(path)
    if os.path.exists(path):
        import zarr

        try:
            old = dict(zarr.open_group(path, mode="r").attrs)
        except Exception:  # noqa: BLE001 - no readable store there (zarr's errors vary): none
            old = None
        if old != json.loads(json.dumps(st)):
            if not overwrite:
                raise ValueError(f"{path} exists with other settings; use a new path or "
                                 "overwrite=True (--overwrite)")
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if not os.path.exists(path):
        _create(path, st)
    import zarr

    done = zarr.open_group(path, mode="r")["done"][:]
    pending = [k for k in range(len(done)) if not done[k]]
    fields = {f: getattr(sampler, f) for f in sampler.__dataclass_fields__}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, initial=n - sum(min(n, (k + 1) * block) - k * block
                                            for k in pending), unit="frame", desc="render_b")
    try:
        if workers <= 1 or len(pending) <= 1:
            for k in pending:
                m = _write_block(path, st, k, fields)
                if bar is not None:
                    bar.update(m)
        else:
            from concurrent.futures import ProcessPoolExecutor
            from multiprocessing import get_context

            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as ex:
                for m in ex.map(_write_block, [path] * len(pending), [st] * len(pending),
                                pending, [fields] * len(pending)):
                    if bar is not None:
                        bar.update(m)
    finally:
        if bar is not None:
            bar.close()
    done = zarr.open_group(path, mode="r")["done"][:]
    return int(sum(min(n, (k + 1) * block) - k * block for k, d in enumerate(done) if d))
