# The simulated mapping beamline: sample stage motors and a scattering detector.
#
# `det` shows the simulated combinatorial sample (bluesky_xsml.sim.sample)
# wherever `sample_x` and `sample_y` put the beam, e.g.
#     RE(grid_scan([det], sample_y, 0, 9, 4, sample_x, 0, 9, 4))
# At a real beamline this file defines the real devices instead.
#   XSML_SIM_SIZE  frame side in pixels (default 256)
#   XSML_SIM_SEED  seed of the frames' noise (default 0)

import os

from bluesky_xsml.sim.sample import make_beamline

beamline = make_beamline(size=int(os.environ.get("XSML_SIM_SIZE", "256")),
                         seed=int(os.environ.get("XSML_SIM_SEED", "0")))
sample = beamline.sample
sample_x, sample_y, det = beamline.sample_x, beamline.sample_y, beamline.det
# The calibrated beam centre of the detector, in every run's start document, where the
# tagging callback reads it (per image data key).
RE.md["xsml_beam_center"] = {f"{det.name}_image": list(sample.beam_center)}  # noqa: F821
