"""Find runs and frames by tag in a catalog.

    python examples/query_the_catalog.py [--catalog DIR] [--tag ring_textured] [--size 256]

Without ``--catalog`` it first maps the simulated sample into a temporary
catalog (a 4 x 4 grid). Then ``find_runs`` (one query on the stored
summaries) and ``find_frames`` (each matching frame with its sample position).
Point ``--catalog`` at a demo's ``OUT/catalog`` to query that instead.
"""

import argparse
import tempfile

from bluesky_xsml.catalog.embedded import EmbeddedCatalog
from bluesky_xsml.query import find_frames, find_runs

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--catalog", default=None)
parser.add_argument("--tag", default="ring_textured")
parser.add_argument("--size", type=int, default=256)
args = parser.parse_args()

with EmbeddedCatalog(args.catalog or tempfile.mkdtemp()) as catalog:
    if args.catalog is None:
        from bluesky import RunEngine
        from bluesky.plans import grid_scan

        from bluesky_xsml import Tagger, TaggingCallback
        from bluesky_xsml.sim.sample import make_beamline

        bl = make_beamline(size=args.size)
        xsml = TaggingCallback(Tagger.load(), downstream=[catalog.writer()])
        RE = RunEngine()
        RE.subscribe(xsml)
        RE(grid_scan([bl.det], bl.sample_y, 1, 9, 4, bl.sample_x, 1, 9.6, 4),
           sample="combinatorial film")
        xsml.close()

    runs = find_runs(catalog.catalog, args.tag)
    print(f"find_runs: {len(runs)} run(s) with frames tagged {args.tag}")
    frames = find_frames(runs, args.tag)
    print(f"find_frames: {len(frames)} frame(s)")
    columns = [c for c in ("scan_id", "seq_num", "probability", "sample_x", "sample_y")
               if c in frames]
    if len(frames):
        print(frames[columns].to_string(index=False))
