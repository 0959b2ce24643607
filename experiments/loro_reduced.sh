#!/usr/bin/env bash
# Leave-one-renderer-out at reduced size: train on renderer B (8,000 frames, 12 epochs), then
# score that model on the project's generator and on renderer B's own test set (seed 100).
# The other direction is the shipped model scored on renderer B (docs/render-b.md).
# About 45 min on 2 cores; writes under runs/loro (about 8 GB of frames).
set -euxo pipefail
OUT=${1:-runs/loro}
mkdir -p "$OUT"
python -m bluesky_xsml.render_b --n 8000 --out "$OUT/b-train.zarr" --seed 0 --workers 2 --no-progress
python -m bluesky_xsml.render_b --n 1000 --out "$OUT/b-val.zarr" --seed 1 --no-progress
python -m bluesky_xsml.render_b --n 1000 --out "$OUT/b-test.zarr" --seed 100 --no-progress
xsml train --data "$OUT/b-train.zarr" --val-data "$OUT/b-val.zarr" --epochs 12 \
    --out "$OUT/train-on-b" --no-progress
xsml evaluate --model "$OUT/train-on-b/model.pt" \
    --data synth:seed=2,n=2000,sizes=256+512+768+1024,detectors=train --out "$OUT/b-on-sim"
xsml evaluate --model "$OUT/train-on-b/model.pt" --data "$OUT/b-test.zarr" --out "$OUT/b-on-b"
