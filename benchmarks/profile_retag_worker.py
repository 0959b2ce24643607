"""CPU of the worker side of a batched re-tag, per stage, and its hottest functions (cProfile).

    python benchmarks/profile_retag_worker.py [--runs 8] [--frames 4] [--size 256]

Writes ``--runs`` runs into an embedded catalog (as ``bench_retag.py`` does), then
re-tags them in this thread, one stage after the other (``read_run``, ``tag_run``, the
write of ``bluesky_xsml.scaleout.batched``), and prints the CPU time of this thread per
run and stage (``time.thread_time``: the embedded server's threads are not counted) and
the functions with the most cumulative time under cProfile.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    import numpy as np
    import torch
    from bench_retag import write_runs

    from bluesky_xsml import Tagger
    from bluesky_xsml.catalog.append import tag_run
    from bluesky_xsml.catalog.embedded import EmbeddedCatalog
    from bluesky_xsml.scaleout.batched import _write, list_run_items, read_run

    torch.set_num_threads(1)  # as a re-tag worker with one thread (the server has the other core)
    reference = Tagger.load()
    tagger = Tagger.untrained(seed=3, config=reference.net.config)
    tagger.set_num_threads(1)
    tagger.predict([np.zeros((args.size, args.size), np.uint32)] * args.frames)
    with tempfile.TemporaryDirectory() as workdir, \
            EmbeddedCatalog(os.path.join(workdir, "catalog")) as cat:
        write_runs(cat, args.runs, args.frames, args.size)
        items = list_run_items(cat.catalog)
        stage = {"read": 0.0, "tag": 0.0, "write": 0.0}
        profile = cProfile.Profile()
        profile.enable()
        for item in items:
            t0 = time.thread_time()
            prepared = read_run(cat.catalog, item, tagger.checkpoint_id)
            t1 = time.thread_time()
            tagged = tag_run(item["attributes"]["metadata"], tagger, prepared.blocks)
            t2 = time.thread_time()
            _write(cat.catalog, item, tagged, make_current=True, stream_name=None, retries=0)
            t3 = time.thread_time()
            stage["read"] += t1 - t0
            stage["tag"] += t2 - t1
            stage["write"] += t3 - t2
        profile.disable()
    print(f"{args.runs} runs x {args.frames} frames of {args.size}x{args.size}; CPU of the "
          "worker thread, ms per run: "
          + ", ".join(f"{k} {1e3 * v / args.runs:.0f}" for k, v in stage.items()))
    pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
