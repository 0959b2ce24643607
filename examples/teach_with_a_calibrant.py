"""Teach the model with a labeled calibrant run (live fine-tuning).

    python examples/teach_with_a_calibrant.py [--frames 6] [--steps 20] [--size 256]

Counts on the fine-powder region of the simulated sample (our "calibrant":
sharp CeO2 rings), labels those frames (``xsml.label``), and runs one
fine-tuning round. The round trains a copy of the model on the labels plus
synthetic replay, checks it on held-out labels and on synthetic validation
frames, and swaps it in only if it passes; the report says which.
"""

import argparse
import tempfile

from bluesky import RunEngine
from bluesky.plans import count

from bluesky_xsml import Tagger, TaggingCallback
from bluesky_xsml.sim.sample import make_beamline

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--frames", type=int, default=6)
parser.add_argument("--steps", type=int, default=20, help="optimiser steps of the round")
parser.add_argument("--size", type=int, default=256)
parser.add_argument("--replay", type=int, default=64, help="synthetic replay frames")
args = parser.parse_args()

bl = make_beamline(size=args.size)
bl.sample_x.set(5.0).wait()
bl.sample_y.set(2.0).wait()               # fine powder: isotropic rings
print("true tags here:", bl.sample.tags_at(5.0, 2.0))

xsml = TaggingCallback(Tagger.load())
tuner = xsml.enable_finetuning(
    tempfile.mkdtemp(), min_labels=1000, auto=False, steps=args.steps, nice=0,
    synthetic=f"synth:seed=0,n={args.replay},sizes=128,detectors=train",
    synthetic_val=f"synth:seed=1,n={args.replay // 2},sizes=128,detectors=train")
RE = RunEngine()
RE.subscribe(xsml)
(uid,) = RE(count([bl.det], args.frames), sample="CeO2 calibrant (simulated)")
xsml.flush(120)

print("suggested for labeling:", [s["seq_num"] for s in xsml.suggest_labels(3)])
for seq in range(1, args.frames + 1):
    xsml.label(uid, seq, ring_isotropic=True, ring_oriented=False, ring_textured=False,
               halo_isotropic=False, peaks_on_ring=False, beam_off=False)
report = tuner.retrain_now(wait=True, timeout=600)
print("round report:", {k: report.get(k) for k in ("promoted", "reason", "checkpoint_id",
                                                     "steps") if k in report} or report)
print("fine-tuner status:", {k: v for k, v in tuner.status().items()
                             if k in ("rounds", "promoted", "active", "labels", "state")})
xsml.close()
