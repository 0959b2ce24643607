"""Offline comparison of novelty scores on kept features (no network calls).

Reads the features and probabilities kept by ``experiments/novelty_ood.py --save OOD.npz``
and the 10,000-frame cache of ``experiments/novelty_retrieval.py --cache BANK.npz`` (used as
the in-distribution bank for nearest-neighbour distances), and prints the AUROC of each
score against the "in" frames, per condition::

    python experiments/novelty_ood.py --n 150 --save /tmp/ood.npz
    python experiments/novelty_retrieval.py --cache /tmp/retrieval.npz
    python experiments/novelty_scores.py --ood /tmp/ood.npz --bank /tmp/retrieval.npz

Scores: the shipped score (kNN with version 2 statistics); the version 1 Mahalanobis
distance; Mahalanobis with almost no shrinkage, on the
mean-pooled or max-pooled half, or on log features (fitted on the bank); the cosine
distance to the 1st and 10th nearest bank frame; the negative joint energy; mean
closeness of the probabilities to 0.5; the feature norm (low and high).
"""

from __future__ import annotations

import argparse

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ood", required=True)
    p.add_argument("--bank", required=True)
    args = p.parse_args(argv)

    from bluesky_xsml import Tagger
    from bluesky_xsml.novelty import NoveltyModel, auroc, energy_novelty

    nov = Tagger.load(precision="fp32").novelty
    z, r = np.load(args.ood), np.load(args.bank)
    bank = r["features"]
    f_in, p_in = z["in_features"], z["in_probs"]
    conds = []
    k = 0
    while f"c{k}_features" in z.files:
        conds.append((str(z[f"c{k}_name"])[:24], z[f"c{k}_features"], z[f"c{k}_probs"]))
        k += 1
    bankn = bank / np.linalg.norm(bank, axis=1, keepdims=True)

    def knn(f, kth):
        fn = f / np.linalg.norm(f, axis=1, keepdims=True)
        return -np.sort(fn @ bankn.T, axis=1)[:, -kth]

    h = bank.shape[1] // 2
    m_low = NoveltyModel.fit(bank, embedding_dim=8, shrinkage=0.001, score="mahalanobis")
    m_mean = NoveltyModel.fit(bank[:, :h], embedding_dim=8, score="mahalanobis")
    m_max = NoveltyModel.fit(bank[:, h:], embedding_dim=8, score="mahalanobis")
    m_log = NoveltyModel.fit(np.log1p(np.maximum(bank, 0)), embedding_dim=8,
                             score="mahalanobis")
    scores = {
        "shipped": lambda f, q: nov.score(f),
        "mahalanobis": lambda f, q: nov.mahalanobis(f),
        "maha_lowshrink": lambda f, q: m_low.score(f),
        "maha_meanhalf": lambda f, q: m_mean.score(f[:, :h]),
        "maha_maxhalf": lambda f, q: m_max.score(f[:, h:]),
        "maha_log": lambda f, q: m_log.score(np.log1p(np.maximum(f, 0))),
        "knn10": lambda f, q: knn(f, 10),
        "knn1": lambda f, q: knn(f, 1),
        "energy": lambda f, q: energy_novelty(q),
        "uncertain": lambda f, q: -np.abs(q - 0.5).mean(1),
        "low_norm": lambda f, q: -np.linalg.norm(f, axis=1),
        "high_norm": lambda f, q: np.linalg.norm(f, axis=1),
    }
    print("condition".ljust(26), " ".join(s[:10].rjust(10) for s in scores))
    for name, f, q in conds:
        print(name.ljust(26), " ".join(f"{auroc(s(f_in, p_in), s(f, q)):10.3f}"
                                       for s in scores.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
