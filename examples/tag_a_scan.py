"""Tag a scan live and store it: RunEngine -> TaggingCallback -> Tiled.

    python examples/tag_a_scan.py [--points 4] [--size 256] [--catalog DIR]

A grid scan over the simulated combinatorial sample; every frame is tagged by
the packaged model, the run and its tag stream are stored in an embedded Tiled
catalog, and the run's tag summary is printed from the stored stop document.
"""

import argparse
import tempfile

from bluesky import RunEngine
from bluesky.plans import grid_scan

from bluesky_xsml import Tagger, TaggingCallback
from bluesky_xsml.catalog.embedded import EmbeddedCatalog
from bluesky_xsml.sim.sample import make_beamline

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--points", type=int, default=4, help="points per side of the grid")
parser.add_argument("--size", type=int, default=256, help="frame side in pixels")
parser.add_argument("--catalog", default=None, help="catalog folder (default: a temporary one)")
args = parser.parse_args()

bl = make_beamline(size=args.size)
with EmbeddedCatalog(args.catalog or tempfile.mkdtemp()) as catalog:
    xsml = TaggingCallback(Tagger.load(), downstream=[catalog.writer()])
    RE = RunEngine()
    RE.subscribe(xsml)
    (uid,) = RE(grid_scan([bl.det], bl.sample_y, 1, 9, args.points,
                          bl.sample_x, 1, 9.6, args.points), sample="combinatorial film")
    xsml.close()                      # tag what is pending and deliver it

    stop = catalog.catalog[uid].metadata["stop"]
    print(f"run {uid[:8]}: {stop['xsml_frames']} frames tagged, skipped: "
          f"{stop['xsml_skipped'] or 'none'}")
    for tag, n in sorted(stop["xsml_tag_counts"].items(), key=lambda kv: -kv[1]):
        print(f"  {tag:<20} {n} frames")
