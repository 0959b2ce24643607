"""Leave one family out, many scores: which feature statistics flag an unseen tag family?

``experiments/novelty_lofo.py`` measures the scores the tagger ships. This script asks
which score *could* work, on the same reduced leave-one-family-out setup (the same
rendered frames, the same splits, the same training): for each family it trains a
tagger without the family (or reloads the one it saved in ``--models``), runs it eagerly
over the training, validation and test frames keeping statistics of every stage's
feature map, and reports the AUROC (held-out frames *with* the family against held-out
frames without it) of each candidate score:

* ``maha_pooled``: the shipped Mahalanobis distance on the head's pooled features;
* ``knn{k}_pooled``: cosine distance to the k-th nearest training frame on the
  L2-normalised pooled features (Sun et al. 2022);
* ``cluster_pooled``: distance to the nearest of 16 k-means centres, tied covariance
  (a class-conditional Gaussian without labels);
* ``tag_pooled``: distance to the nearest per-tag mean, tied covariance (Lee et al. 2018,
  with the trained tags as classes);
* ``maha_L`` for each stage ``L`` (``input`` = the preprocessed input, ``stem``,
  ``s1`` ...): Mahalanobis distance of the per-channel mean, max and standard deviation
  of that stage's map; ``multi``: their sum after standardising each on validation
  frames (Lee et al. 2018 without the outlier-trained weights);
* ``local_L``: the largest per-position Mahalanobis distance of the channel vector of
  stage ``L`` (one Gaussian over all positions of all training frames), for small local
  features that pooling dilutes; ``local_multi`` their standardised sum;
* ``energy`` (the logits' negative joint energy) and standardised sums with it;
* ``lownorm_pooled``: the negative log norm of the pooled features, and
  ``knn1+2relu(lownorm)``, the score :mod:`bluesky_xsml.novelty` ships (there with a
  reference bank of at most 4096 training frames, here all of them).

Everything is fitted on the training frames of that family's model; standardisation and
the 1% false-positive threshold use its validation frames (in distribution); the
family's frames are used only in the reported AUROC. The score to ship is chosen on a
development family (``--dev-family``, default ``halo``) that is not among the reported
ones. Reduced run (docs/novelty.md)::

    OMP_NUM_THREADS=1 python experiments/novelty_layers.py --families halo,peaks,grazing,rings \\
        --cache /tmp/nov/lofo10k.npz --models /tmp/nov/layers --out /tmp/nov/layers.json \\
        --n 10000 --epochs 8 --input-size 64 --widths 16,32,64,96 --depths 1,1,1,1 \\
        --stem-width 16 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

try:  # run as a script (python experiments/novelty_layers.py) or imported from the repo root
    from novelty_lofo import FAMILIES, REDUCED, add_options, make_data, split_indices, train
except ImportError:  # pragma: no cover
    from experiments.novelty_lofo import (
        FAMILIES,
        REDUCED,
        add_options,
        make_data,
        split_indices,
        train,
    )


class Gaussian:
    """Standardised features, covariance shrunk toward the identity: Mahalanobis distances."""

    def __init__(self, x: np.ndarray, shrinkage: float = 0.05):
        x = np.asarray(x, np.float64)
        self.mu = x.mean(0)
        self.sd = x.std(0) + 1e-6
        z = (x - self.mu) / self.sd
        cov = z.T @ z / max(len(z) - 1, 1)
        cov = (1 - shrinkage) * cov + shrinkage * np.eye(cov.shape[0])
        self.prec = np.linalg.inv(cov)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, np.float64) - self.mu) / self.sd
        return np.sqrt(np.maximum(np.einsum("nf,nf->n", z @ self.prec, z), 0))


class PositionGaussian:
    """One Gaussian over the channel vectors of all positions (sums accumulated in passes)."""

    def __init__(self, c: int):
        self.n, self.s, self.ss = 0, np.zeros(c), np.zeros((c, c))

    def add(self, m: np.ndarray):  # m: (B, C, H, W)
        v = m.transpose(0, 2, 3, 1).reshape(-1, m.shape[1]).astype(np.float64)
        self.n += len(v)
        self.s += v.sum(0)
        self.ss += v.T @ v

    def finish(self, shrinkage: float = 0.05):
        self.mu = self.s / self.n
        cov = self.ss / self.n - np.outer(self.mu, self.mu)
        self.sd = np.sqrt(np.maximum(np.diag(cov), 0)) + 1e-6
        corr = cov / np.outer(self.sd, self.sd)
        corr = (1 - shrinkage) * corr + shrinkage * np.eye(len(corr))
        self.prec = np.linalg.inv(corr)

    def max_score(self, m: np.ndarray) -> np.ndarray:
        b, c = m.shape[:2]
        z = (m.transpose(0, 2, 3, 1).reshape(b, -1, c) - self.mu) / self.sd
        d2 = np.einsum("bpc,bpc->bp", z @ self.prec, z)
        return np.sqrt(np.maximum(d2, 0)).max(1)


def stage_maps(net, x):
    """Feature maps: the input, the stem and every residual block (eager, eval mode)."""
    h = net.stem(x)
    maps = [("input", x), ("stem", h)]
    for i, block in enumerate(net.stages):
        h = block(h)
        maps.append((f"s{i + 1}", h))
    pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
    return maps, pooled, net.head(pooled)


def extract(net, inputs, idx, pos, *, fit: bool, batch=128):
    """Per split: pooled features, logits, per-stage global statistics, local max scores.

    ``pos`` maps stage names to :class:`PositionGaussian`; with ``fit`` their sums are
    accumulated (training frames), otherwise each frame's largest local distance is kept.
    """
    out = {"pooled": [], "logits": []}
    with torch.inference_mode():
        for a in range(0, len(idx), batch):
            x = torch.from_numpy(np.asarray(inputs[idx[a:a + batch]], np.float32))
            maps, pooled, logits = stage_maps(net, x)
            out["pooled"].append(pooled.numpy())
            out["logits"].append(logits.numpy())
            for name, m in maps:
                mn = m.numpy()
                g = np.concatenate([mn.mean((2, 3)), mn.max((2, 3)), mn.std((2, 3))], 1)
                out.setdefault("glob_" + name, []).append(g)
                if fit:
                    pos.setdefault(name, PositionGaussian(mn.shape[1])).add(mn)
                else:
                    out.setdefault("local_" + name, []).append(pos[name].max_score(mn))
    return {k: np.concatenate(v) for k, v in out.items()}


def energy(logits):
    return -np.logaddexp(0, logits).sum(1)  # negative joint energy: higher, more novel


def knn_dist(bank, x, k):
    bn = bank / np.linalg.norm(bank, axis=1, keepdims=True).clip(1e-12)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    sims = []
    for a in range(0, len(xn), 512):
        s = xn[a:a + 512] @ bn.T
        sims.append(-np.sort(s, axis=1)[:, -k])
    return np.concatenate(sims)


def kmeans(x, k, iters=25, seed=0):
    rng = np.random.default_rng(seed)
    c = x[rng.choice(len(x), k, replace=False)]
    for _ in range(iters):
        d = ((x[:, None, :] - c[None]) ** 2).sum(-1)
        a = d.argmin(1)
        c = np.stack([x[a == j].mean(0) if (a == j).any() else c[j] for j in range(k)])
    return c, a


class NearestMean:
    """Tied-covariance distance to the nearest of several means (class-conditional Gaussian)."""

    def __init__(self, x, assign_sets):
        x = np.asarray(x, np.float64)
        self.sd = x.std(0) + 1e-6
        z = x / self.sd
        self.means = np.stack([z[s].mean(0) for s in assign_sets])
        resid = np.concatenate([z[s] - z[s].mean(0) for s in assign_sets])
        cov = resid.T @ resid / len(resid)
        cov = 0.95 * cov + 0.05 * np.eye(len(cov)) * np.trace(cov) / len(cov)
        self.prec = np.linalg.inv(cov)

    def __call__(self, x):
        z = np.asarray(x, np.float64) / self.sd
        best = np.full(len(z), np.inf)
        for m in self.means:
            d = z - m
            best = np.minimum(best, np.einsum("nf,nf->n", d @ self.prec, d))
        return np.sqrt(np.maximum(best, 0))


def scores_for(fam, net, inputs, labels, args):
    splits = split_indices(labels, fam)
    cols = [i for i, t in enumerate(TAG_NAMES) if t in FAMILIES[fam]]
    seen = [i for i in range(len(TAG_NAMES)) if i not in cols]
    t0 = time.perf_counter()
    pos = {}
    feats = {"train": extract(net, inputs, splits["train"], pos, fit=True)}
    for g in pos.values():
        g.finish()
    for name in ("val", "test_in", "test_out"):
        feats[name] = extract(net, inputs, splits[name], pos, fit=False)
    extract_s = time.perf_counter() - t0

    tr = feats["train"]
    fns = {}
    gp = Gaussian(tr["pooled"])
    fns["maha_pooled"] = lambda f: gp(f["pooled"])
    for k in (1, 10, 50):
        fns[f"knn{k}_pooled"] = lambda f, k=k: knn_dist(tr["pooled"], f["pooled"], k)
    zsd = tr["pooled"].std(0) + 1e-6
    fns["knn10_pooled_std"] = lambda f: knn_dist(tr["pooled"] / zsd, f["pooled"] / zsd, 10)
    fns["knn10_logits"] = lambda f: knn_dist(tr["logits"][:, seen], f["logits"][:, seen], 10)
    _, assign = kmeans(tr["pooled"] / zsd, 16)
    cm = NearestMean(tr["pooled"], [assign == j for j in range(16) if (assign == j).sum() > 5])
    fns["cluster_pooled"] = lambda f: cm(f["pooled"])
    ytr = labels[splits["train"]]
    sets = [ytr[:, j] > 0.5 for j in seen if (ytr[:, j] > 0.5).sum() > 20]
    tm = NearestMean(tr["pooled"], sets)
    fns["tag_pooled"] = lambda f: tm(f["pooled"])
    stages = [k[5:] for k in tr if k.startswith("glob_")]
    for s in stages:
        g = Gaussian(tr["glob_" + s])
        sd = tr["glob_" + s].std(0) + 1e-6
        fns[f"maha_{s}"] = lambda f, g=g, s=s: g(f["glob_" + s])
        fns[f"knn10_{s}"] = lambda f, s=s, sd=sd: knn_dist(tr["glob_" + s] / sd,
                                                          f["glob_" + s] / sd, 10)
        fns[f"local_{s}"] = lambda f, s=s: f["local_" + s]
    fns["energy"] = lambda f: energy(f["logits"][:, seen])
    fns["lownorm_pooled"] = lambda f: -np.log(np.linalg.norm(f["pooled"], axis=1))

    raw = {name: {k: fn(feats[k]) for k in ("val", "test_in", "test_out")}
           for name, fn in fns.items()}

    def zs(name):
        v = raw[name]["val"]
        mu, sd = np.median(v), v.std() + 1e-9
        return {k: (raw[name][k] - mu) / sd for k in raw[name]}

    def combo(names):
        parts = [zs(n) for n in names]
        return {k: sum(p[k] for p in parts) for k in parts[0]}

    combos = {
        "multi": [f"maha_{s}" for s in stages],
        "multi_net": [f"maha_{s}" for s in stages if s != "input"],
        "local_multi": [f"local_{s}" for s in stages],
        "multi+local": [f"maha_{s}" for s in stages] + [f"local_{s}" for s in stages],
        "knn10_multi": [f"knn10_{s}" for s in stages],
        "energy+maha_pooled": ["energy", "maha_pooled"],
        "energy+knn10_pooled": ["energy", "knn10_pooled"],
        "energy+multi": ["energy"] + [f"maha_{s}" for s in stages],
        "energy+multi+local": ["energy"] + [f"maha_{s}" for s in stages]
        + [f"local_{s}" for s in stages],
    }
    for name, parts in combos.items():
        raw[name] = combo(parts)
    # the shipped score (bluesky_xsml.novelty, kind "knn") over the whole training set
    knn, low = zs("knn1_pooled"), zs("lownorm_pooled")
    raw["knn1+2relu(lownorm)"] = {k: knn[k] + 2.0 * np.maximum(low[k], 0) for k in knn}

    if args.keep:
        np.savez(Path(args.models) / f"{fam}-scores.npz",
                 **{f"{name}|{k}": v for name, d in raw.items() for k, v in d.items()},
                 **{f"feat|{split}|{k}": v for split, d in feats.items() for k, v in d.items()})
    from bluesky_xsml.training.metrics import evaluate_scores

    p_in = 1 / (1 + np.exp(-feats["test_in"]["logits"][:, seen]))
    m_ap = evaluate_scores(labels[splits["test_in"]][:, seen], p_in,
                           [TAG_NAMES[i] for i in seen]).mean_ap
    result = {"family": fam, "held_in_mAP_of_trained_tags": round(float(m_ap), 4),
              "n_train": int(len(splits["train"])),
              "tags_per_frame_in": round(float((labels[splits["test_in"]] > 0.5).sum(1).mean()), 2),
              "tags_per_frame_out": round(float((labels[splits["test_out"]] > 0.5).sum(1).mean()),
                                          2),
              "n_val": int(len(splits["val"])), "n_in": int(len(splits["test_in"])),
              "n_out": int(len(splits["test_out"])), "extract_seconds": round(extract_s, 1),
              "auroc": {}, "flagged_out_at_1pct": {}}
    for name, v in raw.items():
        thr = np.quantile(v["val"], 0.99)
        result["auroc"][name] = round(auroc(v["test_in"], v["test_out"]), 4)
        result["flagged_out_at_1pct"][name] = round(float((v["test_out"] > thr).mean()), 4)
        result.setdefault("flagged_in_at_1pct", {})[name] = round(
            float((v["test_in"] > thr).mean()), 4)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dev-family", default="halo",
                   help="the family the shipped score is chosen on (not reported as a result)")
    # the data and tagger options of novelty_lofo.py's reduced run (to find its cache and
    # networks; a network is trained with them when absent)
    add_options(p)
    p.set_defaults(**REDUCED, families="halo,peaks,grazing,rings")
    p.add_argument("--keep", action="store_true",
                   help="also save every split's features and scores to --models")
    args = p.parse_args(argv)

    global torch, TAG_NAMES, auroc
    import torch

    from bluesky_xsml.model import TaggerNet, TaggerNetConfig
    from bluesky_xsml.novelty import auroc
    from bluesky_xsml.tags import TAG_NAMES

    torch.set_num_threads(args.threads)
    cache = Path(args.cache or f"/tmp/xsml-lofo-{args.data_seed}-{args.n}-{args.size}-"
                               f"{args.input_size}.npz")
    inputs, labels = make_data(args.n, args.size, args.input_size, args.data_seed, cache)
    models = Path(args.models)
    models.mkdir(parents=True, exist_ok=True)
    results = []
    for fam in [f.strip() for f in args.families.split(",") if f.strip()]:
        path = models / f"{fam}-{args.n}-{args.epochs}-{args.input_size}.pt"
        if path.exists():
            saved = torch.load(path, weights_only=True)
            net = TaggerNet(TaggerNetConfig.from_dict(saved["config"]))
            net.load_state_dict(saved["state"])
            net.eval()
            print(f"{fam}: reloaded {path}", flush=True)
        else:
            splits = split_indices(labels, fam)
            cols = [TAG_NAMES.index(t) for t in FAMILIES[fam]]
            y = labels[splits["train"]].astype(np.float32).copy()
            y[:, cols] = np.nan
            print(f"{fam}: training on {len(y)} frames", flush=True)
            net = train(inputs[splits["train"]], y, args, seed=args.seed)
            torch.save({"config": net.config.to_dict(), "state": net.state_dict()}, path)
        res = scores_for(fam, net, inputs, labels, args)
        res["dev"] = fam == args.dev_family
        print(json.dumps(res), flush=True)
        results.append(res)
    dev = [r for r in results if r["dev"]]
    summary = {"options": {k: (list(v) if isinstance(v, tuple) else v)
                           for k, v in vars(args).items()}, "results": results}
    if dev:
        best = max(dev[0]["auroc"], key=dev[0]["auroc"].get)
        summary["chosen_on_dev_family"] = {
            "score": best, "auroc": {r["family"]: r["auroc"][best] for r in results}}
    # nested choice: for each family, the score with the best mean AUROC on the *other*
    # families, reported on this one (no family's own frames choose its score)
    nested = {}
    for r in results:
        others = [o for o in results if o is not r]
        if others:
            pick = max(r["auroc"], key=lambda n: np.mean([o["auroc"][n] for o in others]))
            nested[r["family"]] = {"score": pick, "auroc": r["auroc"][pick]}
    summary["chosen_on_other_families"] = nested
    names = list(results[0]["auroc"])
    print("score".ljust(22), " ".join(r["family"][:8].rjust(8) for r in results))
    for n in names:
        print(n.ljust(22), " ".join(f"{r['auroc'][n]:8.3f}" for r in results))
    print(json.dumps({k: summary[k] for k in summary if k.startswith("chosen")}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
