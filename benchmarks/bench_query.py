"""Tag query benchmark: a catalog of 1,000 runs x 100 frames, queried by tag.

    python benchmarks/bench_query.py [--runs 1000] [--frames 100] [--size 8] [--dir DIR]
    python benchmarks/bench_query.py --dir DIR --reuse     # query the catalogs kept in DIR again

Writing. Every run goes through the real writer (bluesky-tiled-plugins'
``TiledWriter`` into an embedded ``SimpleTiledServer``, SQLite catalog), as
schema-valid documents composed with event-model: a ``primary`` stream of
``--frames`` events (a motor position, a ``--size`` x ``--size`` uint16 image)
and an ``xsml_tags`` stream composed by ``TagStreamComposer``, then a stop with
the run summary. To write 100,000 frames in minutes the RunEngine is left out
(its per-event overhead is not what is measured), the frames are tiny, no
model runs (probabilities are drawn so that each tag appears in a known set of
runs: ``ring_oriented`` in every 10th run, i.e. 100 runs of 1,000) and the
writer batches a whole run per request (``batch_size=frames``; the layout is
the same as with ``batch_size=1``).

Measured (median of ``--repeats``):

* run level: ``find_runs(catalog, tag, min_frames=k)`` and listing the uids,
  against a client-side baseline that pages through every run's metadata and
  filters in Python (what one does without server-side queries);
* frame level: ``find_frames(catalog, "ring_oriented", min_prob=0.8)`` over the
  runs carrying the tag (100 of 1,000), answered from the stop documents' frame
  index (``xsml_index``, built by the same ``FrameIndex`` the callback uses);
  against the same query reading the tag and primary streams
  (``use_index=False``, which must give the same table) and reading each of
  those runs' whole tag stream as an xarray Dataset and filtering;
* storage: bytes on disk per frame of a catalog with tag streams minus one
  without (same runs, ``--baseline-runs`` of them), divided by frames.

Targets: run level < 1 s, frame level over 100 runs < 5 s. The last line reads
``run_level_s <t> (target 1) frame_level_s <t> (target 5) tag_bytes_per_frame <b>``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

TAG_EVERY = {"ring_oriented": 10, "beam_off": 3, "saturation": 50}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()
               and not p.name.endswith(".log"))


def write_runs(catalog, n_runs: int, n_frames: int, size: int, *, tags: bool, seed: int = 0):
    """Compose and write ``n_runs`` runs; returns the seconds it took."""
    import event_model
    import numpy as np

    from bluesky_xsml.catalog.embedded import make_writer
    from bluesky_xsml.documents.compose import FrameResult, TagStreamComposer
    from bluesky_xsml.documents.frame_index import INDEX_KEY, FrameIndex
    from bluesky_xsml.tags import TAG_NAMES

    rng = np.random.default_rng(seed)
    writer = make_writer(catalog, batch_size=n_frames)
    t0 = time.perf_counter()
    for i in range(n_runs):
        bundle = event_model.compose_run(metadata={
            "scan_id": i + 1, "sample": f"S{i % 7}", "motors": ["x"], "plan_name": "scan"})
        start = bundle.start_doc
        writer("start", start)
        desc = bundle.compose_descriptor(name="primary", data_keys={
            "x": {"dtype": "number", "shape": [], "source": "sim", "object_name": "x"},
            "img": {"dtype": "array", "shape": [size, size], "dtype_numpy": "<u2",
                    "source": "sim"}},
            object_keys={"x": ["x"], "img": ["img"]})
        writer("descriptor", desc.descriptor_doc)
        now = time.time()
        frames = rng.integers(0, 100, (n_frames, size, size), dtype=np.uint16)
        page = desc.compose_event_page(
            data={"x": list(np.linspace(0, 1, n_frames)), "img": list(frames)},
            timestamps={"x": [now] * n_frames, "img": [now] * n_frames},
            time=[now] * n_frames, seq_num=list(range(1, n_frames + 1)), validate=False)
        writer("event_page", page)
        stop = bundle.compose_stop(exit_status="success")
        if tags:
            composer = TagStreamComposer(start, TAG_NAMES, [0.5] * len(TAG_NAMES),
                                         {"checkpoint_id": "bench"}, "xsml_tags",
                                         validate_pages=False)
            writer("descriptor", composer.descriptor)
            probs = rng.uniform(0.0, 0.45, (n_frames, len(TAG_NAMES)))
            for tag, every in TAG_EVERY.items():
                if i % every == 0:
                    hit = rng.choice(n_frames, size=max(1, n_frames // 10), replace=False)
                    probs[hit, TAG_NAMES.index(tag)] = rng.uniform(0.85, 1.0, len(hit))
            results = []
            index = FrameIndex(TAG_NAMES, "xsml_tags")  # what TaggingCallback builds
            xs = page["data"]["x"]
            for s in range(n_frames):
                row = probs[s]
                results.append(FrameResult(
                    stream="primary", seq_num=s + 1, event_uid="", key="img", frame_index=0,
                    probs=row.tolist(), checkpoint="bench", latency=0.01,
                    tags=tuple(t for t, p in zip(TAG_NAMES, row, strict=True) if p >= 0.5)))
                index.add(results[-1], {"x": xs[s]})
            writer("event_page", composer.page(results))
            hits = probs >= 0.5
            counts = {t: int(hits[:, j].sum()) for j, t in enumerate(TAG_NAMES)
                      if hits[:, j].any()}
            stop = composer.stop(stop, {
                "xsml_stream": "xsml_tags", "xsml_tags": sorted(counts),
                "xsml_tag_counts": counts, "xsml_model": "bench", "xsml_models": ["bench"],
                "xsml_frames": n_frames, "xsml_skipped": {}, INDEX_KEY: index.summary()})
        writer("stop", stop)
        if (i + 1) % 100 == 0:
            print(f"  wrote {i + 1}/{n_runs} runs ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr)
    return time.perf_counter() - t0


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--size", type=int, default=8, help="image side in pixels")
    parser.add_argument("--baseline-runs", type=int, default=None,
                        help="runs in the catalog without tag streams (default runs/10)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="keep the catalogs here")
    parser.add_argument("--reuse", action="store_true",
                        help="query the catalogs a run with the same --dir, --runs and --frames "
                             "wrote, without writing them again")
    args = parser.parse_args(argv)

    from bluesky_xsml.catalog.embedded import EmbeddedCatalog
    from bluesky_xsml.query import find_frames, find_runs

    root = Path(args.dir or tempfile.mkdtemp(prefix="xsml-bench-query-"))
    n_base = args.baseline_runs or max(1, args.runs // 10)
    print(f"# {args.runs} runs x {args.frames} frames ({args.size}x{args.size} uint16) in "
          f"{root}", file=sys.stderr)

    reuse = args.reuse and (root / "plain").is_dir() and (root / "tagged").is_dir()
    if args.reuse and not reuse:
        parser.error(f"--reuse: no catalogs in {root} (run once with --dir {root} first)")
    t_plain = t_write = float("nan")
    if not reuse:
        with EmbeddedCatalog(root / "plain") as cat:
            t_plain = write_runs(cat.catalog, n_base, args.frames, args.size, tags=False, seed=1)
    plain_bytes = dir_bytes(root / "plain")
    with EmbeddedCatalog(root / "tagged") as cat:
        if reuse:
            if len(cat.catalog) != args.runs:
                parser.error(f"--reuse: {root / 'tagged'} holds {len(cat.catalog)} runs, "
                             f"not --runs {args.runs}")
        else:
            t_write = write_runs(cat.catalog, args.runs, args.frames, args.size, tags=True)
        catalog = cat.catalog
        expected = {t: len(range(0, args.runs, e)) for t, e in TAG_EVERY.items()}

        # ---- run level
        t_runs, uids = timed(lambda: list(find_runs(catalog, "ring_oriented")), args.repeats)
        assert len(uids) == expected["ring_oriented"], (len(uids), expected)
        k = max(1, args.frames // 10)   # every tagged run has frames // 10 such frames
        t_runs_k, uids_k = timed(lambda: list(find_runs(catalog, "beam_off", min_frames=k)),
                                 args.repeats)
        assert len(uids_k) == expected["beam_off"], (len(uids_k), expected)

        def client_side():
            return [k for k, run in catalog.items()
                    if (run.metadata["stop"].get("xsml_tag_counts") or {}).get(
                        "ring_oriented", 0) >= 1]

        t_scan, scanned = timed(client_side, 1)
        assert sorted(scanned) == sorted(uids)

        # ---- frame level
        t_frames, df = timed(lambda: find_frames(catalog, "ring_oriented", min_prob=0.8),
                             args.repeats)
        n_runs_read = df["uid"].nunique()
        assert n_runs_read == expected["ring_oriented"]
        assert len(df) == n_runs_read * max(1, args.frames // 10)
        assert (df["probability"] >= 0.8).all() and df["x"].notna().all()

        # the same query reading the streams instead of the stop documents' index
        t_streams, df_streams = timed(
            lambda: find_frames(catalog, "ring_oriented", min_prob=0.8, use_index=False), 1)
        import pandas as pd

        pd.testing.assert_frame_equal(df, df_streams)

        def whole_streams():
            rows = 0
            for uid in uids:
                ds = catalog[uid]["xsml_tags"].read()
                rows += int((ds["ring_oriented"].values >= 0.8).sum())
            return rows

        t_whole, rows = timed(whole_streams, 1)
        assert rows == len(df)

        # the stop index's size: JSON bytes per indexed frame, over the runs found
        import json

        from bluesky_xsml.documents.frame_index import INDEX_KEY

        index_bytes = index_frames = 0
        for run in find_runs(catalog, "ring_oriented").values():
            idx = run.metadata["stop"].get(INDEX_KEY) or {}
            index_bytes += len(json.dumps(idx))
            index_frames += len((idx.get("frames") or {}).get("seq_num", []))
    tagged_bytes = dir_bytes(root / "tagged")

    per_run_tagged = tagged_bytes / args.runs
    per_run_plain = plain_bytes / n_base
    tag_bytes_per_frame = (per_run_tagged - per_run_plain) / args.frames

    if reuse:
        print(f"write: reused the catalogs in {root}")
    else:
        print(f"write: {args.runs} tagged runs in {t_write:.1f} s "
              f"({args.runs * args.frames / t_write:.0f} frames/s); {n_base} plain runs in "
              f"{t_plain:.1f} s")
    print(f"run level: find_runs ring_oriented -> {len(uids)} runs in {t_runs * 1e3:.0f} ms; "
          f"beam_off min_frames={k} -> {len(uids_k)} runs in {t_runs_k * 1e3:.0f} ms; "
          f"client-side scan of {args.runs} runs {t_scan:.2f} s "
          f"(speedup {t_scan / t_runs:.0f}x)")
    print(f"frame level: find_frames ring_oriented min_prob=0.8 over {n_runs_read} runs -> "
          f"{len(df)} frames in {t_frames:.2f} s from the stops' xsml_index; the same rows "
          f"reading the tag and primary streams (use_index=False) {t_streams:.2f} s "
          f"(ratio {t_streams / t_frames:.1f}); reading whole tag streams {t_whole:.2f} s "
          f"(ratio {t_whole / t_frames:.1f})")
    print(f"storage: {per_run_tagged / 1e3:.1f} kB/run with tags, {per_run_plain / 1e3:.1f} "
          f"kB/run without; tag stream {tag_bytes_per_frame:.0f} bytes/frame "
          f"({len(__import__('bluesky_xsml.tags', fromlist=['TAG_NAMES']).TAG_NAMES)} tags)")
    print(f"stop index: {index_bytes / max(1, index_frames):.0f} bytes of JSON per indexed "
          f"frame ({index_frames} frames in {n_runs_read} runs)")
    print(f"run_level_s {t_runs:.3f} (target 1) frame_level_s {t_frames:.3f} (target 5) "
          f"tag_bytes_per_frame {tag_bytes_per_frame:.0f}")
    ok = t_runs < 1.0 and t_frames < 5.0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
