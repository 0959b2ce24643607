"""Print the model card's results table from ``bluesky_xsml/models/default.json``.

``default.json`` is written by the two ``xsml evaluate`` commands in docs/training.md
(``--summary ... --summary-key test`` and ``--summary-key unseen_shapes``)::

    python docs/tools/model_card_table.py
"""

import json
from pathlib import Path

root = Path(__file__).resolve().parents[2]
summary = json.loads((root / "bluesky_xsml/models/default.json").read_text())
test, unseen = summary["test"], summary["unseen_shapes"]
print("| tag | CNN AP | baseline AP | CNN AP, unseen shapes | threshold |")
print("|---|---|---|---|---|")
for tag, ap in test["ap"].items():
    print(f"| {tag} | {ap:.3f} | {test['baseline_ap'][tag]:.3f} | "
          f"{unseen['ap'][tag]:.3f} | {summary['thresholds'][tag]:.2f} |")
print(f"| **mAP** | **{test['mAP']:.3f}** | **{test['baseline_mAP']:.3f}** | "
      f"**{unseen['mAP']:.3f}** | |")
