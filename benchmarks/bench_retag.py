"""Re-tagging benchmark: frames/s of ``retag_catalog`` on two server setups, and direct HDF5 reads.

    python benchmarks/bench_retag.py [--runs 40] [--runs-1024 16] [--frames 4]
                                     [--server-workers 2] [--model-threads 1]

One command, all in one run, one Dask worker process (``LocalCluster`` of 1
worker, its model on ``--model-threads`` torch threads), everything on this
machine:

1. Servers. *facility*: Tiled on PostgreSQL (catalog and tables) with
   ``--server-workers`` uvicorn worker processes, started here
   (``facility_server.py``). *embedded*: the ``EmbeddedCatalog`` of the
   project (SQLite + DuckDB, served from a thread of this process).
2. Runs, written by a RunEngine through bluesky-tiled-plugins' ``TiledWriter``
   into each server: ``--runs`` runs of ``--frames`` inline 256x256 uint32
   frames (the project's ``InlineImageDetector``: the data key gives the
   dtype, so the frames are stored as uint32, 1 MB per 4 frames),
   ``--runs-1024`` runs of inline 1024x1024 frames; into the facility
   server also ``--runs-1024`` runs whose 1024x1024 frames are in HDF5 files
   (an ophyd area-detector-style ``HDF5ResourceDetector``; the catalog holds
   references).
3. Passes, each timed from listing to the last stream written:
   ``retag_catalog`` over the inline runs of one size on one server (frames
   over HTTP), and over the HDF5 runs with ``read_files_under`` the files'
   directory (frames read from the files by the worker; the server gives
   the metadata and takes the writes). The worker has loaded the model and
   tagged a frame of each size before the clock starts.
4. ``Tagger.predict`` alone, in the same worker process with the same
   threads, on the frames of the HDF5 runs (read into memory first).

The last line reads
``retag_fps_256 A retag_fps_1024 B direct_fps_1024 C model_fps_1024 D errors 0``
with A and B from the facility server (the best setup here); the embedded
figures are printed above it. The exit status is 1 if any run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def make_frames(n: int, size: int):
    import numpy as np

    try:
        from bluesky_xsml.sim.generator import SceneGenerator

        gen = SceneGenerator(seed=321, size=min(size, 512))
        frames = []
        for _ in range(n):  # one shape for all: pad or tile, masked pixels (NaN) -> 0
            f = np.nan_to_num(np.asarray(gen.one()[0], np.float64), nan=0.0)
            f = np.clip(f, 0, 2**32 - 1).astype(np.uint32)
            reps = (-(-size // f.shape[0]), -(-size // f.shape[1]))
            frames.append(np.ascontiguousarray(np.tile(f, reps)[:size, :size]))
        return frames
    except Exception:  # noqa: BLE001 - the generator is optional for this benchmark
        rng = np.random.default_rng(0)
        return [rng.poisson(5, (size, size)).astype(np.uint32) for _ in range(n)]


def write_runs(catalog_or_writer, n_runs: int, n_frames: int, size: int, *,
               files: str | None = None, tag: str = "bench") -> tuple[float, list[str]]:
    """Write runs; frames inline (default) or in HDF5 files under ``files``."""
    import itertools

    from bluesky import RunEngine
    from bluesky.plans import count

    pool = make_frames(8, size)
    cycle = itertools.cycle(pool)
    if files is None:  # uint32 frames in the events, described with their dtype (stored as such)
        from bluesky_xsml.sim.detectors import InlineImageDetector

        det = InlineImageDetector("img", lambda: next(cycle))
    else:
        from bluesky_xsml.sim.detectors import HDF5ResourceDetector

        det = HDF5ResourceDetector("ad", lambda: next(cycle), files)
    writer = catalog_or_writer.writer(batch_size=n_frames) \
        if hasattr(catalog_or_writer, "writer") else catalog_or_writer
    RE = RunEngine({}, call_returns_result=False)
    RE.subscribe(writer)
    uids = []
    t0 = time.perf_counter()
    # the tiled client writes large arrays blockwise with dask: keep that in this process
    # (with a distributed Client open, dask would ship the frames to the re-tag cluster)
    import dask

    with dask.config.set(scheduler="threads"):
        for i in range(n_runs):
            uids.extend(RE(count([det], n_frames), sample=f"{tag}{i}"))
    return time.perf_counter() - t0, uids


def _warm(path: str, threads: int) -> int:
    """On the Dask worker: load the model and tag a frame of each size."""
    import numpy as np

    from bluesky_xsml.scaleout.retag import load_tagger

    tagger = load_tagger(path, threads)
    for size in (256, 1024):
        tagger.predict([np.zeros((size, size), np.uint32)] * 4)
    return os.getpid()


def _model_fps(path: str, threads: int, files: list[str], repeats: int = 2) -> dict:
    """On the Dask worker: ``Tagger.predict`` alone on the frames of ``files`` (in memory)."""
    import h5py
    import numpy as np

    from bluesky_xsml.scaleout.retag import load_tagger

    tagger = load_tagger(path, threads)
    frames = []
    for f in files:
        with h5py.File(f, "r", swmr=True, locking=False) as h:
            frames.extend(np.asarray(h["/entry/data/data"][:]))
    tagger.predict(frames[:8])
    t0 = time.perf_counter()
    for _ in range(repeats):
        tagger.predict(frames, batch_size=16)
    seconds = time.perf_counter() - t0
    return {"frames": repeats * len(frames), "seconds": seconds,
            "frames_per_second": repeats * len(frames) / seconds}


def _cpu_seconds() -> float:
    """CPU time (user + system) of the calling process so far (run on the Dask worker)."""
    import psutil

    t = psutil.Process().cpu_times()
    return t.user + t.system


def one_pass(client, uri: str, model_path: str, uids: list[str], threads: int, *,
             read_files_under=(), server_cpu=None) -> dict:
    from bluesky_xsml.scaleout.retag import retag_catalog

    def worker_cpu() -> float:
        return sum(client.run(_cpu_seconds).values())

    cpu0 = server_cpu() if server_cpu else None
    own0, w0 = _cpu_seconds(), worker_cpu()
    report = retag_catalog(uri, model=model_path, scheduler=client, uids=uids,
                           model_threads=threads, read_files_under=read_files_under)
    own1, w1 = _cpu_seconds(), worker_cpu()
    d = report.to_dict()
    d["frames_per_second"] = report.frames / report.seconds if report.seconds else 0.0
    stats = [row["stats"] for row in report.rows if "stats" in row]
    d["stages"] = {k: round(sum(s.get(k, 0) for s in stats), 3) for k in
                   ("read_s", "tag_s", "write_s", "wait_read_s", "wait_write_s", "bytes_read",
                    "direct_blocks")}
    if server_cpu:
        d["server_cpu_s"] = round(server_cpu() - cpu0, 2)
    d["worker_cpu_s"] = round(w1 - w0, 2)
    d["this_process_cpu_s"] = round(own1 - own0, 2)  # the driver (and the embedded server)
    return d


def line(name: str, r: dict) -> str:
    runs = max(1, r["tagged"])
    cpu = [f"worker {1e3 * r['worker_cpu_s'] / runs:.0f}"]
    if "server_cpu_s" in r:
        cpu.append(f"server {1e3 * r['server_cpu_s'] / runs:.0f}")
    cpu.append(f"driver{'' if 'server_cpu_s' in r else '+server'} "
               f"{1e3 * r['this_process_cpu_s'] / runs:.0f}")
    return (f"{name}: {r['tagged']} runs, {r['frames']} frames in {r['seconds']:.1f} s = "
            f"{r['frames_per_second']:.1f} frames/s (errors {r['errors']}); CPU ms/run: "
            + ", ".join(cpu) + "; worker stages s: "
            + ", ".join(f"{k} {v}" for k, v in r["stages"].items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="runs of 256x256 frames")
    parser.add_argument("--runs-1024", type=int, default=16, help="runs of 1024x1024 frames")
    parser.add_argument("--frames", type=int, default=4, help="frames per run")
    parser.add_argument("--server-workers", type=int, default=2,
                        help="uvicorn workers of the facility server")
    parser.add_argument("--model-threads", type=int, default=1,
                        help="torch threads of the re-tag worker's model (default 1: the server "
                             "shares the cores; 2 was slower here)")
    parser.add_argument("--no-embedded", action="store_true",
                        help="skip the embedded-server passes")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    from distributed import Client, LocalCluster
    from facility_server import FacilityServer

    from bluesky_xsml import Tagger
    from bluesky_xsml.catalog.embedded import EmbeddedCatalog, connect, make_writer

    workdir = tempfile.mkdtemp(prefix="bench_retag_")
    files = os.path.join(workdir, "detector_files")
    os.makedirs(files)
    reference = Tagger.load()  # the packaged model: its architecture sets the cost
    model_path = str(Tagger.untrained(seed=100, config=reference.net.config).save(
        os.path.join(workdir, "model.pt")))
    results: dict = {}
    t_all = time.perf_counter()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(_warm, model_path, args.model_threads)
        with FacilityServer(os.path.join(workdir, "facility"), workers=args.server_workers,
                            readable=[files]) as server:
            node = connect(server.uri, create=True)
            writer = make_writer(node, batch_size=args.frames)
            t256, u256 = write_runs(writer, args.runs, args.frames, 256)
            t1024, u1024 = write_runs(writer, args.runs_1024, args.frames, 1024)
            th5, uh5 = write_runs(writer, args.runs_1024, args.frames, 1024, files=files)
            print(f"facility server (PostgreSQL, {args.server_workers} uvicorn workers): wrote "
                  f"{args.runs} runs x {args.frames} frames of 256x256 in {t256:.1f} s, "
                  f"{args.runs_1024} runs of 1024x1024 in {t1024:.1f} s, {args.runs_1024} runs "
                  f"of 1024x1024 in HDF5 files in {th5:.1f} s", flush=True)
            for name, uids, kw in (("facility_256", u256, {}), ("facility_1024", u1024, {}),
                                   ("direct_1024", uh5, {"read_files_under": [files]})):
                results[name] = one_pass(client, server.uri, model_path, uids,
                                         args.model_threads, server_cpu=server.cpu_seconds,
                                         **kw)
                print(line(name, results[name]), flush=True)
        h5_files = sorted(os.path.join(files, f) for f in os.listdir(files))
        results["model_1024"] = client.submit(_model_fps, model_path, args.model_threads,
                                              h5_files, pure=False).result()
        m = results["model_1024"]
        print(f"model_1024: Tagger.predict alone on the {m['frames'] // 2} HDF5 frames "
              f"(in memory, {args.model_threads} threads): {m['frames_per_second']:.1f} frames/s",
              flush=True)
        if not args.no_embedded:
            with EmbeddedCatalog(os.path.join(workdir, "embedded")) as cat:
                e256 = write_runs(cat, args.runs, args.frames, 256)[1]
                e1024 = write_runs(cat, args.runs_1024, args.frames, 1024)[1]
                for name, uids in (("embedded_256", e256), ("embedded_1024", e1024)):
                    results[name] = one_pass(client, cat.uri, model_path, uids,
                                             args.model_threads)
                    print(line(name, results[name]), flush=True)
    errors = sum(r.get("errors", 0) for r in results.values())
    fps = {k: r["frames_per_second"] for k, r in results.items()}
    print(f"total {time.perf_counter() - t_all:.0f} s; cpu_cores={os.cpu_count()}; "
          f"direct/model = {fps['direct_1024'] / fps['model_1024']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    print(f"retag_fps_256 {fps['facility_256']:.1f} retag_fps_1024 {fps['facility_1024']:.1f} "
          f"direct_fps_1024 {fps['direct_1024']:.1f} model_fps_1024 {fps['model_1024']:.1f} "
          f"errors {errors}")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
