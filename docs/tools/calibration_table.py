"""Print the model card's calibration table from the summary the evaluations wrote.

The ``xsml evaluate`` commands of the model card's "Calibration" section merge their results
into ``runs/calibration.json`` under ``test_default``, ``test_calibrated`` (the synthetic test
frames) and, when run, ``render_b_default`` and ``render_b_calibrated`` (renderer B's test
frames)::

    python docs/tools/calibration_table.py [runs/calibration.json]
"""

import json
import sys
from pathlib import Path

root = Path(__file__).resolve().parents[2]
path = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "runs" / "calibration.json"
summary = json.loads(path.read_text())
pairs = [(k, f"{k}_default", f"{k}_calibrated") for k in ("test", "render_b")
         if f"{k}_default" in summary and f"{k}_calibrated" in summary]
names = {"test": "test frames", "render_b": "renderer B"}


def cell(v):
    return "-" if v is None else f"{v:.4f}"


head = ["tag"]
for k, _, _ in pairs:
    head += [f"ECE, {names[k]}", f"calibrated, {names[k]}"]
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
tags = list(summary[pairs[0][1]]["ece"])
for tag in tags:
    row = [tag]
    for _, before, after in pairs:
        row += [cell(summary[before]["ece"][tag]), cell(summary[after]["ece"][tag])]
    print("| " + " | ".join(row) + " |")
for label, key in (("mean over tags", "mean_ece"), ("all tags pooled", "ece_pooled")):
    row = [f"**{label}**"]
    for _, before, after in pairs:
        row += [f"**{cell(summary[before][key])}**", f"**{cell(summary[after][key])}**"]
    print("| " + " | ".join(row) + " |")
for k, before, after in pairs:
    same = summary[before]["ap"] == summary[after]["ap"]
    print(f"\n{names[k]}: mAP {summary[before]['mAP']} uncalibrated, {summary[after]['mAP']} "
          f"calibrated; per-tag AP {'identical' if same else 'DIFFERENT'}")
