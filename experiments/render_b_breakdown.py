"""Where the shipped model loses on renderer B's frames: AP by readout and by convention.

    python experiments/render_b_breakdown.py --data runs/render_b_test.zarr

Scores the model (with the frames' beam centres) once, then reports:

- mAP per readout family (photon counting, integrating CCD, pipeline float);
- ``detector_gaps`` AP for each kind of gap stripe (the positives of that kind
  against every negative frame, including frames with interpolated gaps);
- ``saturation`` AP where the saturated value is the dtype's maximum (16-bit
  CCDs, ``2**16-1``, which Eiger frames use for masked pixels) and elsewhere.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def _ap(y, s):
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(y, s)) if 0 < y.sum() < len(y) else float("nan")


def _auc(y, s):
    from sklearn.metrics import roc_auc_score

    return round(float(roc_auc_score(y, s)), 4) if 0 < y.sum() < len(y) else float("nan")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--model", default=None)
    a = p.parse_args()
    from bluesky_xsml.inference.tagger import Tagger
    from bluesky_xsml.sim.dataset import open_dataset  # the format reader only
    from bluesky_xsml.tags import TAG_NAMES, tag_index
    from bluesky_xsml.training.data import load_arrays
    from bluesky_xsml.training.evaluate import arrays_centers, predict_arrays

    tagger = Tagger.load(a.model, precision="fp32") if a.model else Tagger.load(
        precision="fp32")
    arrays = load_arrays(a.data, config=tagger.preprocess_config, progress=False)
    scores = predict_arrays(tagger, arrays.inputs, 64, centers=arrays_centers(tagger, arrays))
    y = arrays.labels
    ds = open_dataset(a.data)
    params = [ds.params(i) for i in range(len(ds))]
    readout = np.array([q["detector"]["readout"] for q in params])
    out = {"mAP_by_readout": {}}
    for r in np.unique(readout):
        m = readout == r
        aps = [_ap(y[m, k], scores[m, k]) for k in range(len(TAG_NAMES))]
        out["mAP_by_readout"][str(r)] = {"frames": int(m.sum()),
                                         "mAP": round(float(np.nanmean(aps)), 4)}
    from bluesky_xsml.render_b.detectors import DETECTORS

    MODULAR = {d.name for d in DETECTORS if d.modular}
    g = tag_index("detector_gaps")
    fill = np.array([str(q["detector"]["convention"].get("gap_fill")) for q in params])
    neg = y[:, g] == 0
    out["detector_gaps_by_fill"] = {}
    for f in np.unique(fill[y[:, g] == 1]):
        m = neg | ((y[:, g] == 1) & (fill == f))
        out["detector_gaps_by_fill"][f] = {"positives": int(((y[:, g] == 1) & (fill == f)).sum()),
                                           "AP": round(_ap(y[m, g], scores[m, g]), 4),
                                           "ROC-AUC": _auc(y[m, g], scores[m, g])}
    modular = np.array([q["detector"]["name"] in MODULAR for q in params])
    interp = fill == "interpolate"
    pos = y[:, g] == 1
    out["detector_gaps_negatives"] = {
        name: {"frames": int(m.sum()), "median score": round(float(np.median(scores[m, g])), 4),
               "ROC-AUC of all positives against them": _auc(
                   np.r_[np.ones(pos.sum()), np.zeros(m.sum())],
                   np.r_[scores[pos, g], scores[m, g]])}
        for name, m in (("interpolated gaps", neg & interp),
                        ("no gaps (one module)", neg & ~modular),
                        ("0 stripes with no counts beside them", neg & modular & ~interp))}
    s = tag_index("saturation")
    top = np.array([q["detector"]["convention"]["dtype"] != "float32" and
                    q["detector"]["convention"]["saturated"] ==
                    np.iinfo(q["detector"]["convention"]["dtype"]).max for q in params])
    neg = y[:, s] == 0
    out["saturation_by_value"] = {}
    for name, m_pos in (("dtype maximum", top), ("below the dtype maximum", ~top)):
        m = neg | ((y[:, s] == 1) & m_pos)
        out["saturation_by_value"][name] = {"positives": int(((y[:, s] == 1) & m_pos).sum()),
                                            "AP": round(_ap(y[m, s], scores[m, s]), 4),
                                            "ROC-AUC": _auc(y[m, s], scores[m, s])}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
