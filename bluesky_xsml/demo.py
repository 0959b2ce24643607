"""``xsml demo``: map a simulated combinatorial sample with live tagging, on embedded defaults.

Nothing to configure. The demo builds a simulated mapping beamline (two
``ophyd.sim.SynAxis`` sample motors and a detector whose frames show the
:class:`~bluesky_xsml.sim.sample.CombinatorialSample` wherever the motors put
the beam), a RunEngine, the packaged default tagger
(:meth:`Tagger.load() <bluesky_xsml.inference.tagger.Tagger.load>`) in a
:class:`~bluesky_xsml.documents.callback.TaggingCallback` in front of an
embedded Tiled catalog, and a live terminal view; then it

1. maps the sample on a coarse grid (``--grid`` x ``--grid`` points);
2. runs tag-steered line scans (``--lines`` of them) that refine wherever the
   structure tags change from one point to the next
   (:func:`~bluesky_xsml.steering.plans.tag_steered_scan`);
3. queries the catalog for where each structure was found
   (:func:`~bluesky_xsml.query.find_runs`, :func:`~bluesky_xsml.query.find_frames`);
4. saves pictures read back from the catalog: the sample's phase map (tags
   over sample position), a montage of one frame per phase with its tags, and
   a tag heatmap of a steered line;
5. with ``--serve``, keeps the steering service and its live page running.

Everything goes under ``--out`` (default: a new ``xsml-demo-*`` folder here):
``catalog/`` (the Tiled catalog: reopen it with ``xsml plot -1 --catalog
OUT/catalog``), the PNG files and ``summary.json``. The tutorial in
``docs/tutorial.md`` walks through it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["DemoResult", "add_arguments", "boundary_policy", "main", "run_demo"]

#: Sample-position keys shown and stored with every frame.
POSITIONS = ("sample_x", "sample_y")


@dataclass
class DemoResult:
    """What a demo run produced (also written to ``summary.json``)."""

    out: str
    catalog: str
    runs: list[dict] = field(default_factory=list)
    frames: int = 0
    skipped: int = 0
    phases: dict[str, int] = field(default_factory=dict)
    agreement: float | None = None
    queries: list[dict] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    service_url: str | None = None


def boundary_policy():
    """The demo's steering policy: refine wherever the sample's structure changes.

    One ``changes`` rule over the structure tags (and ``beam_off``, for the
    film's edge): when a point's structure tags differ from the previous
    point's, the plan inserts points between the two.
    """
    from .plots import STRUCTURE_TAGS
    from .steering.policy import Policy, Rule

    return Policy(name="demo-boundaries", rules=[
        Rule(name="boundary", kind="changes", tags=list(STRUCTURE_TAGS), action="refine",
             min_history=1,
             description="the structure changed since the previous point: refine between them"),
    ])


def _out_dir(out: Path | None) -> Path:
    if out is None:
        out = Path.cwd() / time.strftime("xsml-demo-%Y%m%d-%H%M%S")
        n = 1
        while out.exists():
            n += 1
            out = out.with_name(out.name.split("~")[0] + f"~{n}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _say(console, text: str) -> None:
    console.print(text, highlight=False, soft_wrap=True)   # paths and URLs stay whole


def run_demo(out: Path | None = None, *, size: int = 256, grid: int = 9, lines: int = 3,
             seed: int = 0, live: bool = True, console=None, serve: bool = False,
             port: int = 0, serve_for: float | None = None) -> DemoResult:
    """Run the demo (see the module docstring); return what it produced.

    Parameters
    ----------
    out : Path, optional
        Output folder (created); default a new ``xsml-demo-*`` folder here.
    size : int
        Detector frame side in pixels (>= 64).
    grid : int
        Points per side of the coarse map (>= 2; 0 skips the map).
    lines : int
        Tag-steered line scans across the sample (0 skips them).
    seed : int
        Seed of the simulated sample's noise.
    live : bool
        Draw the live view (progress bar and latest frames).
    console : rich.console.Console, optional
    serve, port, serve_for
        Start the steering service on ``port`` (0: a free one) and keep it
        running ``serve_for`` seconds (``None``: until Ctrl-C).
    """
    from bluesky import RunEngine
    from bluesky.plans import grid_scan
    from rich.console import Console

    from .catalog.embedded import EmbeddedCatalog
    from .documents.callback import TaggingCallback
    from .inference.tagger import Tagger
    from .liveview import LiveTagView
    from .sim.sample import make_beamline

    console = console or Console()
    t_start = time.perf_counter()
    out = _out_dir(out)
    seconds: dict[str, float] = {}
    _say(console, f"[bold]xsml demo[/bold]: mapping a simulated combinatorial sample; "
                  f"output in {out}")

    t0 = time.perf_counter()
    bl = make_beamline(seed=seed, size=size)
    catalog = EmbeddedCatalog(out / "catalog")
    tagger = Tagger.load()
    # the beamline's calibration: where the direct beam hits the detector
    xsml = TaggingCallback(tagger, downstream=[catalog.writer()],
                           beam_center=bl.sample.beam_center)
    view = LiveTagView(positions=POSITIONS, console=console)
    RE = RunEngine({}, call_returns_result=False)
    RE.subscribe(xsml)
    RE.subscribe(view.document)
    xsml.add_result_listener(view.results)
    xsml.wait_ready(120)
    seconds["setup"] = time.perf_counter() - t0
    _say(console, f"  detector '{bl.det.name}' ({size}-pixel frames of "
                  f"{bl.sample.detector}), motors sample_x/sample_y over a "
                  f"{bl.sample.width:g} x {bl.sample.height:g} mm film; model "
                  f"{tagger.checkpoint_id}; catalog {catalog.directory}")
    result = DemoResult(out=str(out), catalog=str(catalog.directory))
    md = {"sample": "simulated combinatorial film", "sample_seed": seed, "purpose": "xsml demo"}
    handle = None
    engine = None
    if lines:
        from .steering.policy import PolicyEngine

        engine = PolicyEngine(boundary_policy())
    try:
        if serve:   # before the scans, so the page shows them live
            from .api.serve import serve as start_service

            handle = start_service(xsml, port=port, policy_engine=engine, announce=False)
            result.service_url = str(handle.url)
            _say(console, f"  service: live page {handle.page_url}\n  API docs "
                          f"{handle.url}/docs (API key {handle.api_key})")
        # 1. the coarse map
        if grid:
            _say(console, f"\n[bold]1. coarse map[/bold]: {grid} x {grid} grid scan")
            t0 = time.perf_counter()
            lo, hi = 0.3, 9.9
            with _maybe(view, live):
                (uid,) = RE(grid_scan([bl.det], bl.sample_y, lo, hi, grid,
                                      bl.sample_x, lo, hi, grid), **md)
                xsml.flush(300)
            result.runs.append({"uid": uid, "plan": "grid_scan", "points": grid * grid})
            seconds["coarse_map"] = time.perf_counter() - t0

        # 2. tag-steered lines
        if lines:
            from .steering.plans import tag_steered_scan

            ys = [round(2.0 + (6.5 * i / (lines - 1) if lines > 1 else 3.5), 3)
                  for i in range(lines)]
            _say(console, f"\n[bold]2. tag-steered lines[/bold] at sample_y = "
                          f"{', '.join(f'{y:g}' for y in ys)}: 9 coarse points each, "
                          "refined where the structure tags change")
            t0 = time.perf_counter()
            for y in ys:
                bl.sample_y.set(y).wait(10)
                with _maybe(view, live):
                    uid = RE(tag_steered_scan(
                        [bl.det, bl.sample_y], bl.sample_x, 0.3, 9.9, 9, callback=xsml,
                        engine=engine, refine=2, max_points=27, tag_timeout=30.0,
                        md={**md, "line_y": y}))
                    xsml.flush(300)
                uid = uid[0] if isinstance(uid, tuple) else uid
                result.runs.append({"uid": uid, "plan": "tag_steered_scan", "y": y})
            seconds["steered_lines"] = time.perf_counter() - t0

        # 3. query what was stored
        t0 = time.perf_counter()
        _say(console, "\n[bold]3. query[/bold]: where on the sample is each structure?")
        result.queries = _queries(catalog.catalog, console)
        seconds["query"] = time.perf_counter() - t0

        # 4. pictures, read back from the catalog
        t0 = time.perf_counter()
        _say(console, "\n[bold]4. pictures[/bold] (read back from the catalog)")
        _pictures(catalog.catalog, result, bl.sample, out, console)
        seconds["pictures"] = time.perf_counter() - t0

        status = xsml.status()
        result.frames = int(status["frames_tagged"])
        result.skipped = int(status["frames_skipped"])
        seconds["total"] = time.perf_counter() - t_start
        result.seconds = {k: round(v, 1) for k, v in seconds.items()}
        (out / "summary.json").write_text(json.dumps(asdict(result), indent=2, default=str))
        _say(console, f"\n{result.frames} frames tagged, {result.skipped} skipped, in "
                      f"{seconds['total']:.0f} s. Output: {out}")
        _say(console, f"  catalog:  {catalog.directory}  (xsml plot -1 --catalog "
                      f"{catalog.directory})")
        for f in result.files:
            _say(console, f"  picture:  {f}")
        _say(console, f"  summary:  {out / 'summary.json'}")

        # 5. the service
        if handle is not None:
            _say(console, f"\n[bold]5. service[/bold]: live page {handle.page_url}\n  API "
                          f"docs {handle.url}/docs (API key {handle.api_key}); "
                          + ("Ctrl-C to stop" if serve_for is None
                             else f"stopping in {serve_for:g} s"))
            try:
                if serve_for is None:
                    while True:
                        time.sleep(1)
                else:
                    time.sleep(serve_for)
            except KeyboardInterrupt:
                pass
    finally:
        if handle is not None:
            handle.stop()
        xsml.close(60)
        catalog.close()
    return result


class _maybe:
    """``with view`` when ``live``, else nothing."""

    def __init__(self, view, live: bool):
        self.view, self.live = view, live

    def __enter__(self):
        if self.live:
            self.view.start()

    def __exit__(self, *exc):
        if self.live:
            self.view.stop()
            self.view.reset()


def _queries(catalog, console) -> list[dict]:
    """find_runs / find_frames for every structure tag seen; print a table."""
    import numpy as np
    from rich.table import Table

    from .plots import STRUCTURE_TAGS
    from .query import find_frames, find_runs

    table = Table(show_edge=False, pad_edge=False)
    for col in ("tag", "runs", "frames", "sample_x (mm)", "sample_y (mm)"):
        table.add_column(col, justify="left" if col == "tag" else "right")
    rows = []
    for tag in STRUCTURE_TAGS:
        runs = find_runs(catalog, tag)
        if not len(runs):
            continue
        frames = find_frames(runs, tag, fields=list(POSITIONS))
        if not len(frames):
            continue
        row = {"tag": tag, "runs": len(runs), "frames": len(frames)}
        for p in POSITIONS:
            v = np.asarray(frames[p], dtype=float) if p in frames else np.array([np.nan])
            v = v[np.isfinite(v)]
            row[p] = [round(float(v.min()), 2), round(float(v.max()), 2)] if v.size else None
        rows.append(row)
        table.add_row(tag, str(row["runs"]), str(row["frames"]),
                      *[f"{r[0]:.1f} - {r[1]:.1f}" if r else "" for r in
                        (row[p] for p in POSITIONS)])
    _say(console, "  find_runs(catalog, tag) and find_frames(runs, tag) for each structure "
                  "tag:")
    console.print(table)
    return rows


def _pictures(catalog, result: DemoResult, sample, out: Path, console) -> None:
    """Phase map, montage and one heatmap, all from what the catalog stored."""
    import numpy as np

    from .plots import (
        frame_montage,
        load_run_tags,
        phase_label,
        phase_map,
        read_frames,
        save_figure,
        tag_heatmap,
    )

    xs, ys, tags, probs, where = [], [], [], [], []
    names = None
    loaded = []
    for info in result.runs:
        run = catalog[info["uid"]]
        rt = load_run_tags(run, fields=list(POSITIONS))
        loaded.append((run, rt))
        names = names or rt.tag_names
        x = rt.positions.get("sample_x", np.full(len(rt.seq_nums), np.nan))
        y = rt.positions.get("sample_y", np.full(len(rt.seq_nums), np.nan))
        for i in range(len(rt.seq_nums)):
            if rt.skip_reasons[i] or not (np.isfinite(x[i]) and np.isfinite(y[i])):
                continue
            xs.append(float(x[i]))
            ys.append(float(y[i]))
            tags.append(rt.tags[i])
            probs.append(rt.probs[i])
            where.append((len(loaded) - 1, i))
    if not xs:
        _say(console, "  no tagged frames to draw")
        return
    phases = [phase_label(t) for t in tags]
    truth = [phase_label(sample.tags_at(x, y)) for x, y in zip(xs, ys, strict=True)]
    result.phases = dict(Counter(phases).most_common())
    agree = [a == b for a, b in zip(phases, truth, strict=True)]
    result.agreement = round(float(np.mean(agree)), 3)
    fig = phase_map(xs, ys, tags, probs=np.array(probs), tag_names=names, xlabel="sample_x (mm)",
                    ylabel="sample_y (mm)", truth=sample.region_at,
                    title=f"phase map: {len(xs)} frames tagged live "
                          f"(background: the sample's true regions)")
    result.files.append(str(save_figure(fig, out / "phase-map.png")))
    _say(console, f"  phase map: {len(set(phases))} phases over {len(xs)} positions; the "
                  f"tags agree with the simulated truth at {100 * result.agreement:.0f}% "
                  "of them")

    # one frame per phase: the most confident one
    best: dict[str, tuple[float, int]] = {}
    for k, (ph, p) in enumerate(zip(phases, probs, strict=True)):
        conf = float(np.nanmin([p[names.index(t)] for t in ph.split("+")])) \
            if ph != "nothing seen" else 0.0
        if ph not in best or conf > best[ph][0]:
            best[ph] = (conf, k)
    picks = [k for _, k in sorted(best.values(), key=lambda v: -v[0])][:12]
    frames, caps = [], []
    for k in picks:
        run_i, row = where[k]
        run, rt = loaded[run_i]
        frames.extend(read_frames(run, rt, [row]))
        caps.append(f"({xs[k]:.1f}, {ys[k]:.1f}) mm: " + ", ".join(
            t for t in tags[k] if t not in ("detector_gaps", "beamstop_circular")))
    fig = frame_montage(frames, captions=caps, title="one frame per phase, with its tags")
    result.files.append(str(save_figure(fig, out / "montage.png")))

    steered = [(run, rt) for (run, rt), info in zip(loaded, result.runs, strict=True)
               if info["plan"] == "tag_steered_scan"]
    if steered:
        run, rt = max(steered, key=lambda v: len(v[1].seq_nums))
        order = np.argsort(rt.positions.get("sample_x", np.arange(len(rt.seq_nums))))
        fig = tag_heatmap(rt.probs[order], tags=rt.tag_names, thresholds=rt.thresholds,
                          frame_labels=[f"{v:.2f}" for v in
                                        rt.positions.get("sample_x", rt.seq_nums)[order]],
                          only_seen=True, xlabel="sample_x (mm)",
                          title=f"steered line at sample_y = "
                                f"{run.metadata['start'].get('line_y', '?')}: tags by "
                                f"sample_x ({len(order)} points)")
        result.files.append(str(save_figure(fig, out / "steered-line.png")))


# ---------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for everything the demo writes (default: a new "
                             "xsml-demo-* folder in the current directory)")
    parser.add_argument("--size", type=int, default=256, help="frame side in pixels (256)")
    parser.add_argument("--grid", type=int, default=9,
                        help="points per side of the coarse map (9; 0 skips it)")
    parser.add_argument("--lines", type=int, default=3,
                        help="tag-steered line scans (3; 0 skips them)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample's noise")
    parser.add_argument("--serve", action="store_true",
                        help="then keep the steering service and live page running")
    parser.add_argument("--port", type=int, default=8765,
                        help="service port with --serve (8765; 0: any free port)")
    parser.add_argument("--serve-for", type=float, default=None, metavar="SECONDS",
                        help="with --serve, stop after this many seconds (default: Ctrl-C)")
    parser.add_argument("--no-live", action="store_true",
                        help="no live view (progress bar and table of latest frames)")


def main(args: argparse.Namespace) -> int:
    problems = []
    if args.size < 64:
        problems.append("--size must be >= 64")
    if args.grid == 1 or args.grid < 0:
        problems.append("--grid must be 0 or >= 2")
    if args.lines < 0:
        problems.append("--lines must be >= 0")
    if not 0 <= args.port <= 65535:
        problems.append("--port must be in 0..65535")
    if args.serve_for is not None and args.serve_for < 0:
        problems.append("--serve-for must be >= 0")
    if problems:
        print("xsml demo: " + "; ".join(problems), file=sys.stderr)
        return 2
    run_demo(args.out, size=args.size, grid=args.grid, lines=args.lines, seed=args.seed,
             live=not args.no_live, serve=args.serve, port=args.port,
             serve_for=args.serve_for)
    return 0
