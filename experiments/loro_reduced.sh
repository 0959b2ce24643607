#!/usr/bin/env bash
# Leave-one-renderer-out at reduced size: train on renderer B (8,000 frames, 12 epochs), then
# score that model on the project's generator and on renderer B's own test set (seed 100).
# The other direction is the shipped model scored on renderer B (docs/render-b.md).
# Renderer B's frames come from renderb: sources, rendered in 2 worker processes straight into
# the training cache ($XSML_CACHE, docs/training.md) as preprocessed inputs, about 2 GB for the
# 10,000 frames (192.9 KiB a frame, docs/render-b.md); no zarr store is written. Frame i of
# renderb:seed=S is frame i of `python -m bluesky_xsml.render_b --seed S`, so the frames are
# those of the zarr stores this script wrote before (about 8 GB), and the measurement the same.
# About 45 min on 2 cores (timed with the zarr stores); runs/loro keeps only models and reports.
set -euxo pipefail
OUT=${1:-runs/loro}
mkdir -p "$OUT"
xsml train --data renderb:seed=0,n=8000 --val-data renderb:seed=1,n=1000 --workers 2 \
    --epochs 12 --out "$OUT/train-on-b" --no-progress
xsml evaluate --model "$OUT/train-on-b/model.pt" --workers 2 \
    --data synth:seed=2,n=2000,sizes=256+512+768+1024,detectors=train --out "$OUT/b-on-sim"
xsml evaluate --model "$OUT/train-on-b/model.pt" --workers 2 \
    --data renderb:seed=100,n=1000 --out "$OUT/b-on-b"
