"""Leave-one-family-out: does the novelty score flag a tag family the model never saw?

For each family (``--families``), a tagger is trained from scratch on synthetic frames
that carry none of the family's tags (the family's label columns are unknown, not
"absent", so nothing teaches the network about them), its novelty statistics are fitted
on those training frames, the ``novel`` threshold is set on held-out frames without the
family (1% false positives), and the script reports how well each score separates
held-out frames *of* the family from held-out frames without it (AUROC), and the share
of family frames flagged novel at the threshold. Scores compared: the score the
tagger ships (``knn``: nearest-reference-frame distance plus the low-feature-norm term,
:mod:`bluesky_xsml.novelty`), its distance part alone (``knn_distance_only``), the
version 1 Mahalanobis distance (``mahalanobis``), the residual outside the 64 principal
directions (``pca_residual``) and the negative joint energy of the logits (``energy``,
needs no statistics).

One command per run; the defaults are the default model's shape on the default model's
input size, which takes hours on a CPU. A reduced run (what docs/novelty.md reports,
labelled as such)::

    OMP_NUM_THREADS=1 python experiments/novelty_lofo.py --families peaks,grazing,rings \\
        --n 10000 --epochs 8 --input-size 64 --widths 16,32,64,96 --depths 1,1,1,1 \\
        --stem-width 16 --threads 1 --models /tmp/xsml-lofo-models

The rendered frames are cached in ``--cache`` (preprocessed inputs and labels), shared
by the families of one invocation and by reruns with the same data options.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

FAMILIES = {
    "peaks": ("peaks_isolated", "peaks_lattice", "peaks_on_ring"),
    "grazing": ("horizon", "yoneda", "specular_rod", "bragg_rods"),
    "rings": ("ring_isotropic", "ring_oriented", "ring_textured", "many_rings",
              "higher_orders"),
    "halo": ("halo_isotropic", "halo_anisotropic"),
}


def _ints(text):
    return tuple(int(v) for v in str(text).split(",") if v.strip())


def make_data(n: int, size: int, input_size: int, seed: int, cache: Path,
              detectors: str = "train"):
    """``n`` generator frames (``detectors`` as :class:`SceneGenerator` takes them),
    preprocessed to ``input_size``; cached in ``cache`` (reloaded when it exists)."""
    from bluesky_xsml.preprocess import PreprocessConfig, preprocess_batch
    from bluesky_xsml.sim.generator import SceneGenerator

    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            return z["inputs"], z["labels"]
    gen = SceneGenerator(seed=seed, size=size, detectors=detectors)
    cfg = PreprocessConfig(size=input_size)
    xs, ys = [], []
    t0 = time.perf_counter()
    for a in range(0, n, 64):
        frames, lab, _ = gen.batch(min(64, n - a))
        x, ok, _errors = preprocess_batch(frames, cfg)
        xs.append(np.asarray(x, np.float16))
        ys.append(lab[ok])
        if (a // 64) % 10 == 0:
            print(f"rendered {a + len(frames)}/{n} ({time.perf_counter() - t0:.0f} s)", flush=True)
    inputs, labels = np.concatenate(xs), np.concatenate(ys)
    np.savez(cache, inputs=inputs, labels=labels)
    return inputs, labels


def split_indices(labels: np.ndarray, family: str) -> dict[str, np.ndarray]:
    """Row indices of one family's splits: ``train``, ``val``, ``test_in`` (no family tag),
    ``test_out`` (at least one of the family's tags; never used to fit anything)."""
    from bluesky_xsml.tags import TAG_NAMES

    cols = [TAG_NAMES.index(t) for t in FAMILIES[family]]
    has = (labels[:, cols] > 0.5).any(axis=1)
    rng = np.random.default_rng(0)
    idx_in = rng.permutation(np.flatnonzero(~has))
    idx_out = np.flatnonzero(has)
    n_test = min(len(idx_in) // 5, 600)
    return {"test_in": idx_in[:n_test], "val": idx_in[n_test:2 * n_test],
            "train": idx_in[2 * n_test:], "test_out": idx_out[:600]}


def train(inputs, labels, args, seed: int, loss_fn=None, aux=None):
    """Train a :class:`TaggerNet` on cached inputs with the training recipe's pieces.

    ``loss_fn(net, x, y)``, when given, returns the loss of one augmented batch in place
    of the network's own masked BCE (``experiments/novelty_outliers.py`` adds a term).
    ``aux``, an ``nn.Module`` the loss uses beside the network (an auxiliary head,
    ``experiments/novelty_joint.py``), is trained by the same optimizer.
    """
    import torch

    from bluesky_xsml.model import TaggerNet, TaggerNetConfig
    from bluesky_xsml.training.recipe import BatchLoader, augment, lr_at, pos_weights

    torch.manual_seed(seed)
    config = TaggerNetConfig(n_tags=labels.shape[1], in_channels=inputs.shape[1],
                             stem_width=args.stem_width, widths=args.widths, depths=args.depths)
    net = TaggerNet(config)
    known = np.where(np.isfinite(labels), labels, 0.0)
    net.pos_weight.copy_(torch.from_numpy(pos_weights(known)))
    params = list(net.parameters()) + ([] if aux is None else list(aux.parameters()))
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    loader = BatchLoader(inputs, labels, args.batch_size, seed=seed, augment_fn=augment)
    total = args.epochs * len(loader)
    step = 0
    for epoch in range(args.epochs):
        net.train()
        if aux is not None:
            aux.train()
        t0, run = time.perf_counter(), 0.0
        for x, y in loader.epoch(epoch):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total=total, warmup=len(loader) // 2, peak=args.lr)
            loss = net(x, y)[1] if loss_fn is None else loss_fn(net, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run += loss.item()
            step += 1
        print(f"  epoch {epoch + 1}/{args.epochs} loss {run / max(len(loader), 1):.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    if aux is not None:
        aux.eval()
    return net.eval()


def load_or_train(family: str, inputs, labels, args, *, variant: str = "", loss_fn=None,
                  aux=None):
    """Train a tagger network without ``family``, or reload the one saved in ``args.models``.

    Training is deterministic for given data and options (one thread), so a saved network
    is the one this run would train; ``experiments/novelty_layers.py`` saves to the same
    names. ``variant`` (appended to the file name), ``loss_fn`` and ``aux`` (see
    :func:`train`) are for networks trained differently (``experiments/novelty_outliers.py``,
    ``experiments/novelty_joint.py``); ``aux``'s weights are saved and reloaded with the
    network's.
    """
    import torch

    from bluesky_xsml.model import TaggerNet, TaggerNetConfig

    path = None
    if getattr(args, "models", None):
        Path(args.models).mkdir(parents=True, exist_ok=True)
        path = (Path(args.models)
                / f"{family}-{args.n}-{args.epochs}-{args.input_size}{variant}.pt")
        if path.exists():
            saved = torch.load(path, weights_only=True)
            net = TaggerNet(TaggerNetConfig.from_dict(saved["config"]))
            net.load_state_dict(saved["state"])
            if aux is not None:
                aux.load_state_dict(saved["aux"])
                aux.eval()
            print(f"{family}: reloaded {path}", flush=True)
            return net.eval()
    net = train(inputs, labels, args, seed=args.seed, loss_fn=loss_fn, aux=aux)
    if path is not None:
        saved = {"config": net.config.to_dict(), "state": net.state_dict()}
        if aux is not None:
            saved["aux"] = aux.state_dict()
        torch.save(saved, path)
    return net


def run_family(family: str, inputs, labels, args, *, variant: str = "", loss_fn=None,
               aux=None, extra_scores=None, controls=None) -> dict:
    """Train (or reload) without ``family``, fit the statistics, report AUROCs and mAP.

    ``variant``, ``loss_fn`` and ``aux`` go to :func:`load_or_train`. Two hooks for
    ``experiments/novelty_joint.py``, both optional:

    * ``extra_scores(net, x)``: per-frame scores of an eager batch ``x`` (float32 tensor),
      a dict of name to array, higher meaning more novel. Each is reported as
      ``auroc[name]`` and, added to the shipped score after standardising on the
      validation frames (``(s - median) / sd``, the shipped score's own units), as
      ``auroc[name + "+knn"]``.
    * ``controls``: a dict of name to ``(inputs, labels)``, frames rendered differently
      (other detectors, another renderer). Those without the family's tags are scored
      against the held-out frames without it: ``control[name]`` has their number, every
      score's AUROC and the share flagged novel (``knn``'s threshold). It should stay
      near 0.5 and 1%.
    """
    import torch

    from bluesky_xsml import Tagger
    from bluesky_xsml.novelty import NoveltyModel, auroc, energy_novelty
    from bluesky_xsml.preprocess import PreprocessConfig
    from bluesky_xsml.tags import TAG_NAMES
    from bluesky_xsml.training.metrics import evaluate_scores

    cols = [TAG_NAMES.index(t) for t in FAMILIES[family]]
    splits = split_indices(labels, family)
    train_in, val_in = splits["train"], splits["val"]
    test_in, test_out = splits["test_in"], splits["test_out"]
    y = labels[train_in].astype(np.float32).copy()
    y[:, cols] = np.nan  # the family is unknown to training, not taught as absent
    print(f"{family}: training on {len(train_in)} frames without {FAMILIES[family]}; "
          f"{len(test_in)} held-out frames without, {len(test_out)} with", flush=True)
    t0 = time.perf_counter()
    net = load_or_train(family, inputs[train_in], y, args, variant=variant, loss_fn=loss_fn,
                        aux=aux)
    train_s = time.perf_counter() - t0
    tagger = Tagger(net, TAG_NAMES, preprocess=PreprocessConfig(size=inputs.shape[-1]),
                    precision="fp32")

    def analyse(data, idx):
        probs, feats, extra = [], [], []
        for a in range(0, len(idx), 128):
            x = np.asarray(data[idx[a:a + 128]], np.float32)
            out = tagger.analyse_inputs(x, keep_features=True)
            probs.append(out.probs)
            feats.append(out.features)
            if extra_scores is not None:
                with torch.no_grad():
                    extra.append(extra_scores(net, torch.from_numpy(x)))
        more = {k: np.concatenate([e[k] for e in extra]) for k in (extra[0] if extra else {})}
        return np.concatenate(probs), np.concatenate(feats), more

    _, f_train, _ = analyse(inputs, train_in)
    _, f_val, e_val = analyse(inputs, val_in)
    p_in, f_in, e_in = analyse(inputs, test_in)
    p_out, f_out, e_out = analyse(inputs, test_out)
    model = NoveltyModel.fit(f_train, f_val, embedding_dim=64, fpr=0.01)  # the shipped score
    maha = NoveltyModel.fit(f_train, f_val, embedding_dim=64, fpr=0.01, score="mahalanobis")
    seen = [i for i in range(len(TAG_NAMES)) if i not in cols]
    metrics = evaluate_scores(labels[test_in][:, seen], p_in[:, seen],
                              [TAG_NAMES[i] for i in seen])
    units = {k: (float(np.median(v)), float(np.std(v)) or 1.0) for k, v in e_val.items()}

    def scores(p, f, e):
        out = {"knn": model.score(f), "knn_distance_only": model.knn_distance(f),
               "low_norm_only": -np.log(np.linalg.norm(f, axis=1)),
               "mahalanobis": maha.score(f), "pca_residual": model.residual(f),
               "energy": energy_novelty(p[:, seen])}
        for k, v in e.items():
            out[k] = v
            out[f"{k}+knn"] = out["knn"] + (v - units[k][0]) / units[k][1]
        return out

    s_in, s_out = scores(p_in, f_in, e_in), scores(p_out, f_out, e_out)
    result = {"family": family, "tags": list(FAMILIES[family]), "n_train": int(len(train_in)),
              "n_in": int(len(test_in)), "n_out": int(len(test_out)),
              "train_seconds": round(train_s, 1),
              "held_in_mAP_of_trained_tags": round(float(metrics.mean_ap), 4),
              "threshold": round(model.threshold, 3),
              "flagged_in": round(float(model.is_novel(model.score(f_in)).mean()), 4),
              "flagged_out": round(float(model.is_novel(model.score(f_out)).mean()), 4),
              "flagged_out_mahalanobis": round(float(maha.is_novel(maha.score(f_out)).mean()),
                                               4),
              "auroc": {k: round(auroc(s_in[k], s_out[k]), 4) for k in s_in}}
    for name, (c_inputs, c_labels) in (controls or {}).items():
        idx = np.flatnonzero(~(c_labels[:, cols] > 0.5).any(axis=1))
        p_c, f_c, e_c = analyse(c_inputs, idx)
        s_c = scores(p_c, f_c, e_c)
        result.setdefault("control", {})[name] = {
            "n": int(len(idx)),
            "flagged": round(float(model.is_novel(model.score(f_c)).mean()), 4),
            "auroc": {k: round(auroc(s_in[k], s_c[k]), 4) for k in s_in}}
    print(json.dumps(result), flush=True)
    return result


#: The reduced run's settings (docs/novelty.md): ``p.set_defaults(**REDUCED)`` after
#: :func:`add_options` in the scripts that reload its networks.
REDUCED = {"n": 10000, "input_size": 64, "widths": (16, 32, 64, 96), "depths": (1, 1, 1, 1),
           "stem_width": 16, "epochs": 8, "threads": 1, "models": "/tmp/xsml-lofo-models"}


def add_options(p: argparse.ArgumentParser) -> None:
    """The data, network and training options (shared with ``novelty_outliers.py``)."""
    p.add_argument("--families", default="peaks,grazing,rings",
                   help=f"comma separated, of {', '.join(FAMILIES)}")
    p.add_argument("--n", type=int, default=96000, help="frames rendered (all families share)")
    p.add_argument("--size", type=int, default=256, help="rendered frame side")
    p.add_argument("--input-size", type=int, default=128)
    p.add_argument("--widths", type=_ints, default=(32, 64, 128, 192))
    p.add_argument("--depths", type=_ints, default=(1, 1, 2, 1))
    p.add_argument("--stem-width", type=int, default=24)
    p.add_argument("--epochs", type=int, default=9)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache", default=None, help="npz of rendered inputs (default in /tmp)")
    p.add_argument("--out", default=None, help="also write the results (JSON) here")
    p.add_argument("--models", default=None,
                   help="save trained networks here, and reload them when present")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_options(p)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = set(families) - set(FAMILIES)
    if unknown:
        p.error(f"unknown families {sorted(unknown)}; known: {', '.join(FAMILIES)}")
    cache = Path(args.cache or f"/tmp/xsml-lofo-{args.data_seed}-{args.n}-{args.size}-"
                               f"{args.input_size}.npz")
    inputs, labels = make_data(args.n, args.size, args.input_size, args.data_seed, cache)
    results = [run_family(f, inputs, labels, args) for f in families]
    summary = {"reduced": args.n < 96000 or args.epochs < 9,
               "options": {k: (list(v) if isinstance(v, tuple) else v)
                           for k, v in vars(args).items()},
               "results": results}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
