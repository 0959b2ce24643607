"""Does a calibrated checkpoint tag exactly as its uncalibrated parent?

Tags the same frames with both checkpoints (fp32, beam centres given when the
data has them) and prints, per tag, how many (frame, tag) decisions differ at
each checkpoint's own thresholds, the AP of each, and the ECE of each (15
equal-width bins, unknown labels left out). The calibrated one is what
``xsml calibrate --model PARENT --data VAL --out CALIBRATED`` writes. About two
minutes per checkpoint on 2,000 cached test frames on the 2-core machine.

    python experiments/calibration_decisions.py --calibrated runs/calibrated/model.pt
"""

from __future__ import annotations

import argparse

import numpy as np

from bluesky_xsml.inference.tagger import Tagger
from bluesky_xsml.training.data import load_arrays
from bluesky_xsml.training.evaluate import arrays_centers, predict_arrays
from bluesky_xsml.training.metrics import average_precision, calibration_errors


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="the uncalibrated parent (default: packaged)")
    ap.add_argument("--calibrated", required=True, help="the calibrated checkpoint")
    ap.add_argument("--data", default="synth:seed=2,n=2000,sizes=256+512+768+1024,detectors=train")
    args = ap.parse_args(argv)
    raw = Tagger.load(args.model, precision="fp32")
    cal = Tagger.load(args.calibrated, precision="fp32")
    if cal.calibration is None:
        raise SystemExit(f"{args.calibrated} carries no calibration")
    arrays = load_arrays(args.data, config=raw.preprocess_config, workers=2, progress=False)
    y = np.asarray(arrays.labels)
    s_raw = predict_arrays(raw, arrays.inputs, 64, centers=arrays_centers(raw, arrays))
    s_cal = predict_arrays(cal, arrays.inputs, 64, centers=arrays_centers(cal, arrays))
    d_raw, d_cal = s_raw >= raw.thresholds, s_cal >= cal.thresholds
    e_raw, p_raw = calibration_errors(y, s_raw)
    e_cal, p_cal = calibration_errors(y, s_cal)
    print(f"{raw.checkpoint_id} (uncalibrated) and {cal.checkpoint_id} (calibrated) on "
          f"{len(y)} frames of {arrays.source}")
    print(f"{'tag':<20} {'differ':>6} {'AP':>8} {'AP cal':>8} {'ECE':>7} {'ECE cal':>7}")
    for j, t in enumerate(raw.tags):
        print(f"{t:<20} {int((d_raw[:, j] != d_cal[:, j]).sum()):>6} "
              f"{average_precision(y[:, j], s_raw[:, j]):>8.4f} "
              f"{average_precision(y[:, j], s_cal[:, j]):>8.4f} {e_raw[j]:>7.4f} {e_cal[j]:>7.4f}")
    ap_diff = max(abs(average_precision(y[:, j], s_raw[:, j])
                      - average_precision(y[:, j], s_cal[:, j])) for j in range(len(raw.tags)))
    print(f"decisions that differ: {int((d_raw != d_cal).sum())} of {d_raw.size}; largest AP "
          f"difference {ap_diff:.2g}; ECE pooled {p_raw:.4f} -> {p_cal:.4f}, mean per tag "
          f"{np.nanmean(e_raw):.4f} -> {np.nanmean(e_cal):.4f}")


if __name__ == "__main__":
    main()
