"""Pictures of tagged runs, saved to files with matplotlib (no display needed).

Four figures:

:func:`tag_heatmap`
    probability of every tag (rows) for every frame (columns), with the
    frames at or above threshold outlined (a legend says so).
:func:`tag_profile`
    probability of each tag along one scanned motor, as lines: the picture
    of a line scan.
:func:`frame_montage`
    a grid of frames (log intensity on one shared colour scale, masked
    pixels grey) captioned with their tags.
:func:`phase_map`
    the tags over sample position: one colour per combination of structure
    tags (the sample's "phase diagram"), plus a probability map per tag.

:func:`load_run_tags` reads a stored run's tag stream (and motor positions)
from a Tiled catalog, :func:`plot_run` saves the heatmap, the montage and a
line or a map (as the run scanned one motor or more) for one run, and
``xsml plot RUN --catalog DIR_OR_URI`` does that from the command line.

Figures are built on :class:`matplotlib.figure.Figure` directly, never
through ``pyplot``, so they work in threads and without a display.
``import bluesky_xsml.plots`` does not import matplotlib; the functions do.

Examples
--------
>>> import numpy as np
>>> from bluesky_xsml.plots import tag_heatmap
>>> fig = tag_heatmap(np.random.default_rng(0).random((5, 3)), tags=["a", "b", "c"])
>>> len(fig.axes)   # the heatmap and its colour bar
2
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .tags import TAG_NAMES, TAGS

__all__ = [
    "STRUCTURE_TAGS",
    "RunTags",
    "add_arguments",
    "display_image",
    "frame_montage",
    "load_run_tags",
    "main",
    "phase_label",
    "phase_map",
    "plot_run",
    "read_frames",
    "save_figure",
    "tag_heatmap",
    "tag_profile",
]

#: Tags that describe the sample's structure (used to name phases on a map);
#: instrument tags such as ``detector_gaps`` are the same everywhere.
STRUCTURE_TAGS: tuple[str, ...] = (
    *(t.name for t in TAGS if t.group in ("scattering", "grazing")), "beam_off")


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 110) -> Path:
    """Save ``fig`` (format from the suffix), creating the folder; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def tag_heatmap(probs, *, tags: Sequence[str] = TAG_NAMES,
                thresholds: Sequence[float] | None = None,
                frame_labels: Sequence[Any] | None = None, title: str | None = None,
                only_seen: bool = False, xlabel: str = "frame"):
    """Tag probabilities over frames as a heatmap.

    Parameters
    ----------
    probs : array-like, shape (N, T)
        Probability of each of ``T`` tags for ``N`` frames; NaN rows (skipped
        frames) are drawn grey.
    tags : sequence of str
        The ``T`` tag names (rows of the picture).
    thresholds : sequence of float, optional
        Per-tag decision thresholds; cells at or above are outlined.
    frame_labels : sequence, optional
        Column labels (e.g. sequence numbers); default ``0..N-1``.
    title : str, optional
    only_seen : bool
        Keep only tags that reach their threshold (or 0.5) in some frame.
    xlabel : str
        Label of the frame axis.

    Returns
    -------
    matplotlib.figure.Figure
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(tags):
        raise ValueError(f"probs must have shape (frames, {len(tags)}) to match tags, "
                         f"got {p.shape}")
    thr = np.full(len(tags), 0.5) if thresholds is None else np.asarray(thresholds, float)
    if thr.shape != (len(tags),):
        raise ValueError(f"thresholds must have {len(tags)} values, got {thr.shape}")
    rows = np.arange(len(tags))
    if only_seen:
        hit = np.nan_to_num(p, nan=-1) >= thr
        rows = np.flatnonzero(hit.any(axis=0))
        if not len(rows):
            rows = np.arange(len(tags))
    n = p.shape[0]
    fig = _figure(min(3 + 0.22 * n, 16), 1.2 + 0.24 * len(rows))
    ax = fig.add_subplot()
    import matplotlib as mpl

    cmap = mpl.colormaps["viridis"].with_extremes(bad="0.8")
    img = ax.imshow(np.ma.masked_invalid(p[:, rows].T), aspect="auto", cmap=cmap,
                    vmin=0, vmax=1, interpolation="nearest")
    above = np.nan_to_num(p[:, rows], nan=-1).T >= thr[rows, None]
    ys, xs = np.nonzero(above)
    marks = ax.scatter(xs, ys, s=10, marker="s", facecolors="none", edgecolors="white",
                       linewidths=0.6, label="at or above the tag's threshold")
    ax.set_yticks(range(len(rows)), [tags[i] for i in rows], fontsize=8)
    labels = list(range(n)) if frame_labels is None else list(frame_labels)
    step = max(1, math.ceil(n / 30))
    ax.set_xticks(range(0, n, step), [str(v) for v in labels[::step]], fontsize=7,
                  rotation=90 if n > 15 else 0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("tag")
    fig.colorbar(img, ax=ax, label="probability", shrink=0.9)
    # the outline key sits on the colour map's dark end, where white squares show
    legend = fig.legend(handles=[marks], loc="outside lower right", fontsize=7, markerscale=1.5,
                        facecolor=cmap(0.0), edgecolor="none", framealpha=1.0)
    for text in legend.get_texts():
        text.set_color("white")
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def display_image(frame) -> np.ndarray:
    """A float image for display: ``log10(1 + counts)``, masked pixels NaN.

    Negative values (Pilatus gaps and bad pixels), NaN (CCD masks) and the
    all-ones value of unsigned Eiger frames are masked.

    >>> display_image(np.array([[0, 9, -1]], np.int32)).tolist()
    [[0.0, 1.0, nan]]
    """
    a = np.asarray(frame)
    out = a.astype(np.float64)
    bad = ~np.isfinite(out) | (out < 0)
    if a.dtype.kind == "u":
        bad |= a == np.iinfo(a.dtype).max
    out[bad] = 0.0
    out = np.log10(1.0 + out)
    out[bad] = np.nan
    return out


def frame_montage(frames: Sequence[Any], *, captions: Sequence[str] | None = None,
                  ncols: int | None = None, title: str | None = None, max_frames: int = 24):
    """A grid of frames with captions (e.g. their tags) and one intensity scale.

    Every frame is drawn as ``log10(1 + counts)`` (:func:`display_image`) on
    the same colour scale, from 0 to the highest of the frames' 99.7th
    percentiles, with a colour bar beside the grid; masked pixels are grey.

    Parameters
    ----------
    frames : sequence of 2-D arrays
        At most ``max_frames`` are drawn (evenly picked when there are more).
    captions : sequence of str, optional
        One caption per frame (wrapped to fit).
    ncols : int, optional
        Columns of the grid (default about square).
    title : str, optional
    max_frames : int

    Returns
    -------
    matplotlib.figure.Figure
    """
    frames = list(frames)
    if not frames:
        raise ValueError("frame_montage needs at least one frame")
    captions = [""] * len(frames) if captions is None else [str(c) for c in captions]
    if len(captions) != len(frames):
        raise ValueError(f"{len(captions)} captions for {len(frames)} frames")
    if len(frames) > max_frames:
        pick = np.unique(np.linspace(0, len(frames) - 1, max_frames).round().astype(int))
        frames = [frames[i] for i in pick]
        captions = [captions[i] for i in pick]
    n = len(frames)
    ncols = ncols or max(1, math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    fig = _figure(2.3 * ncols + 0.9, 2.6 * nrows + (0.3 if title else 0))
    import textwrap

    import matplotlib as mpl

    cmap = mpl.colormaps["magma"].with_extremes(bad="0.55")
    images = [display_image(frame) for frame in frames]
    # one intensity scale for all frames, so that they compare and one colour bar reads them
    tops = [float(np.percentile(img[np.isfinite(img)], 99.7)) for img in images
            if np.isfinite(img).any()]
    norm = mpl.colors.Normalize(vmin=0.0, vmax=max([0.5, *tops]))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    shown = None
    for ax, img, cap in zip(axes.flat, images, captions, strict=False):
        shown = ax.imshow(img, cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(cap, 30)) or " ", fontsize=7)
    bar = fig.colorbar(shown, ax=axes, shrink=min(0.9, 0.45 + 0.15 * nrows), aspect=30)
    bar.set_label("log10(1 + counts)   (grey: masked pixels)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def tag_profile(x, probs, *, tags: Sequence[str] = TAG_NAMES,
                thresholds: Sequence[float] | None = None, xlabel: str = "position",
                title: str | None = None, only_seen: bool = True):
    """Tag probabilities along one scanned motor, as lines: the picture of a line scan.

    Parameters
    ----------
    x : array-like, shape (N,)
        Position of each frame on the scanned axis (frames are drawn in
        position order; NaN positions are left out).
    probs : array-like, shape (N, T)
        Probability of each of ``T`` tags; NaN rows (skipped frames) leave gaps.
    tags : sequence of str
        The ``T`` tag names.
    thresholds : sequence of float, optional
        Per-tag thresholds (default 0.5); points at or above are filled, the
        others hollow.
    xlabel : str
        The motor's name, with its units when known (e.g. ``"sample_x (mm)"``).
    title : str, optional
    only_seen : bool
        Draw only tags that reach their threshold somewhere (all when none does).

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> fig = tag_profile([0, 1, 2], [[0.1, 0.9], [0.6, 0.2], [0.7, 0.1]], tags=["a", "b"],
    ...                   xlabel="th (deg)")
    >>> fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()
    ('th (deg)', 'probability')
    """
    x = np.asarray(x, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape != (len(x), len(tags)):
        raise ValueError(f"probs must have shape ({len(x)}, {len(tags)}) to match x and "
                         f"tags, got {p.shape}")
    thr = np.full(len(tags), 0.5) if thresholds is None else np.asarray(thresholds, float)
    if thr.shape != (len(tags),):
        raise ValueError(f"thresholds must have {len(tags)} values, got {thr.shape}")
    keep = np.isfinite(x)
    order = np.flatnonzero(keep)[np.argsort(x[keep], kind="stable")]
    x, p = x[order], p[order]
    hit = np.nan_to_num(p, nan=-1) >= thr
    cols = np.flatnonzero(hit.any(axis=0)) if only_seen else np.arange(len(tags))
    if not len(cols):
        cols = np.arange(len(tags))
    import matplotlib as mpl

    fig = _figure(8.5, 4.2)
    ax = fig.add_subplot()
    colours = mpl.colormaps["tab10" if len(cols) <= 10 else "tab20"]
    for k, i in enumerate(cols):
        colour = colours(k % colours.N)
        ax.plot(x, p[:, i], color=colour, lw=1.2, label=tags[i])
        ax.scatter(x[hit[:, i]], p[hit[:, i], i], s=16, color=colour, zorder=3)
        ax.scatter(x[~hit[:, i]], p[~hit[:, i], i], s=16, facecolors="none",
                   edgecolors=colour, linewidths=0.8, zorder=3)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("probability")
    ax.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=7,
               title="tag (filled: at or\nabove its threshold)", title_fontsize=7,
               frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def phase_label(tags: Sequence[str] | str, *, structure: Sequence[str] = STRUCTURE_TAGS) -> str:
    """Name of the phase a frame's tags describe: its structure tags joined by ``+``.

    >>> phase_label(["ring_isotropic", "detector_gaps", "halo_isotropic"])
    'halo_isotropic+ring_isotropic'
    >>> phase_label("beamstop_circular")
    'nothing seen'
    """
    if isinstance(tags, str):
        tags = [t for t in tags.split(",") if t]
    keep = sorted(t for t in tags if t in structure)
    return "+".join(keep) if keep else "nothing seen"


def phase_map(x, y, tags: Sequence[Sequence[str] | str], *, probs=None,
              tag_names: Sequence[str] = TAG_NAMES, xlabel: str = "x", ylabel: str = "y",
              title: str | None = None, max_panels: int = 6, truth=None):
    """Tags over sample position: the sample's phase diagram.

    Parameters
    ----------
    x, y : array-like, shape (N,)
        Sample position of each frame.
    tags : sequence
        Tags of each frame (list of names or a comma-separated string).
    probs : array-like, shape (N, T), optional
        Probabilities; adds one small map per structure tag that is seen
        (at most ``max_panels``).
    tag_names : sequence of str
        Names of the ``T`` columns of ``probs``.
    xlabel, ylabel, title : str
    truth : callable, optional
        ``truth(x, y) -> str``: a region name drawn as a faint background
        (e.g. :meth:`CombinatorialSample.region_at
        <bluesky_xsml.sim.sample.CombinatorialSample.region_at>`).

    Returns
    -------
    matplotlib.figure.Figure
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(tags) != len(x):
        raise ValueError(f"x, y and tags must have one entry per frame; got shapes "
                         f"{x.shape}, {y.shape} and {len(tags)} tag lists")
    phases = [phase_label(t) for t in tags]
    order = [p for p, _ in Counter(phases).most_common()]
    panels: list[int] = []
    if probs is not None:
        p = np.asarray(probs, dtype=np.float64)
        if p.shape != (len(x), len(tag_names)):
            raise ValueError(f"probs must have shape ({len(x)}, {len(tag_names)}), got {p.shape}")
        seen = {t for ph in order for t in ph.split("+")}
        panels = [i for i, t in enumerate(tag_names) if t in seen and t in STRUCTURE_TAGS]
        panels = panels[:max_panels]
    import matplotlib as mpl

    ncols_small = 2 if len(panels) > 1 else 1
    nrows_small = math.ceil(len(panels) / ncols_small) if panels else 0
    fig = _figure(6.5 + (3.0 * ncols_small if panels else 2.5), max(5.0, 2.6 * nrows_small))
    grid = fig.add_gridspec(max(nrows_small, 1), 1 + (ncols_small if panels else 0),
                            width_ratios=[2.2] + [1] * (ncols_small if panels else 0))
    ax = fig.add_subplot(grid[:, 0])
    if truth is not None and len(x):
        gx = np.linspace(x.min(), x.max(), 120)
        gy = np.linspace(y.min(), y.max(), 120)
        names = [[truth(a, b) for a in gx] for b in gy]
        uniq = sorted({n for row in names for n in row})
        idx = np.array([[uniq.index(n) for n in row] for row in names])
        ax.imshow(idx, origin="lower", extent=(gx[0], gx[-1], gy[0], gy[-1]), aspect="auto",
                  cmap=mpl.colormaps["Pastel2"], alpha=0.45, interpolation="nearest",
                  vmin=0, vmax=7)
        for k, name in enumerate(uniq):   # name each true region at its centre
            rows, cols = np.nonzero(idx == k)
            ax.text(gx[int(np.median(cols))], gy[int(np.median(rows))], name, fontsize=7,
                    color="0.25", ha="center", va="center", style="italic")
    colours = mpl.colormaps["tab10"]
    for k, ph in enumerate(order):
        sel = np.array([q == ph for q in phases])
        colour = "0.35" if ph == "nothing seen" else colours(k % 10)
        marker = "x" if ph in ("beam_off", "nothing seen") else "o"
        ax.scatter(x[sel], y[sel], s=28, color=colour, marker=marker,
                   label=f"{ph} ({int(sel.sum())})", edgecolors="none" if marker == "o" else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(x):
        pad_x = 0.03 * max(np.ptp(x), 1e-9)
        pad_y = 0.03 * max(np.ptp(y), 1e-9)
        ax.set_xlim(x.min() - pad_x, x.max() + pad_x)
        ax.set_ylim(y.min() - pad_y, y.max() + pad_y)
    if np.ptp(y) > 0 and np.ptp(x) > 0:
        ax.set_aspect("equal", adjustable="box")
    # a figure legend "outside": constrained layout makes room for every entry
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower left", fontsize=7,
               ncol=2 if len(order) > 3 else 1, frameon=False,
               title="phase: structure tags (frames)", title_fontsize=7)
    ax.set_title(title or "tags over sample position", fontsize=10)
    for k, i in enumerate(panels):
        sub = fig.add_subplot(grid[k // ncols_small, 1 + k % ncols_small])
        sc = sub.scatter(x, y, c=p[:, i], s=14, vmin=0, vmax=1, cmap="viridis")
        sub.set_title(tag_names[i], fontsize=8)
        sub.set_xlabel(xlabel, fontsize=6, labelpad=1)
        sub.set_ylabel(ylabel, fontsize=6, labelpad=1)
        if np.ptp(y) > 0 and np.ptp(x) > 0:
            sub.set_aspect("equal", adjustable="box")
        sub.tick_params(labelsize=6)
        if k % ncols_small == ncols_small - 1 or k == len(panels) - 1:
            bar = fig.colorbar(sc, ax=sub, shrink=0.8)
            bar.set_label("probability", fontsize=6)
            bar.ax.tick_params(labelsize=6)
    return fig


# ---------------------------------------------------------------------------
# Stored runs


@dataclass
class RunTags:
    """The tag stream of one stored run, in source-frame order.

    Attributes
    ----------
    uid, scan_id, stream
        The run and the name of its tag stream.
    tag_names : list of str
    probs : numpy.ndarray, shape (N, T)
        NaN rows are skipped frames.
    tags : list of list of str
        Tags at or above threshold per frame.
    seq_nums, frame_indexes : numpy.ndarray
    source_stream, source_key : list of str
    skip_reasons : list of str
    thresholds : numpy.ndarray, shape (T,)
    positions : dict of str -> numpy.ndarray
        Motor positions (the start document's ``motors``, and ``fields``) per
        frame, from the source events; a motor the run did not move has its
        recorded position (baseline stream or start document) in every row;
        NaN where the source event lacks one.
    units : dict of str -> str
        Units of the positions, where their data keys give them.
    """

    uid: str
    scan_id: Any
    stream: str
    tag_names: list[str]
    probs: np.ndarray
    tags: list[list[str]]
    seq_nums: np.ndarray
    frame_indexes: np.ndarray
    source_stream: list[str]
    source_key: list[str]
    skip_reasons: list[str]
    thresholds: np.ndarray
    positions: dict[str, np.ndarray] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)


def load_run_tags(run, *, stream: str | None = None, fields: Sequence[str] = ()) -> RunTags:
    """Read the tag stream (and motor positions) of a run stored in Tiled.

    Parameters
    ----------
    run : BlueskyRun
        A run node of a Tiled ``CatalogOfBlueskyRuns`` (``catalog[uid]``).
    stream : str, optional
        Tag stream name; default the stop document's ``xsml_stream``
        (``"xsml_tags"`` when the stop lacks it).
    fields : sequence of str
        Scalar data keys read as positions besides the start document's
        ``motors`` (e.g. a motor that was read, not scanned). One the source
        streams lack is taken from where the run recorded it
        (:func:`~bluesky_xsml.catalog.positions.fixed_positions`).

    Raises
    ------
    KeyError
        The run has no such tag stream (the message lists its streams).
    """
    from .catalog.positions import fixed_positions
    from .catalog.query import tag_stream_node

    md = run.metadata
    start = md.get("start") or {}
    name, node = tag_stream_node(run, stream)
    ds = node.read()
    data_keys = (node.metadata.get("data_keys") or {})
    tag_names = [t for t in data_keys if data_keys[t].get("dtype") == "number"
                 and "threshold" in data_keys[t]]
    if not tag_names:
        tag_names = [t for t in TAG_NAMES if t in ds]
    thresholds = np.array([float(data_keys.get(t, {}).get("threshold", 0.5))
                           for t in tag_names])
    probs = np.stack([np.asarray(ds[t].values, dtype=np.float64) for t in tag_names], axis=1)
    seq = np.asarray(ds["source_seq_num"].values, dtype=np.int64)
    fidx = np.asarray(ds["frame_index"].values, dtype=np.int64)
    order = np.lexsort((fidx, seq))
    text = {k: [str(v) for v in np.asarray(ds[k].values)[order]]
            for k in ("tags", "source_stream", "source_key", "skip_reason")}
    out = RunTags(
        uid=str(start.get("uid", "")), scan_id=start.get("scan_id"), stream=name,
        tag_names=tag_names, probs=probs[order],
        tags=[[t for t in s.split(",") if t] for s in text["tags"]],
        seq_nums=seq[order], frame_indexes=fidx[order], source_stream=text["source_stream"],
        source_key=text["source_key"], skip_reasons=text["skip_reason"], thresholds=thresholds)
    motors = [m for m in (start.get("motors") or []) if isinstance(m, str)]
    motors += [f for f in fields if f not in motors]
    sources = sorted(set(out.source_stream))
    for source in sources:
        if source not in run:
            continue
        src = run[source]
        cols = [m for m in motors if m in src]
        if not cols:
            continue
        data_keys = src.metadata.get("data_keys") or {}
        for m in cols:
            if data_keys.get(m, {}).get("units"):
                out.units.setdefault(m, str(data_keys[m]["units"]))
        src_ds = src.read(variables=["seq_num", *cols]) if _accepts_variables(src) \
            else src.read()
        src_seq = np.asarray(src_ds["seq_num"].values, dtype=np.int64)
        where = {int(s): i for i, s in enumerate(src_seq)}
        for m in cols:
            vals = np.asarray(src_ds[m].values, dtype=np.float64)
            col = out.positions.setdefault(m, np.full(len(out.seq_nums), np.nan))
            for i, (s, st) in enumerate(zip(out.seq_nums, out.source_stream, strict=True)):
                if st == source and int(s) in where:
                    col[i] = vals[where[int(s)]]
    unread = [m for m in motors if m not in out.positions]
    for m, value in (fixed_positions(run, unread) if unread and len(out.seq_nums) else {}).items():
        out.positions[m] = np.full(len(out.seq_nums), float(value))
        if value.units:
            out.units.setdefault(m, value.units)
    return out


def _accepts_variables(node) -> bool:
    import inspect

    try:
        return "variables" in inspect.signature(node.read).parameters
    except (TypeError, ValueError):
        return False


def read_frames(run, tags: RunTags, picks: Sequence[int]) -> list[np.ndarray]:
    """The stored frames of rows ``picks`` of ``tags`` (2-D arrays, one read per stream and key).

    Parameters
    ----------
    run : BlueskyRun
        The run ``tags`` was loaded from.
    tags : RunTags
        From :func:`load_run_tags`.
    picks : sequence of int
        Row numbers of ``tags`` (frames in source order).
    """
    frames: dict[int, np.ndarray] = {}
    by_node: dict[tuple[str, str], list[int]] = {}
    for i in picks:
        by_node.setdefault((tags.source_stream[i], tags.source_key[i]), []).append(i)
    for (source, key), rows in by_node.items():
        src = run[source]
        seqs = np.asarray(src["seq_num"].read() if "seq_num" in src else [], dtype=np.int64)
        arr = src[key]
        where = {int(s): j for j, s in enumerate(seqs)}
        for i in rows:
            j = where.get(int(tags.seq_nums[i]), int(tags.seq_nums[i]) - 1)
            frame = np.asarray(arr[j])
            while frame.ndim > 2:
                frame = frame[min(int(tags.frame_indexes[i]), frame.shape[0] - 1)]
            frames[i] = frame
    return [frames[i] for i in picks]


def plot_run(run, out_dir: str | os.PathLike, *, stream: str | None = None,
             max_frames: int = 16, prefix: str | None = None) -> list[Path]:
    """Save the tag heatmap, a frame montage and a picture over the motor positions.

    The last one depends on how many motors moved during the run: one (a line
    scan, or a map whose second coordinate stayed put) gives
    ``<prefix>-line.png``, the tag probabilities against that motor
    (:func:`tag_profile`); two or more give ``<prefix>-map.png``, a
    :func:`phase_map` over two of them. Axes carry the motor names, with
    units where the data keys give them. A run without positions gets no
    third picture.

    Parameters
    ----------
    run : BlueskyRun
        A run of a Tiled catalog.
    out_dir : path-like
        Folder for the PNG files (created).
    stream : str, optional
        Tag stream (default the run's current one).
    max_frames : int
        Frames in the montage.
    prefix : str, optional
        File name prefix (default ``scan<scan_id>-<uid8>``).

    Returns
    -------
    list of pathlib.Path
        The files written.
    """
    tags = load_run_tags(run, stream=stream)
    out = Path(out_dir)
    prefix = prefix or f"scan{tags.scan_id}-{tags.uid[:8]}"
    label = f"scan {tags.scan_id} ({tags.uid[:8]}), {len(tags.seq_nums)} frames"
    written = [save_figure(
        tag_heatmap(tags.probs, tags=tags.tag_names, thresholds=tags.thresholds,
                    frame_labels=list(tags.seq_nums), only_seen=True,
                    title=f"tag probabilities, {label}"),
        out / f"{prefix}-tags.png")]
    if len(tags.seq_nums):
        picks = list(np.unique(np.linspace(0, len(tags.seq_nums) - 1,
                                           min(max_frames, len(tags.seq_nums))).round()
                               .astype(int)))
        frames = read_frames(run, tags, picks)
        caps = [f"#{tags.seq_nums[i]}: " + ((tags.skip_reasons[i] and "skipped: "
                                             + tags.skip_reasons[i])
                                             or ", ".join(tags.tags[i]) or "(no tag)")
                for i in picks]
        written.append(save_figure(frame_montage(frames, captions=caps, title=label),
                                   out / f"{prefix}-frames.png"))
    pos = [m for m, v in tags.positions.items() if np.isfinite(v).any()]
    # positions that change over the run: one is a line scan, two or more a map
    moved = [m for m in pos if np.ptp(tags.positions[m][np.isfinite(tags.positions[m])]) > 0]
    start = run.metadata.get("start") or {}
    if len(moved) == 1 or (len(pos) == 1 and not moved):
        xm = moved[0] if moved else pos[0]
        written.append(save_figure(
            tag_profile(tags.positions[xm], tags.probs, tags=tags.tag_names,
                        thresholds=tags.thresholds, xlabel=_axis_label(xm, tags.units),
                        title=f"tags along {xm}: {label}"),
            out / f"{prefix}-line.png"))
    elif len(moved) >= 2:
        xm, ym = _map_axes(moved, start)
        x, y = tags.positions[xm], tags.positions[ym]
        ok = np.isfinite(x) & np.isfinite(y)
        written.append(save_figure(
            phase_map(x[ok], y[ok], [tags.tags[i] for i in np.flatnonzero(ok)],
                      probs=tags.probs[ok], tag_names=tags.tag_names,
                      xlabel=_axis_label(xm, tags.units), ylabel=_axis_label(ym, tags.units),
                      title=f"tags over {xm}, {ym}: {label}"),
            out / f"{prefix}-map.png"))
    return written


def _axis_label(name: str, units: dict[str, str]) -> str:
    """``name (units)``, or the name alone when its units are not known.

    >>> _axis_label("sample_x", {"sample_x": "mm"}), _axis_label("th", {})
    ('sample_x (mm)', 'th')
    """
    return f"{name} ({units[name]})" if units.get(name) else name


def _map_axes(motors: Sequence[str], start) -> tuple[str, str]:
    """Which two of the (two or more) moved motors go on the x and y axes of a map.

    Names ending in ``x`` and ``y`` win; in a grid scan the fast (last) motor
    is ``x``, as in bluesky's LiveGrid; otherwise the plan's order.

    >>> _map_axes(["sample_y", "sample_x"], {})
    ('sample_x', 'sample_y')
    >>> _map_axes(["th", "chi"], {"plan_name": "grid_scan"})
    ('chi', 'th')
    """
    motors = list(motors)
    xs = [m for m in motors if m.lower().endswith("x")]
    ys = [m for m in motors if m.lower().endswith("y")]
    if xs and ys:
        return xs[0], ys[0]
    if "grid" in str(start.get("plan_name", "")):
        return motors[-1], motors[0]
    return motors[0], motors[1]


# ---------------------------------------------------------------------------
# xsml plot


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run uid, partial uid (>= 5 characters), scan_id, "
                        "or a negative number (-1: the latest run)")
    parser.add_argument("--catalog", required=True,
                        help="catalog directory (e.g. the demo's <out>/catalog) or an "
                        "http(s):// Tiled URI")
    parser.add_argument("--api-key", default=None,
                        help="API key of a Tiled server (default: TILED_API_KEY)")
    parser.add_argument("--stream", default=None, help="tag stream (default: the current one)")
    parser.add_argument("--out", type=Path, default=Path("."),
                        help="folder for the PNG files (default: here)")
    parser.add_argument("--frames", type=int, default=16, help="frames in the montage")


def _run_key(text: str):
    try:
        return int(text)
    except ValueError:
        return text


def main(args: argparse.Namespace) -> int:
    if args.frames < 1:
        print("xsml plot: --frames must be >= 1", file=sys.stderr)
        return 2
    from .catalog.embedded import open_catalog

    try:
        catalog, close = open_catalog(args.catalog, api_key=args.api_key)
    except (FileNotFoundError, KeyError) as err:
        print(f"xsml plot: {err}", file=sys.stderr)
        return 2
    try:
        try:
            run = catalog[_run_key(args.run)]
        except (KeyError, IndexError, ValueError) as err:
            print(f"xsml plot: no run {args.run!r} in {args.catalog}: {err}", file=sys.stderr)
            return 2
        try:
            files = plot_run(run, args.out, stream=args.stream, max_frames=args.frames)
        except KeyError as err:
            print(f"xsml plot: {err.args[0] if err.args else err}", file=sys.stderr)
            return 2
    finally:
        close()
    for f in files:
        print(f"wrote {f}")
    return 0
