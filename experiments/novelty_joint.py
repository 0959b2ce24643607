"""Leave one family out with an auxiliary objective trained together with the tagger.

A classifier's pooled features keep what separates its tags and drop the rest, so content
no tag describes (a held-out family) may leave them nearly unchanged (docs/novelty.md).
This script trains ``experiments/novelty_lofo.py``'s networks on the same frames and
splits with one change: the loss gains ``lambda x`` a self-supervised term on the pooled
features that rewards keeping information beyond the tags, then scores the held-out family
with the same statistics (:func:`novelty_lofo.run_family`: the shipped kNN + low-norm
score, its parts, Mahalanobis, ...). Two auxiliary objectives:

* ``contrastive`` (SimCLR's NT-Xent, Chen et al. 2020): two views of every frame of the
  batch, each the loader's augmented input with a horizontal flip (probability 0.5), a
  count scale ``exp(U(-0.35, 0.35))``, Poisson-like count noise (standard deviation
  ``sqrt(c / m)`` on a block's mean count ``c``, ``m`` = ``--noise-pixels``) and a shift
  of up to ``--shift`` input pixels (what leaves the frame is replaced by "outside the
  detector"); never a vertical flip (gravity and the grazing-incidence geometry have a
  direction). Both views go through the network in one batch; the tags' BCE is taken on
  both, NT-Xent (temperature ``--tau``) on a projection head (two linear layers, 64
  outputs) of their pooled features. Every frame must be told apart from the other
  frames of the batch by its pooled features, whatever its tags: features that keep each
  frame's own content.
* ``recon``: a decoder from the pooled features (one linear layer to a 4 x 4 map, three
  transposed convolutions) to the input's three count channels averaged over 2 x 2
  pixels (32 x 32), each channel standardised with the training frames' mean and
  standard deviation; loss the mean squared error. The pooled vector must describe the
  whole frame, not only its tags. Besides the feature scores, the decoder's error on a
  frame is reported (``recon_error``) and added to the shipped score (``recon_error+knn``,
  standardised on the validation frames).

Rotation prediction (Hendrycks et al. 2019) was left out: most frames here are
rotationally symmetric about the beam (isotropic rings, halos, empty frames), so the
rotation of much of the data cannot be told and the task rewards only the anisotropic
families' orientation; it would also cost four passes per batch.

Nothing is chosen on a reported family. ``--a-priori`` (contrastive lambda 0.5,
reconstruction lambda 1) were fixed before any run and run on every family. Further
settings (``--dev-candidates``: the contrastive head with ``layout`` views, other lambdas)
are tried on the development family (``--dev-family``, halo, as for the shipped score),
and per objective the network and score (of ``--dev-scores``) with the best halo AUROC
among those within ``--map-tolerance`` of the plain network's mAP is chosen and then run
once on the other families. Every network is reported beside the plain-BCE one
(``novelty_lofo.py``'s, reloaded from ``--models`` when saved), with the trained tags'
mAP (an auxiliary loss must not wreck tagging) and two controls scored against the
held-out frames without the family, which should stay near AUROC 0.5: frames of the
held-out detector geometries (``--n-control``, seed ``--control-seed``, without the
family's tags) and, when its cache exists, renderer B's frames
(``experiments/novelty_recon.py``'s cache). Networks are saved in ``--models`` under
names that carry their settings, and reloaded on a rerun.

Result (docs/novelty.md): no objective moves peaks, grazing or rings by more than a few
hundredths (chosen on halo: contrastive + layout, lambda 0.1, kNN distance 0.55 / 0.74 /
0.59; reconstruction, lambda 0.3, error + shipped score 0.60 / 0.71 / 0.65; the plain
network's shipped score 0.59 / 0.72 / 0.66). The reduced run reported there (about 20
minutes on one thread when ``novelty_lofo.py``'s networks are saved)::

    OMP_NUM_THREADS=1 nice -n 10 python experiments/novelty_joint.py \\
        --families halo,peaks,grazing,rings --out joint.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

try:  # run as a script (python experiments/novelty_joint.py) or imported from the repo root
    from novelty_lofo import FAMILIES, REDUCED, add_options, make_data, run_family, split_indices
except ImportError:  # pragma: no cover
    from experiments.novelty_lofo import (
        FAMILIES,
        REDUCED,
        add_options,
        make_data,
        run_family,
        split_indices,
    )

METHODS = ("contrastive", "recon")
IMAGE = (0, 1, 2)  # the input channels that carry counts: log_mean, log_max, relative
#: fill of each input channel where a shifted frame has no data: no counts, "outside"
OUTSIDE_FILL = (0.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _relative(x):
    """Recompute the ``relative`` channel (``log_mean`` over its per-frame maximum)."""
    import torch

    peak = x[:, 0].amax(dim=(1, 2), keepdim=True)
    x[:, 2] = torch.where(peak > 0, x[:, 0] / peak.clamp(min=1e-12), torch.zeros_like(x[:, 0]))
    return x


def count_noise(x, generator, pixels: float = 16.0):
    """Poisson-like noise on the block means of ``x`` ``(B, 6, S, S)`` (a new tensor).

    A block's mean count ``c`` gets ``N(0, c / pixels)`` added (clipped at 0), as if it were
    the mean of ``pixels`` Poisson pixels; ``log_max`` is kept at least ``log_mean``.
    """
    import torch

    from bluesky_xsml.preprocess import LOG_SCALE

    x = x.clone()
    c = torch.expm1(x[:, 0] * LOG_SCALE)
    c = (c + torch.sqrt(c.clamp(min=0) / pixels)
         * torch.randn(c.shape, generator=generator)).clamp(min=0)
    x[:, 0] = torch.log1p(c) / LOG_SCALE
    x[:, 1] = torch.maximum(x[:, 1], x[:, 0])
    return _relative(x)


def shift_frames(x, generator, max_shift: int):
    """Each frame of ``x`` moved by up to ``max_shift`` pixels in each direction.

    What comes in from beyond the edge is "outside the detector" (:data:`OUTSIDE_FILL`).
    """
    import torch
    import torch.nn.functional as F

    if max_shift <= 0:
        return x.clone()
    b, c, s, _ = x.shape
    m = max_shift
    pad = F.pad(x, (m, m, m, m))
    fill = torch.tensor(OUTSIDE_FILL[:c], dtype=x.dtype).view(1, c, 1, 1)
    inside = F.pad(torch.ones(1, 1, s, s, dtype=x.dtype), (m, m, m, m))
    pad = pad * inside + fill * (1 - inside)
    d = torch.randint(0, 2 * m + 1, (b, 2), generator=generator)
    return torch.stack([pad[i, :, d[i, 0]:d[i, 0] + s, d[i, 1]:d[i, 1] + s]
                        for i in range(b)])


def detector_layout(x, generator, *, stripes: int = 3, max_border: float = 0.125):
    """Another detector layout on the frames of ``x`` (changed in place, and returned).

    Each frame gets, with probability 0.5, 1 to ``stripes`` one-pixel lines across the
    frame (rows or columns, like the gaps between detector modules) marked invalid with
    their counts removed, and, with probability 0.5, a band of up to ``max_border`` of the
    side along one edge moved outside the detector (a smaller or offset detector). What
    the frame shows elsewhere is untouched.
    """
    import torch

    b, _, s, _ = x.shape
    u = torch.rand(b, 6, generator=generator)
    pos = torch.randint(0, s, (b, stripes), generator=generator)
    for i in range(b):
        if u[i, 0] < 0.5:
            k = 1 + int(u[i, 1] * stripes)
            for j in pos[i, :k].tolist():
                rows = (slice(None), j) if u[i, 2] < 0.5 else (j, slice(None))
                x[i, :3][(slice(None), *rows)] = 0
                x[i, 3][rows] = 1
        if u[i, 3] < 0.5:
            w = 1 + int(u[i, 4] * max_border * s)
            side = int(u[i, 5] * 4)
            band = [(slice(0, w), slice(None)), (slice(s - w, s), slice(None)),
                    (slice(None), slice(0, w)), (slice(None), slice(s - w, s))][side]
            x[i, :4][(slice(None), *band)] = 0
            x[i, 4][band] = 1
            x[i, 5][band] = 0
    return _relative(x)


def physics_view(x, generator, *, max_shift: int = 3, noise_pixels: float = 16.0,
                 layout: bool = False):
    """One augmented view of the batch ``x`` (untouched): the training recipe's horizontal
    flip and count scale, then :func:`count_noise`, :func:`shift_frames` and, with
    ``layout``, :func:`detector_layout`."""
    from bluesky_xsml.training.recipe import augment

    v = augment(x.clone(), generator=generator)
    v = shift_frames(count_noise(v, generator, noise_pixels), generator, max_shift)
    return detector_layout(v, generator) if layout else v


def nt_xent(z1, z2, tau: float):
    """SimCLR's NT-Xent loss of two views ``(B, D)``: each row's positive is the same row of
    the other view, its negatives the other ``2B - 2`` rows."""
    import torch
    import torch.nn.functional as F

    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.T / tau
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def make_projection(features: int, out: int = 64):
    """SimCLR's projection head: ``features -> features -> out``."""
    from torch import nn

    return nn.Sequential(nn.Linear(features, features), nn.ReLU(inplace=True),
                         nn.Linear(features, out))


def make_decoder(features: int, side: int, mean, std):
    """A decoder from pooled features to the standardised count channels at ``side / 2``.

    ``mean`` and ``std`` (3 values) standardise the target; they travel as buffers, so the
    decoder saved with a network scores as it was trained.
    """
    import torch
    from torch import nn

    class _Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.out_side = side // 2
            start = self.out_side // 8
            if start < 1 or start * 8 != self.out_side:
                raise ValueError(f"input side {side} must be a multiple of 16")
            self.start = start
            self.fc = nn.Linear(features, 64 * start * start)
            self.up = nn.Sequential(
                nn.ReLU(inplace=True),
                nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ReLU(inplace=True),
                nn.ConvTranspose2d(32, 16, 4, 2, 1), nn.ReLU(inplace=True),
                nn.ConvTranspose2d(16, len(IMAGE), 4, 2, 1))
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32)
                                 .view(1, -1, 1, 1))
            self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32)
                                 .view(1, -1, 1, 1))

        def forward(self, pooled):
            h = self.fc(pooled).view(-1, 64, self.start, self.start)
            return self.up(h)

        def target(self, x):
            t = torch.nn.functional.avg_pool2d(x[:, list(IMAGE)], 2)
            return (t - self.mean) / self.std

        def error(self, pooled, x):
            """Per-frame mean squared error ``(B,)``."""
            return ((self(pooled) - self.target(x)) ** 2).mean(dim=(1, 2, 3))

    return _Decoder()


def joint_loss_fn(method: str, aux, *, lam: float, seed: int, tau: float = 0.2,
                  max_shift: int = 3, noise_pixels: float = 16.0, layout: bool = False):
    """A ``loss_fn`` for :func:`novelty_lofo.train`: the tags' masked BCE plus ``lam`` x the
    auxiliary term of ``method`` computed with ``aux`` (the projection head or decoder)."""
    import torch

    from bluesky_xsml.model import masked_bce_loss

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    gen = torch.Generator().manual_seed(seed + 7919)

    def loss_fn(net, x, y):
        if method == "contrastive":
            b = x.shape[0]
            kw = {"max_shift": max_shift, "noise_pixels": noise_pixels, "layout": layout}
            v = torch.cat([physics_view(x, gen, **kw), physics_view(x, gen, **kw)])
            logits, pooled = net.logits_and_features(v)
            bce = masked_bce_loss(logits, torch.cat([y, y]), net.pos_weight)
            z = aux(pooled)
            return bce + lam * nt_xent(z[:b], z[b:], tau)
        logits, pooled = net.logits_and_features(x)
        bce = masked_bce_loss(logits, y, net.pos_weight)
        return bce + lam * aux.error(pooled, x).mean()

    return loss_fn


def recon_scores(aux):
    """``extra_scores`` for :func:`novelty_lofo.run_family`: the decoder's error per frame."""

    def scores(net, x):
        return {"recon_error": aux.error(net.features(x), x).numpy()}

    return scores


def parse_candidate(spec: str) -> tuple[str, float, bool]:
    """``METHOD:LAMBDA[:layout]`` -> ``(method, lam, layout)``; ``layout`` only with
    ``contrastive`` (views on other detector layouts, :func:`detector_layout`)."""
    parts = spec.strip().split(":")
    if (len(parts) not in (2, 3) or parts[0] not in METHODS
            or (len(parts) == 3 and (parts[2] != "layout" or parts[0] != "contrastive"))):
        raise ValueError(f"bad candidate {spec!r}: METHOD:LAMBDA[:layout], METHOD of "
                         f"{', '.join(METHODS)}; layout only with contrastive")
    return parts[0], float(parts[1]), len(parts) == 3


def variant_name(method: str, lam: float, layout: bool, args) -> str:
    """The suffix of the saved network's file name (carries every setting)."""
    if method == "contrastive":
        return (f"-joint-contrastive-l{lam:g}-t{args.tau:g}-s{args.shift}"
                f"-p{args.noise_pixels:g}" + ("-layout" if layout else ""))
    return f"-joint-recon-l{lam:g}"


def run(family: str, candidate, inputs, labels, controls, args) -> dict:
    """One network: ``candidate`` ``None`` (the plain network) or ``(method, lam, layout)``."""
    import torch

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)  # the heads' initial weights; train() reseeds the network
    width = 2 * args.widths[-1]
    aux = loss_fn = extra = None
    method, lam, layout = candidate or ("bce", 0.0, False)
    if method == "contrastive":
        aux = make_projection(width)
        loss_fn = joint_loss_fn(method, aux, lam=lam, seed=args.seed, tau=args.tau,
                                max_shift=args.shift, noise_pixels=args.noise_pixels,
                                layout=layout)
    elif method == "recon":
        train_idx = split_indices(labels, family)["train"]
        sample = np.asarray(inputs[train_idx[:2000]], np.float32)[:, list(IMAGE)]
        pooled = sample.reshape(len(sample), len(IMAGE), sample.shape[-1] // 2, 2, -1, 2)
        pooled = pooled.mean(axis=(3, 5))
        aux = make_decoder(width, inputs.shape[-1], pooled.mean(axis=(0, 2, 3)),
                           pooled.std(axis=(0, 2, 3)) + 1e-6)
        loss_fn = joint_loss_fn(method, aux, lam=lam, seed=args.seed)
        extra = recon_scores(aux)
    name = "" if candidate is None else variant_name(method, lam, layout, args)
    res = run_family(family, inputs, labels, args, variant=name, loss_fn=loss_fn, aux=aux,
                     extra_scores=extra, controls=controls)
    res.update(method=method, lam=lam, layout=layout, variant=name,
               seconds=round(time.perf_counter() - t0, 1))
    return res


def choose(dev: list[dict], scores: tuple[str, ...], tolerance: float) -> dict:
    """Per method, the (network, score) with the best AUROC on the development family among
    the networks whose trained tags' mAP is within ``tolerance`` of the plain network's."""
    base = next(r for r in dev if r["method"] == "bce")
    floor = base["held_in_mAP_of_trained_tags"] - tolerance
    chosen = {}
    for method in METHODS:
        pairs = [(r["auroc"][k], r["variant"], k, r) for r in dev if r["method"] == method
                 and r["held_in_mAP_of_trained_tags"] >= floor for k in scores
                 if k in r["auroc"]]
        if pairs:
            best = max(pairs, key=lambda t: t[0])
            chosen[method] = {"candidate": [best[3]["method"], best[3]["lam"],
                                            best[3]["layout"]],
                              "variant": best[1], "score": best[2], "dev_auroc": best[0]}
    return chosen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_options(p)
    p.set_defaults(**REDUCED, families="halo,peaks,grazing,rings")
    p.add_argument("--a-priori", default="contrastive:0.5,recon:1",
                   help="candidates METHOD:LAMBDA[:layout] run on every family (fixed before "
                        f"any run); METHOD of {', '.join(METHODS)}")
    p.add_argument("--dev-family", default="halo",
                   help="the family further candidates are chosen on (when in --families)")
    p.add_argument("--dev-candidates", default="contrastive:0.1:layout,contrastive:0.5:layout,"
                   "contrastive:0.1,recon:0.3,recon:3",
                   help="candidates tried on the development family besides --a-priori")
    p.add_argument("--dev-scores", default="knn,knn_distance_only,mahalanobis,recon_error+knn",
                   help="the scores a choice on the development family may pick")
    p.add_argument("--map-tolerance", type=float, default=0.03,
                   help="a chosen network's trained-tag mAP may be this much below the "
                        "plain network's on the development family")
    p.add_argument("--tau", type=float, default=0.2, help="NT-Xent temperature")
    p.add_argument("--shift", type=int, default=3, help="largest shift of a view, input pixels")
    p.add_argument("--noise-pixels", type=float, default=16.0,
                   help="detector pixels a block's Poisson-like noise is averaged over")
    p.add_argument("--n-control", type=int, default=400,
                   help="frames of the held-out detectors (0: no such control)")
    p.add_argument("--control-seed", type=int, default=3)
    p.add_argument("--b-cache", default=None,
                   help="renderer B frames (novelty_recon.py's cache); used when present")
    args = p.parse_args(argv)
    try:
        a_priori = [parse_candidate(c) for c in args.a_priori.split(",") if c.strip()]
        dev_candidates = [parse_candidate(c) for c in args.dev_candidates.split(",")
                          if c.strip()]
    except ValueError as err:
        p.error(str(err))
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    if set(families) - set(FAMILIES):
        p.error(f"unknown families; known: {', '.join(FAMILIES)}")
    if args.input_size % 16:
        p.error("--input-size must be a multiple of 16 (the decoder)")

    import torch

    torch.set_num_threads(args.threads)
    cache = Path(args.cache or f"/tmp/xsml-lofo-{args.data_seed}-{args.n}-{args.size}-"
                               f"{args.input_size}.npz")
    inputs, labels = make_data(args.n, args.size, args.input_size, args.data_seed, cache)
    controls = {}
    if args.n_control:
        c_cache = Path(f"/tmp/xsml-lofo-heldout-{args.control_seed}-{args.n_control}-"
                       f"{args.size}-{args.input_size}.npz")
        controls["heldout_detectors"] = make_data(args.n_control, args.size, args.input_size,
                                                  args.control_seed, c_cache,
                                                  detectors="heldout")
    b_cache = Path(args.b_cache or f"/tmp/xsml-render-b-100-400-{args.input_size}.npz")
    if b_cache.exists():
        with np.load(b_cache, allow_pickle=False) as z:
            controls["renderer_b"] = (z["inputs"], z["labels"])
    results: list[dict] = []
    chosen: dict = {}

    def do(fam, todo, dev):
        for c in todo:
            r = run(fam, c, inputs, labels, controls, args)
            r["dev"] = dev
            results.append(r)
            if args.out:  # keep what is done so far
                Path(args.out).write_text(json.dumps({"results": results}, indent=1))

    if args.dev_family in families:
        do(args.dev_family, [None, *a_priori, *[c for c in dev_candidates if c not in a_priori]],
           True)
        scores = tuple(k.strip() for k in args.dev_scores.split(",") if k.strip())
        chosen = choose([r for r in results if r["dev"]], scores, args.map_tolerance)
        print(f"chosen on {args.dev_family}: {json.dumps(chosen)}", flush=True)
    for fam in families:
        if fam != args.dev_family:
            more = [tuple(v["candidate"]) for v in chosen.values()]
            do(fam, [None, *a_priori, *[c for c in more if c not in a_priori]], False)
    print("family  network                                    mAP    knn    dist   lownorm "
          "maha   recon+knn flagged | heldout-det knn (flagged)  renderer-B knn (flagged)")
    for r in results:
        a = r["auroc"]
        extra = a.get("recon_error+knn", float("nan"))
        print(f"{r['family']:7s} {r['method'] + r['variant']:42s} "
              f"{r['held_in_mAP_of_trained_tags']:.3f}  {a['knn']:.3f}  "
              f"{a['knn_distance_only']:.3f}  {a['low_norm_only']:.3f}   "
              f"{a['mahalanobis']:.3f}  {extra:.3f}     {r['flagged_out']:.3f}   | "
              + "  ".join(f"{v['auroc']['knn']:.3f} ({v['flagged']:.3f})"
                          for v in r.get("control", {}).values()))
    summary = {"reduced": True, "chosen_on_dev_family": chosen,
               "options": {k: (list(v) if isinstance(v, tuple) else v)
                           for k, v in vars(args).items()},
               "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
