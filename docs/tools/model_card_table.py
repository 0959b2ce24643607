"""Print the model card's results table from ``bluesky_xsml/models/default.json``.

``default.json`` is written by the ``xsml evaluate`` commands in docs/training.md
(``--summary ... --summary-key KEY`` with the keys ``test`` and ``unseen_shapes``, the frames'
beam centres given to the polar head, and ``test_no_center`` and ``unseen_no_center``, run with
``--no-beam-center``)::

    python docs/tools/model_card_table.py
"""

import json
from pathlib import Path

root = Path(__file__).resolve().parents[2]
summary = json.loads((root / "bluesky_xsml/models/default.json").read_text())
test, unseen = summary["test"], summary["unseen_shapes"]
test_nc, unseen_nc = summary["test_no_center"], summary["unseen_no_center"]
print("| tag | AP | AP, no beam centre | baseline AP | AP, unseen shapes "
      "| AP, unseen shapes, no beam centre | threshold |")
print("|---|---|---|---|---|---|---|")
for tag, ap in test["ap"].items():
    print(f"| {tag} | {ap:.3f} | {test_nc['ap'][tag]:.3f} | {test['baseline_ap'][tag]:.3f} | "
          f"{unseen['ap'][tag]:.3f} | {unseen_nc['ap'][tag]:.3f} | "
          f"{summary['thresholds'][tag]:.2f} |")
print(f"| **mAP** | **{test['mAP']:.3f}** | **{test_nc['mAP']:.3f}** | "
      f"**{test['baseline_mAP']:.3f}** | **{unseen['mAP']:.3f}** | **{unseen_nc['mAP']:.3f}** | |")
