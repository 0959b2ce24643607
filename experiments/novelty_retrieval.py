"""Frames like this one: precision@10 and query latency over 10,000 synthetic frames.

Renders ``--n`` generator frames (training detectors, ``--size`` pixels), runs the
packaged default model with its novelty statistics on them (``Tagger.analyse``), and
keeps the pooled features, probabilities, embeddings and true labels in ``--cache``
(an ``.npz``; rerunning reuses it). Then every frame in turn (or ``--queries`` of them)
is a query against all the others through :class:`bluesky_xsml.catalog.similar.SimilarityIndex`
(brute-force cosine over float16 embeddings), and the script reports:

* precision@10 where a neighbour is relevant when its true tag set equals the query's
  (exact; queries whose tag set no other frame has are left out, and how many is said),
  and the looser "shares at least one scattering tag and Jaccard >= 0.5";
* the same for baselines: the 23 probabilities and the raw 384-d features (cosine);
* p50/p99 latency of one ``nearest(k=10)`` over the whole index.

::

    python experiments/novelty_retrieval.py --n 10000 --cache /tmp/retrieval.npz
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def build(n: int, size: int, seed: int, cache: Path) -> dict:
    from bluesky_xsml import Tagger
    from bluesky_xsml.sim.generator import SceneGenerator

    tagger = Tagger.load(precision="fp32", num_threads=1)
    if tagger.novelty is None:
        raise SystemExit("the default model has no novelty statistics (xsml novelty-fit)")
    gen = SceneGenerator(seed=seed, size=size, detectors="train")
    feats, probs, labels = [], [], []
    t0 = time.perf_counter()
    chunk = 64
    for a in range(0, n, chunk):
        frames, lab, _ = gen.batch(min(chunk, n - a))
        out = tagger.analyse(frames, keep_features=True)
        feats.append(out.features)
        probs.append(out.probs)
        labels.append(lab)
        if (a // chunk) % 10 == 0:
            print(f"{a + len(frames)}/{n} frames, {time.perf_counter() - t0:.0f} s", flush=True)
    data = {"features": np.concatenate(feats), "probs": np.concatenate(probs),
            "labels": np.concatenate(labels),
            "checkpoint_id": np.asarray(tagger.checkpoint_id),
            "spec": np.asarray(f"SceneGenerator(seed={seed}, size={size}, detectors=train)")}
    np.savez(cache, **data)
    return data


def precision_at_k(vectors: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int = 10):
    """Mean precision@k (exact tag set; loose), and how many queries had a relevant frame."""
    from bluesky_xsml.tags import TAGS

    v = np.asarray(vectors, np.float32)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    lab = labels > 0.5
    scatter = np.array([t.group == "scattering" for t in TAGS])
    keys = [row.tobytes() for row in lab]
    counts: dict = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    exact, loose, used = [], [], 0
    for q in queries:
        sims = v @ v[q]
        sims[q] = -np.inf
        top = np.argpartition(-sims, k)[:k]
        loose_hits = []
        for j in top:
            inter = (lab[q] & lab[j]).sum()
            union = (lab[q] | lab[j]).sum()
            jac = inter / union if union else 1.0
            shares = (lab[q] & lab[j] & scatter).any() or not (lab[q] & scatter).any()
            loose_hits.append(jac >= 0.5 and shares)
        loose.append(np.mean(loose_hits))
        if counts[keys[q]] > 1:
            used += 1
            exact.append(np.mean([keys[j] == keys[q] for j in top]))
    return float(np.mean(exact)) if exact else float("nan"), float(np.mean(loose)), used


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=20)
    p.add_argument("--cache", default="/tmp/xsml-retrieval.npz")
    p.add_argument("--queries", type=int, default=2000, help="query frames (0: all)")
    p.add_argument("--latency-queries", type=int, default=1000)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    cache = Path(args.cache)
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    else:
        data = build(args.n, args.size, args.seed, cache)
    n = len(data["labels"])
    rng = np.random.default_rng(0)
    queries = np.arange(n) if not args.queries else rng.choice(n, min(args.queries, n), False)
    report = {"frames": n, "spec": str(data["spec"]), "model": str(data["checkpoint_id"]),
              "queries": int(len(queries))}
    from bluesky_xsml.inference.tagger import Tagger

    loaded = Tagger.load(precision="fp32")
    nov = loaded.novelty
    decided = data["probs"] >= loaded.thresholds
    report["tagger's tag set exactly right (context for the exact criterion)"] = round(
        float((decided == (data["labels"] > 0.5)).all(axis=1).mean()), 4)
    # embeddings are recomputed from the cached features and probabilities, so the cache
    # stays valid when only the embedding changes
    shipped = nov.embed(data["features"], data["probs"])
    variants = {f"embedding ({shipped.shape[1]}-d float16, shipped: features + probabilities)":
                shipped,
                f"features only ({nov.embedding_dim} principal directions)":
                nov.embed(data["features"]),
                "probabilities only (23-d, p - 0.5)": data["probs"] - 0.5,
                "pooled features (384-d, raw)": data["features"]}
    for name, vecs in variants.items():
        exact, loose, used = precision_at_k(vecs, data["labels"], queries)
        report[name] = {"p@10 exact tag set": round(exact, 4), "p@10 loose": round(loose, 4),
                        "queries with another frame of their tag set": used}
        print(name, report[name], flush=True)

    from bluesky_xsml.catalog.similar import SimilarityIndex

    rows = [{"uid": "r", "scan_id": 0, "stream": "primary", "seq_num": i, "key": "img",
             "frame_index": 0, "tags": "", "novelty": 0.0} for i in range(n)]
    index = SimilarityIndex(shipped, rows)
    lat = []
    for q in rng.choice(n, args.latency_queries):
        t0 = time.perf_counter()
        index.nearest(index.vectors[q], 10, exclude=int(q))
        lat.append(time.perf_counter() - t0)
    lat = np.array(lat) * 1e3
    report["latency_ms"] = {"p50": round(float(np.percentile(lat, 50)), 3),
                            "p99": round(float(np.percentile(lat, 99)), 3),
                            "index_bytes": index.nbytes,
                            "bytes_per_million_frames": int(index.nbytes / n * 1e6)}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
