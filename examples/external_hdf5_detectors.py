"""Tag frames that detectors write to HDF5 files (resource/datum and stream_resource).

    python examples/external_hdf5_detectors.py [--size 256] [--points 3]

Two detectors look at the simulated sample and write their frames to HDF5
files: an ophyd v1 area-detector-style one (``resource``/``datum``) and an
ophyd-async one (``stream_resource``/``stream_datum``). The callback reads the
frames from the files itself (no Filler) and tags them.
"""

import argparse
import tempfile

from bluesky import RunEngine
from bluesky.plans import scan
from ophyd.sim import SynAxis
from ophyd_async.core import init_devices

from bluesky_xsml import Tagger, TaggingCallback
from bluesky_xsml.sim.sample import CombinatorialSample, hdf5_stage_detector, stream_stage_detector

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--size", type=int, default=256)
parser.add_argument("--points", type=int, default=3)
args = parser.parse_args()

data = tempfile.mkdtemp()
sample = CombinatorialSample(size=args.size)
x = SynAxis(name="sample_x")
RE = RunEngine()                       # before init_devices: it owns the event loop
waxs = hdf5_stage_detector("waxs", x, 2.0, sample, root_dir=data)
with init_devices():
    saxs = stream_stage_detector("saxs", x, 7.0, sample, root_dir=data)

xsml = TaggingCallback(Tagger.load())
RE.subscribe(xsml)
for det in (waxs, saxs):
    RE(scan([det], x, 1.0, 9.6, args.points))
    xsml.flush(120)
    stop = xsml.finished_runs[-1]
    print(f"{det.name}: {stop['xsml_frames']} frames tagged from HDF5, skipped "
          f"{stop['xsml_skipped'] or 'none'}; tags {stop['xsml_tags']}")
xsml.close()
