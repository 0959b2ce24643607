"""Training data: synthetic frames -> cached, preprocessed model inputs.

Rendering a synthetic frame takes 10-200 ms, preprocessing it ~1 ms and a
training step ~4 ms per frame, so frames are rendered and preprocessed *once*
and the model inputs are cached on disk as float16 ``(N, 6, S, S)`` arrays
(memory-mapped while training), next to the labels, the traditional
baseline's profile features and a little per-frame metadata (detector, shape).

A data source is either

* a synthetic specification string, ``synth:KEY=VALUE,...`` with keys
  ``seed`` (default 0), ``n`` (frames, default 1000), ``sizes`` (rendered
  longest sides joined by ``+``; ``native`` for the detector's own shape;
  frame ``i`` uses ``sizes[i % len(sizes)]``; default ``256``),
  ``detectors`` (``train``, ``heldout``, ``all``, names or ``HxW`` shapes
  joined by ``+``; default ``train``), ``start`` (first frame index,
  default 0) and ``variety`` (generator profile, ``classic`` or ``wide``;
  default ``classic``, the shipped model's data), e.g.
  ``synth:seed=1,n=2000,sizes=256+512+1024`` or
  ``synth:seed=1,n=2000,variety=wide``; or
* a renderer B specification string, ``renderb:KEY=VALUE,...`` with keys
  ``seed`` (default 0), ``n`` (frames, default 1000), ``start`` (first
  frame index, default 0) and ``detectors`` (renderer B's detector names
  joined by ``+``, or ``all``, the default): frame ``i`` is
  :func:`bluesky_xsml.render_b.render_scene` ``(seed, i)`` at the detector's
  native size, the same frame as frame ``i`` of
  ``python -m bluesky_xsml.render_b --seed S`` (with the same
  ``--detectors``), rendered straight into the cache without a zarr store,
  e.g. ``renderb:seed=0,n=24000``; or
* a zarr store written by ``xsml synth`` or ``python -m bluesky_xsml.render_b``
  (read with :func:`bluesky_xsml.sim.dataset.open_dataset`); or
* a directory of already preprocessed arrays (a cache entry, or one written
  by :func:`save_arrays`), used as is; or
* several of these joined by ``|``, concatenated in order, e.g.
  ``synth:seed=4,n=24000|synth:seed=20,n=24000,variety=wide`` (classic and
  wide frames in one training set); each part keeps its own cache entries.

Specification strings are built in shards of :data:`SHARD` frames, each cached
on its own, so a larger ``n`` reuses the frames of a smaller one.  The cache
key is a hash of the source, the preprocessing config, :data:`CACHE_VERSION`
and what identifies the renderer's frames (:func:`generator_fingerprint`,
:func:`renderer_b_fingerprint`), so neither a changed spec nor a changed
renderer ever reuses stale inputs.

Examples
--------
>>> from bluesky_xsml.training.data import SynthSpec
>>> spec = SynthSpec.parse("synth:seed=3,n=10,sizes=256+native,detectors=eiger_4m")
>>> spec.seed, spec.n, spec.sizes, spec.detectors
(3, 10, (256, None), ('eiger_4m',))
>>> spec.size_of(1) is None
True
>>> str(RenderBSpec.parse("renderb:seed=0,n=24000,detectors=b_ccd_512+b_timepix_quad"))
'renderb:seed=0,n=24000,start=0,detectors=b_ccd_512+b_timepix_quad'
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..preprocess import CHANNELS, PreprocessConfig, preprocess_batch
from ..render_b import SceneSampler, render_scene
from ..render_b.detectors import DETECTORS as B_DETECTORS
from ..sim.dataset import open_dataset
from ..sim.generator import SceneGenerator
from ..sim.variety import PROFILES
from ..tags import TAG_NAMES
from .baseline import profile_features

__all__ = ["CACHE_VERSION", "SHARD", "CachedArrays", "RenderBSpec", "SynthSpec",
           "default_cache_dir", "label_frequencies", "load_arrays", "parse_spec",
           "renderer_b_fingerprint", "save_arrays"]

log = logging.getLogger(__name__)

#: Bump when what is cached changes meaning (features, layout).
CACHE_VERSION = 3
_CHUNK = 32
#: Frames per cached shard of a ``synth:`` or ``renderb:`` spec.
SHARD = 2000


def default_cache_dir() -> Path:
    """Where built datasets are cached when no ``cache_dir`` is given.

    ``$XSML_CACHE`` when set, else ``bluesky-xsml`` in ``$XDG_CACHE_HOME``
    (when set to an absolute path, as the XDG base directory specification
    asks), else ``~/.cache/bluesky-xsml``. Read at each call, so a test or a
    job can move it by setting the environment.

    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"XSML_CACHE": "/scratch/xsml"}):
    ...     default_cache_dir().as_posix()
    '/scratch/xsml'
    """
    own = os.environ.get("XSML_CACHE")
    if own:
        return Path(own).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "bluesky-xsml"


def _spec_items(body: str, text: str, what: str):
    """``(key, value)`` of each ``KEY=VALUE`` item of a spec's comma-separated body."""
    for item in filter(None, (p.strip() for p in body.split(","))):
        if "=" not in item:
            raise ValueError(f"bad {what} spec item {item!r} in {text!r}; use KEY=VALUE")
        key, value = (v.strip() for v in item.split("=", 1))
        yield key, value


def _shards(spec, size: int) -> list:
    """``spec`` cut into consecutive specs of at most ``size`` frames (cached separately,
    so a larger ``n`` reuses the frames of a smaller one)."""
    from dataclasses import replace

    return [replace(spec, start=spec.start + a, n=min(size, spec.n - a))
            for a in range(0, spec.n, size)]


@dataclass(frozen=True)
class SynthSpec:
    """A reproducible set of synthetic frames (see the module docstring)."""

    seed: int = 0
    n: int = 1000
    sizes: tuple[int | None, ...] = (256,)
    detectors: tuple[str, ...] = ("train",)
    start: int = 0
    variety: str = "classic"

    @classmethod
    def parse(cls, text: str) -> SynthSpec:
        """Parse ``synth:seed=0,n=100,sizes=256+512,detectors=train``."""
        body = text[len("synth:"):] if text.startswith("synth:") else text
        kw: dict = {}
        for key, value in _spec_items(body, text, "synthetic"):
            if key in ("seed", "n", "start"):
                kw[key] = int(value)
            elif key == "sizes":
                kw[key] = tuple(None if v in ("native", "none", "None") else int(v)
                                for v in value.split("+"))
            elif key == "detectors":
                kw[key] = tuple(value.split("+"))
            elif key == "variety":
                if value not in PROFILES:
                    raise ValueError(f"unknown variety {value!r} in {text!r}; "
                                     f"known: {', '.join(PROFILES)}")
                kw[key] = value
            else:
                raise ValueError(f"unknown synthetic spec key {key!r} in {text!r}; "
                                 "known: seed, n, sizes, detectors, start, variety")
        spec = cls(**kw)
        if spec.n < 1 or not spec.sizes:
            raise ValueError(f"synthetic spec {text!r} needs n >= 1 and at least one size")
        return spec

    def size_of(self, i: int) -> int | None:
        """Rendered size of frame index ``i`` (counted from 0, not from ``start``)."""
        return self.sizes[i % len(self.sizes)]

    def shards(self, size: int) -> list[SynthSpec]:
        """This spec cut into consecutive specs of at most ``size`` frames.

        Shards are cached separately, so a larger ``n`` reuses the frames of a
        smaller one.
        """
        return _shards(self, size)

    def __str__(self) -> str:
        sizes = "+".join("native" if s is None else str(s) for s in self.sizes)
        # classic specs print as they did before profiles existed (same cache keys)
        variety = "" if self.variety == "classic" else f",variety={self.variety}"
        return (f"synth:seed={self.seed},n={self.n},sizes={sizes},"
                f"detectors={'+'.join(self.detectors)},start={self.start}{variety}")


@dataclass(frozen=True)
class RenderBSpec:
    """A reproducible set of renderer B's frames (see the module docstring).

    ``detectors`` is empty for renderer B's default mix (every detector).
    """

    seed: int = 0
    n: int = 1000
    start: int = 0
    detectors: tuple[str, ...] = ()

    PREFIX = "renderb:"

    @classmethod
    def parse(cls, text: str) -> RenderBSpec:
        """Parse ``renderb:seed=0,n=100,start=0,detectors=b_ccd_512+b_timepix_quad``.

        Raises
        ------
        ValueError
            For an item that is not ``KEY=VALUE``, an unknown key, a value that
            is not an integer, ``n < 1``, ``start < 0`` or an unknown detector
            (the message lists the known ones).
        """
        body = text[len(cls.PREFIX):] if text.startswith(cls.PREFIX) else text
        known = {d.name for d in B_DETECTORS}
        kw: dict = {}
        for key, value in _spec_items(body, text, "renderer B"):
            if key in ("seed", "n", "start"):
                try:
                    kw[key] = int(value)
                except ValueError:
                    raise ValueError(f"{key}={value!r} in {text!r} is not an integer") from None
            elif key == "detectors":
                names = tuple(v.strip() for v in value.split("+"))
                if names == ("all",):
                    names = ()
                for name in names:
                    if name not in known:
                        raise ValueError(
                            f"unknown renderer B detector {name!r} in {text!r}; known: all, "
                            f"{', '.join(d.name for d in B_DETECTORS)}")
                kw[key] = names
            else:
                raise ValueError(f"unknown renderer B spec key {key!r} in {text!r}; "
                                 "known: seed, n, start, detectors")
        spec = cls(**kw)
        if spec.n < 1 or spec.start < 0:
            raise ValueError(f"renderer B spec {text!r} needs n >= 1 and start >= 0")
        return spec

    def sampler(self) -> SceneSampler:
        """The scene sampler of these frames (``python -m bluesky_xsml.render_b``'s)."""
        from dataclasses import replace

        return replace(SceneSampler(), detectors=self.detectors) if self.detectors \
            else SceneSampler()

    def shards(self, size: int) -> list[RenderBSpec]:
        """This spec cut into consecutive specs of at most ``size`` frames."""
        return _shards(self, size)

    def __str__(self) -> str:
        dets = f",detectors={'+'.join(self.detectors)}" if self.detectors else ""
        return f"renderb:seed={self.seed},n={self.n},start={self.start}{dets}"


def parse_spec(source: str) -> SynthSpec | RenderBSpec | None:
    """The spec of a ``synth:`` or ``renderb:`` source; ``None`` for a path.

    >>> parse_spec("renderb:n=5").n, parse_spec("runs/b-train.zarr") is None
    (5, True)
    """
    if source.startswith("synth:"):
        return SynthSpec.parse(source)
    if source.startswith(RenderBSpec.PREFIX):
        return RenderBSpec.parse(source)
    return None


@dataclass
class CachedArrays:
    """A dataset held as arrays (the inputs memory-mapped from the cache).

    Attributes
    ----------
    inputs : numpy.ndarray
        ``(N, C, S, S)`` float16 model inputs.
    labels : numpy.ndarray
        ``(N, T)`` float32, ``NaN`` where unknown.
    features : numpy.ndarray or None
        ``(N, F)`` float32 baseline profile features.
    detectors, shapes : numpy.ndarray
        Per frame: detector name and ``(H, W)`` of the raw frame.
    source : str
    centers : numpy.ndarray or None
        ``(N, 2)`` float64 beam centre ``(x, y)`` in raw-frame pixels, ``NaN``
        where unknown (``None`` for data saved without them).
    """

    inputs: np.ndarray
    labels: np.ndarray
    features: np.ndarray | None
    detectors: np.ndarray
    shapes: np.ndarray
    source: str
    tags: tuple[str, ...] = TAG_NAMES
    preprocess: dict | None = None
    centers: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index) -> CachedArrays:
        """Rows ``index`` (a boolean mask or integer index array), loaded in memory."""
        index = np.asarray(index)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        return CachedArrays(np.asarray(self.inputs[np.sort(index)])[np.argsort(np.argsort(index))],
                            self.labels[index],
                            None if self.features is None else self.features[index],
                            self.detectors[index], self.shapes[index],
                            f"{self.source}[subset of {len(index)}]", self.tags,
                            self.preprocess,
                            None if self.centers is None else self.centers[index])


def label_frequencies(labels: np.ndarray) -> np.ndarray:
    """Fraction of positives among the known labels of each tag."""
    y = np.asarray(labels, np.float64)
    known = np.isfinite(y)
    return np.where(known, y >= 0.5, False).sum(0) / np.maximum(known.sum(0), 1)


# --------------------------------------------------------------------- building


def _frames_features(frames, centers, config: PreprocessConfig):
    """Preprocess frames (float16 inputs) and compute baseline features."""
    inputs, _ok, errors = preprocess_batch(frames, config)
    if errors:
        i, err = min(errors.items())
        raise RuntimeError(f"generated frame {i} could not be preprocessed: {err}")
    feats = np.stack([profile_features(f, c) for f, c in zip(frames, centers, strict=True)])
    return inputs.astype(np.float16), feats


def _chunk_arrays(a: int, rendered, config: PreprocessConfig) -> tuple:
    """A worker's result for frames from index ``a``: ``rendered`` yields ``(frame,
    labels, beam centre, detector name)``; the frames are preprocessed and featurised."""
    frames, labels, centers, dets = (list(col) for col in zip(*rendered, strict=True))
    inputs, feats = _frames_features(frames, centers, config)
    return (a, inputs, np.stack(labels).astype(np.float32), feats, dets,
            [f.shape for f in frames], centers)


def _synth_chunk(args):
    """Worker: render frames ``[a, b)`` of a spec, preprocess, featurise."""
    spec_text, a, b, config_dict = args
    spec = SynthSpec.parse(spec_text)
    gens: dict = {}

    def rendered():
        for i in range(spec.start + a, spec.start + b):
            size = spec.size_of(i)
            if size not in gens:
                gens[size] = SceneGenerator(seed=spec.seed, size=size,
                                            detectors=list(spec.detectors), variety=spec.variety)
            frame, lab, params = gens[size].frame_at(i)
            yield (frame, lab, params["geometry"]["beam_center"],
                   str(params["detector"].get("name", "?")))

    return _chunk_arrays(a, rendered(), PreprocessConfig.from_dict(config_dict))


def _renderb_chunk(args):
    """Worker: render frames ``[a, b)`` of a renderer B spec, preprocess, featurise."""
    spec_text, a, b, config_dict = args
    spec = RenderBSpec.parse(spec_text)
    sampler = spec.sampler()

    def rendered():
        for i in range(spec.start + a, spec.start + b):
            frame, lab, scene = render_scene(spec.seed, i, sampler)
            yield (frame, lab, (scene.get("geometry") or {}).get("beam_center"),
                   str(scene["detector"].get("name", "?")))

    return _chunk_arrays(a, rendered(), PreprocessConfig.from_dict(config_dict))


def _zarr_source(path: Path):
    """Open a ``xsml synth`` store: ``(n, get_chunk(a, b))`` or raise."""
    ds = open_dataset(path)
    return ds


def _zarr_chunk(ds, a, b, config):
    """Frames ``[a, b)`` of an opened dataset -> inputs, labels, features, meta."""
    frames, centers, dets, shapes = [], [], [], []
    labels = np.asarray(ds.labels[a:b], np.float32)
    for i in range(a, b):
        frame = np.asarray(ds.frame(i)) if hasattr(ds, "frame") else np.asarray(ds[i][0])
        params = ds.params(i) if hasattr(ds, "params") else {}
        frames.append(frame)
        centers.append((params.get("geometry") or {}).get("beam_center"))
        dets.append(str((params.get("detector") or {}).get("name", "?")))
        shapes.append(frame.shape)
    inputs, feats = _frames_features(frames, centers, config)
    return a, inputs, labels, feats, dets, shapes, centers


#: Fingerprint of the classic profile's frames, part of their cache keys. The classic
#: generator's output is pinned bit for bit by ``tests/test_sim_variety.py`` (the
#: ``CLASSIC_*`` digests, recorded before profiles existed), so cached classic frames stay
#: valid while that test passes, whatever else changes under ``sim/``; this is the source
#: hash those frames were first cached under. Change it together with those digests.
CLASSIC_FINGERPRINT = "49eae6060124"


def generator_fingerprint(variety: str = "classic") -> str:
    """What identifies the frames of a generator profile (part of every synthetic cache key).

    Frames are a function of the spec *and* the generator, so a changed generator
    never reuses inputs rendered by an older one. ``classic`` frames are pinned by
    a test and identified by :data:`CLASSIC_FINGERPRINT`; other profiles, still
    changing, by a hash of the generator's source code.
    """
    if variety == "classic":
        return CLASSIC_FINGERPRINT
    sim = Path(__file__).resolve().parent.parent / "sim"
    h = hashlib.sha1()
    for name in ("generator.py", "physics.py", "geometry.py", "scene.py", "sampling.py",
                 "sampler.py", "features.py", "labels.py", "variety.py"):
        f = sim / name
        if f.exists():
            h.update(name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


#: Renderer B's modules that do not change its frames (the zarr writer, the command line).
_RENDER_B_NOT_FRAMES = frozenset({"store.py", "__main__.py"})


def renderer_b_fingerprint(root: str | os.PathLike | None = None) -> str:
    """What identifies renderer B's frames (part of every ``renderb:`` cache key).

    A hash of the source of every module of :mod:`bluesky_xsml.render_b` (or of
    the ``*.py`` files in ``root``) but its zarr writer and command line, so a
    change to how renderer B samples, composes, reads out or labels a frame
    never reuses inputs rendered before it.
    """
    base = Path(root) if root is not None else Path(__file__).resolve().parent.parent / "render_b"
    h = hashlib.sha1(b"render_b")
    for f in sorted(base.glob("*.py")):
        if f.name not in _RENDER_B_NOT_FRAMES:
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _cache_key(source: str, config: PreprocessConfig) -> str:
    spec = parse_spec(source)
    fields: dict = {}
    if isinstance(spec, SynthSpec):
        extra = generator_fingerprint(spec.variety)
    elif isinstance(spec, RenderBSpec):
        extra, fields = renderer_b_fingerprint(), {"renderer": "render_b"}
    else:
        p = Path(source).resolve()
        stamp = max((f.stat().st_mtime_ns for f in p.rglob("*") if f.is_file()), default=0)
        source, extra = f"{p}@{stamp}", ""
    blob = json.dumps({"source": source, "preprocess": config.to_dict(),
                       "version": CACHE_VERSION, "generator": extra, **fields}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def load_arrays(source: str, *, config: PreprocessConfig = PreprocessConfig(),
                cache_dir: str | os.PathLike | None = None, workers: int = 1,
                progress: bool = True) -> CachedArrays:
    """Build (or reuse from the cache) the arrays of a data source.

    Parameters
    ----------
    source : str
        ``synth:...`` or ``renderb:...`` spec, a path to an ``xsml synth`` zarr
        store or to preprocessed arrays, or several joined by ``|``.
    config : PreprocessConfig
        How frames become model inputs (the model's preprocessing).
    cache_dir : path, optional
        Where cached arrays live (default :func:`default_cache_dir`).
    workers : int
        Processes rendering frames in parallel (``synth:`` and ``renderb:`` sources).
    progress : bool
        Show a tqdm progress bar while building.

    Returns
    -------
    CachedArrays
    """
    sources = split_sources(source)
    if len(sources) > 1:
        opened = [load_arrays(s, config=config, cache_dir=cache_dir, workers=workers,
                              progress=progress) for s in sources]
        out = _concatenated(opened, source)
        out.source = "|".join(o.source for o in opened)
        return out
    spec = parse_spec(source)
    if spec is None and (Path(source) / "meta.json").exists():
        return _open(Path(source))
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    parts = [str(s) for s in spec.shards(SHARD)] if spec is not None else [source]
    opened = []
    for part in parts:
        final = cache_dir / _cache_key(part, config)
        if not (final / "meta.json").exists():
            _build(part, config, final, workers=workers, progress=progress)
        opened.append(_open(final))
    out = _concatenated(opened, source)
    out.source = str(spec) if spec is not None else source
    return out


def split_sources(source: str) -> list[str]:
    """The parts of a ``|``-joined data source, stripped; one part if none.

    >>> split_sources("synth:seed=4,n=10 | synth:seed=20,n=10,variety=wide")
    ['synth:seed=4,n=10', 'synth:seed=20,n=10,variety=wide']
    >>> split_sources("runs/b-train.zarr")
    ['runs/b-train.zarr']
    """
    parts = [p.strip() for p in str(source).split("|")]
    if any(not p for p in parts):
        raise ValueError(f"empty part in data source {source!r}")
    return parts


def _concatenated(opened: list[CachedArrays], source: str) -> CachedArrays:
    """One :class:`CachedArrays` over ``opened``, rows in order, without copying inputs."""
    if len(opened) == 1:
        out = opened[0]
    else:
        out = CachedArrays(
            ConcatRows([o.inputs for o in opened]),
            np.concatenate([o.labels for o in opened]),
            None if any(o.features is None for o in opened)
            else np.concatenate([o.features for o in opened]),
            np.concatenate([o.detectors for o in opened]),
            np.concatenate([o.shapes for o in opened]),
            source, opened[0].tags, opened[0].preprocess,
            None if any(o.centers is None for o in opened)
            else np.concatenate([o.centers for o in opened]))
    return out


class ConcatRows:
    """Row-wise concatenation of (memory-mapped) arrays without copying them.

    Supports ``len``, ``shape``, ``dtype``, slices and integer index arrays.

    >>> import numpy as np
    >>> c = ConcatRows([np.arange(6).reshape(3, 2), np.arange(6, 10).reshape(2, 2)])
    >>> c.shape, c[[4, 0]].tolist(), c[2:4].tolist()
    ((5, 2), [[8, 9], [0, 1]], [[4, 5], [6, 7]])
    """

    def __init__(self, parts):
        self.parts = list(parts)
        self.bounds = np.cumsum([0] + [len(p) for p in self.parts])
        self.shape = (int(self.bounds[-1]), *self.parts[0].shape[1:])
        self.dtype = self.parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        if isinstance(index, slice):
            index = np.arange(*index.indices(len(self)))
        index = np.asarray(index)
        scalar = index.ndim == 0
        index = np.atleast_1d(index).astype(np.int64)
        index = np.where(index < 0, index + len(self), index)
        out = np.empty((len(index), *self.shape[1:]), self.dtype)
        which = np.searchsorted(self.bounds, index, side="right") - 1
        for k in np.unique(which):
            sel = which == k
            out[sel] = self.parts[k][index[sel] - self.bounds[k]]
        return out[0] if scalar else out

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def _open(path: Path) -> CachedArrays:
    meta = json.loads((path / "meta.json").read_text())
    feats = path / "features.npy"
    centers = meta.get("centers")
    return CachedArrays(
        inputs=np.load(path / "inputs.npy", mmap_mode="r"),
        labels=np.load(path / "labels.npy"),
        features=np.load(feats) if feats.exists() else None,
        detectors=np.asarray(meta["detectors"]),
        shapes=np.asarray(meta["shapes"], dtype=np.int64).reshape(-1, 2),
        source=meta["source"],
        tags=tuple(meta["tags"]),
        preprocess=meta.get("preprocess"),
        centers=None if centers is None else _centers_array(centers),
    )


def _centers_array(centers) -> np.ndarray:
    """Per-frame beam centres (``[x, y]`` or ``None``) -> ``(N, 2)`` float64, NaN if unknown."""
    out = np.full((len(centers), 2), np.nan)
    for i, c in enumerate(centers):
        if c is not None and len(c) == 2:
            out[i] = [float(c[0]), float(c[1])]
    return out


def save_arrays(path, inputs, labels, *, features=None, detectors=None, shapes=None,
                preprocess: PreprocessConfig | None = None, source: str | None = None,
                centers=None) -> Path:
    """Write preprocessed arrays as a directory usable as a data source.

    Parameters
    ----------
    path : path
        Directory to create.
    inputs : array_like, shape (N, C, S, S)
        Model inputs (stored as float16).
    labels : array_like, shape (N, T)
        ``NaN`` for unknown labels.
    features : array_like, optional
        Baseline features ``(N, F)``.
    detectors : sequence of str, optional
    shapes : array_like, optional
        ``(N, 2)`` raw frame shapes.
    centers : array_like, optional
        ``(N, 2)`` beam centres ``(x, y)`` in raw-frame pixels, ``NaN`` if unknown.
    preprocess : PreprocessConfig, optional
        Default: ``PreprocessConfig(size=S)``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    inputs = np.asarray(inputs)
    n = len(inputs)
    np.save(path / "inputs.npy", inputs.astype(np.float16))
    np.save(path / "labels.npy", np.asarray(labels, np.float32))
    if features is not None:
        np.save(path / "features.npy", np.asarray(features, np.float32))
    pcfg = preprocess or PreprocessConfig(size=int(inputs.shape[-1]))
    meta = {"source": source or str(path), "n": n, "preprocess": pcfg.to_dict(),
            "tags": list(TAG_NAMES[: np.asarray(labels).shape[1]]) if np.asarray(labels).shape[1]
            <= len(TAG_NAMES) else [f"tag{i}" for i in range(np.asarray(labels).shape[1])],
            "detectors": list(detectors) if detectors is not None else ["?"] * n,
            "shapes": np.asarray(shapes).tolist() if shapes is not None else [[0, 0]] * n,
            "cache_version": CACHE_VERSION}
    if centers is not None:
        meta["centers"] = [None if not np.all(np.isfinite(c)) else [float(v) for v in c]
                           for c in np.asarray(centers, np.float64).reshape(n, 2)]
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def _build(source: str, config: PreprocessConfig, final: Path, *, workers: int,
           progress: bool) -> None:
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    spec = parse_spec(source)
    if spec is not None:
        n = spec.n
        ds = None
        render = _synth_chunk if isinstance(spec, SynthSpec) else _renderb_chunk
    else:
        ds = _zarr_source(Path(source))
        n = int(np.asarray(ds.labels).shape[0])
    S, C = config.size, len(CHANNELS)
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    inputs = np.lib.format.open_memmap(tmp / "inputs.npy", "w+", np.float16, (n, C, S, S))
    labels = np.zeros((n, len(TAG_NAMES)), np.float32)
    feats = None
    dets: list = [None] * n
    shapes: list = [None] * n
    centers: list = [None] * n
    chunks = [(a, min(a + _CHUNK, n)) for a in range(0, n, _CHUNK)]
    bar = tqdm(total=n, desc=f"building {final.name}", unit="frame", disable=not progress)

    def store(res):
        nonlocal feats
        a, x, y, f, d, s, c = res
        b = a + len(y)
        inputs[a:b] = x
        labels[a:b] = y
        if feats is None:
            feats = np.zeros((n, f.shape[1]), np.float32)
        feats[a:b] = f
        dets[a:b] = d
        shapes[a:b] = [list(v) for v in s]
        centers[a:b] = [None if v is None else [float(t) for t in v] for v in c]
        bar.update(b - a)

    try:
        if ds is None and workers > 1:
            import multiprocessing as mp

            jobs = [(source, a, b, config.to_dict()) for a, b in chunks]
            with mp.get_context("fork").Pool(workers) as pool:
                for res in pool.imap_unordered(render, jobs):
                    store(res)
        elif ds is None:
            for a, b in chunks:
                store(render((source, a, b, config.to_dict())))
        else:
            for a, b in chunks:
                store(_zarr_chunk(ds, a, b, config))
    finally:
        bar.close()
    inputs.flush()
    inputs = None  # drop the memmap (and its open file) before the directory is moved
    np.save(tmp / "labels.npy", labels)
    np.save(tmp / "features.npy", feats)
    if isinstance(spec, SynthSpec):
        renderer = {"generator": generator_fingerprint(spec.variety)}
    elif isinstance(spec, RenderBSpec):
        renderer = {"generator": None, "renderer_b": renderer_b_fingerprint()}
    else:
        renderer = {"generator": None}
    meta = {"source": source, "n": n, "preprocess": config.to_dict(), "tags": list(TAG_NAMES),
            **renderer,
            "detectors": dets, "shapes": shapes, "centers": centers,
            "cache_version": CACHE_VERSION,
            "build_seconds": round(time.perf_counter() - t0, 1)}
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        os.replace(tmp, final)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built %s (%d frames) in %.0f s", final, n, time.perf_counter() - t0)


def describe(arrays: CachedArrays) -> dict:
    """Counts per detector and per tag, for logs and model cards."""
    dets, counts = np.unique(arrays.detectors, return_counts=True)
    freq = label_frequencies(arrays.labels)
    return {"source": arrays.source, "n": len(arrays),
            "detectors": {str(d): int(c) for d, c in zip(dets, counts, strict=True)},
            "positive_fraction": {t: round(float(f), 4)
                                  for t, f in zip(arrays.tags, freq, strict=True)}}
