"""Leave one family out: does a small autoencoder's reconstruction error flag an unseen family?

Frames of a tag family the tagger never saw are mostly familiar content plus something the
training frames never had (spots, rods, a horizon, rings). This script fits a small
convolutional autoencoder on the family-free training frames' preprocessed inputs (the
6-channel inputs ``experiments/novelty_lofo.py`` caches; nothing is re-rendered) and asks
whether its residual marks the unseen content. For each family (``--families``) it

* reloads the tagger ``novelty_lofo.py`` trained without the family (``--models``; trained
  with that script's options when absent) and computes the shipped novelty score
  (:class:`bluesky_xsml.novelty.NoveltyModel`, fitted on the training frames' features,
  standardised and thresholded on the validation frames, as ``novelty_lofo.py`` does);
* fits each network of ``--ae`` (see :func:`parse_ae`) on up to ``--n-fit`` of the same
  training frames and scores validation and test frames by its residual
  ``(x - AE(x))**2``: the mean (``mse``), per channel (``mse_<channel>``), over the three
  image channels (``mse_img``), each channel divided by its mean on validation frames
  (``mse_norm``), and the largest or 95% quantile of the channel-normalised residual
  averaged over the cells of a ``g x g`` grid (``grid<g>_max``, ``grid<g>_q95``, all
  channels or the image channels, ``_img``), so that a few unexplained spots count; and
  ``latent_knn``, the cosine distance of the network's bottleneck map to the nearest fit
  frame's. The networks: small convolutional autoencoders (``w8-l8-d3-p2``: width 8,
  8 bottleneck channels, 3 halvings, on the input averaged over 2 x 2 pixels; ``-fc32`` a
  dense 32-value bottleneck; ``-e3`` 3 epochs), masked predictors (``-m2``: half of the
  2 x 2-pixel blocks blanked, predicted from the others; scored in four passes that
  predict every block once), decoders of the input from the frozen tagger's own stage
  maps (``w16-t3-p2``: from the map after stage 3), and ``zero``, no
  network (the residual is the input itself squared, the "bottleneck" the input averaged
  over 8 x 8 pixels): what an input statistic gives without any reconstruction;
* adds each residual score, standardised on the validation frames (median, standard
  deviation), to the shipped score with weights ``--weights`` (``shipped+<w>*<score>``).

Settings are chosen on the development family (``--dev-family``, halo) only: the network
and the score (``zero`` excluded) with the best AUROC there. The other families are
reported with that choice fixed (and ``zero`` beside it). The cost of the chosen network
and of the best plain autoencoder (no mask, no tagger maps) is timed at the working side
they would have in the product, against the packaged default tagger's ``predict_inputs``
(``cost`` in the JSON).
The threshold of every score is its 99% quantile on the validation frames (no family), as
``novelty_lofo.py``. Two more columns per score:

* renderer B: ``--n-b`` frames of :mod:`bluesky_xsml.render_b` (seed ``--b-seed``),
  preprocessed to the same input size and cached in ``--b-cache``; those without the
  family's tags are frames of families the tagger was trained on, drawn by another
  renderer. Reported: the share flagged at the threshold (1% would mean "another renderer"
  is not novel in itself) and the AUROC of B frames against the generator's test frames
  without the family (0.5: the score does not tell the renderers apart);
* ``n_tags_pred`` (the sum of the trained tags' probabilities): held-out-family frames
  carry more tags than others, so a score that only measures how busy a frame is would
  gain from it; this baseline shows how far that alone goes.

The run reported in docs/novelty.md (its defaults: the networks and the cached frames of
``novelty_lofo.py``'s reduced run, every network above; about 12 minutes on one thread)::

    OMP_NUM_THREADS=1 nice -n 10 python experiments/novelty_recon.py \\
        --families halo,peaks,grazing,rings --models /tmp/xsml-lofo-models --out recon.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

try:  # run as a script (python experiments/novelty_recon.py) or imported from the repo root
    from novelty_lofo import (
        FAMILIES,
        REDUCED,
        add_options,
        load_or_train,
        make_data,
        split_indices,
    )
except ImportError:  # pragma: no cover
    from experiments.novelty_lofo import (
        FAMILIES,
        REDUCED,
        add_options,
        load_or_train,
        make_data,
        split_indices,
    )

CHANNELS = ("log_mean", "log_max", "relative", "invalid", "outside", "saturated")
IMAGE = (0, 1, 2)  # the channels that carry counts (the others are masks and fractions)


def make_b_data(n: int, seed: int, input_size: int, cache: Path):
    """``n`` renderer B frames (``render_scene(seed, i)``), preprocessed as the cached frames."""
    from bluesky_xsml.preprocess import PreprocessConfig, preprocess_batch
    from bluesky_xsml.render_b import render_scene

    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            return z["inputs"], z["labels"]
    cfg = PreprocessConfig(size=input_size)
    xs, ys = [], []
    t0 = time.perf_counter()
    for a in range(0, n, 16):
        frames, labs = [], []
        for i in range(a, min(n, a + 16)):
            frame, lab, _ = render_scene(seed, i)
            frames.append(frame)
            labs.append(lab)
        x, ok, _errors = preprocess_batch(frames, cfg)
        xs.append(np.asarray(x, np.float16))
        ys.append(np.asarray(labs, np.float32)[ok])
        print(f"renderer B: {a + len(frames)}/{n} ({time.perf_counter() - t0:.0f} s)", flush=True)
    inputs, labels = np.concatenate(xs), np.concatenate(ys)
    np.savez(cache, inputs=inputs, labels=labels)
    return inputs, labels


def parse_ae(spec: str) -> dict:
    """``"w16-l8-d3"`` (width 16, 8 latent channels, 3 halvings), with ``-fc32`` (a dense
    32-value bottleneck after the convolutions) or ``-p2`` (the input averaged over 2 x 2
    pixels first, the residual measured at that resolution), ``-e2`` (2 epochs instead of
    ``--ae-epochs``), ``-m4`` (a masked predictor of 4 x 4-pixel blocks, see
    :func:`build_ae`) -> keyword arguments of :func:`build_ae` (and ``epochs``). ``-t2``:
    not an autoencoder but a decoder of the input from the (frozen) tagger's stage-2 map
    (:func:`build_tag_decoder`; ``-l`` and ``-d`` are then unused)."""
    out = {"width": 16, "latent": 8, "down": 3, "dense": 0, "pool": 1}
    keys = {"w": "width", "l": "latent", "d": "down", "fc": "dense", "p": "pool", "e": "epochs",
            "t": "stage", "m": "mask"}
    for part in spec.split("-"):
        key = part.rstrip("0123456789")
        if key not in keys or key == part:
            raise ValueError(f"bad autoencoder spec part {part!r} in {spec!r}")
        out[keys[key]] = int(part[len(key):])
    return out


def build_ae(c_in: int, size: int, width: int = 16, latent: int = 8, down: int = 3,
             dense: int = 0, pool: int = 1, mask: int = 0):
    """A small convolutional autoencoder: ``down`` stride-2 convolutions (width ``width``,
    then ``2 * width``), a 1x1 bottleneck of ``latent`` channels (optionally squeezed
    through ``dense`` values), and the mirror image with nearest-neighbour upsampling.
    With ``mask``, a masked predictor instead: it sees the input with half of its
    ``mask x mask`` blocks blanked (and the mask as one more channel) and predicts them."""
    from torch import nn

    size //= pool
    enc, ch = [], c_in + (1 if mask else 0)
    for i in range(down):
        nxt = width if i == 0 else 2 * width
        enc += [nn.Conv2d(ch, nxt, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
        ch = nxt
    enc += [nn.Conv2d(ch, latent, 1)]
    side = size >> down
    mid = []
    if dense:
        mid = [nn.Flatten(), nn.Linear(latent * side * side, dense), nn.ReLU(inplace=True),
               nn.Linear(dense, latent * side * side), nn.Unflatten(1, (latent, side, side))]
    dec = [nn.Conv2d(latent, ch, 1), nn.ReLU(inplace=True)]
    for i in range(down):
        last = i == down - 1
        nxt = c_in if last else (width if i == down - 2 else 2 * width)
        dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, nxt, 3, padding=1)]
        dec += [] if last else [nn.ReLU(inplace=True)]
        ch = nxt
    return Recon(nn.Sequential(*enc, *mid, *dec), pool, len(enc), mask)


def _recon_class():
    import torch
    from torch import nn

    class _Recon(nn.Module):
        """The autoencoder and its input pooling: ``forward`` returns ``(target, output)``."""

        def __init__(self, body, pool: int, n_enc: int, mask: int = 0):
            super().__init__()
            self.body, self.pool, self.n_enc, self.mask = body, int(pool), int(n_enc), int(mask)

        def _masked(self, x, m):
            return self.body(torch.cat([x * (1 - m), m], 1))

        def forward(self, x):
            if self.pool > 1:
                x = nn.functional.avg_pool2d(x, self.pool)
            if not self.mask:
                return x, self.body(x)
            b, (n, _, h, w) = self.mask, x.shape
            if self.training:  # half the blocks, at random; the loss only on them
                m = (torch.rand(n, 1, h // b, w // b) < 0.5).to(x.dtype)
                m = m.repeat_interleave(b, 2).repeat_interleave(b, 3)
                return x * m, self._masked(x, m) * m
            # scoring: four passes, each predicting one quarter of the blocks (a 2 x 2
            # pattern), so every pixel is predicted once from the blocks around it
            rows = torch.arange(h // b)[:, None] % 2
            cols = torch.arange(w // b)[None, :] % 2
            out = torch.zeros_like(x)
            for di in (0, 1):
                for dj in (0, 1):
                    cell = ((rows == di) & (cols == dj)).to(x.dtype)
                    m = cell.repeat_interleave(b, 0).repeat_interleave(b, 1)
                    m = m[None, None].expand(n, 1, h, w)
                    out = out + self._masked(x, m) * m
            return x, out

        def encode(self, x):
            """The bottleneck map (before any dense squeeze)."""
            if self.pool > 1:
                x = nn.functional.avg_pool2d(x, self.pool)
            if self.mask:
                x = torch.cat([x, torch.zeros_like(x[:, :1])], 1)
            return self.body[:self.n_enc](x)

    return _Recon


def Recon(body, pool, n_enc, mask=0):
    """The network around ``body`` (its module class is built on first use, so that torch
    is imported only when a network is)."""
    global _RECON
    if "_RECON" not in globals():
        _RECON = _recon_class()
    return _RECON(body, pool, n_enc, mask)


def build_tag_decoder(net, stage: int, c_in: int, size: int, width: int = 16,
                      pool: int = 1, **_unused):
    """A decoder of the (``pool``-averaged) input from the frozen tagger ``net``'s map after
    stage ``stage``: a 1x1 convolution to ``width`` channels, then nearest-neighbour
    upsampling and 3x3 convolutions up to the input's resolution."""
    import torch
    from torch import nn

    with torch.inference_mode():
        h = net.stem(torch.zeros(1, c_in, size, size))
        for block in net.stages[:stage]:
            h = block(h)
    ch, side, target = h.shape[1], h.shape[-1], size // pool
    dec = [nn.Conv2d(ch, width, 1), nn.ReLU(inplace=True)]
    ch = width
    while side < target:
        side *= 2
        last = side >= target
        dec += [nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(ch, c_in if last else width, 3, padding=1)]
        dec += [] if last else [nn.ReLU(inplace=True)]
    for prm in net.parameters():
        prm.requires_grad_(False)

    class TagDecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.tagger, self.dec = net.eval(), nn.Sequential(*dec)

        def encode(self, x):
            with torch.no_grad():
                h = self.tagger.stem(x)
                for block in self.tagger.stages[:stage]:
                    h = block(h)
            return h

        def forward(self, x):
            t = nn.functional.avg_pool2d(x, pool) if pool > 1 else x
            return t, self.dec(self.encode(x))

        def train(self, mode: bool = True):  # the tagger stays in eval mode
            super().train(mode)
            self.tagger.eval()
            return self

    return TagDecoder()


def _zero_ae():
    """The baseline ``zero``: reconstructs nothing (the residual is the input squared), its
    codes are the input averaged over 8 x 8 pixels (kNN on a coarse copy of the input)."""
    import torch
    from torch import nn

    class Zero(nn.Module):
        def forward(self, x):
            return x, torch.zeros_like(x)

        def encode(self, x):
            return nn.functional.avg_pool2d(x, 8)

    return Zero().eval()


def fit_ae(x: np.ndarray, spec: str, *, epochs: int, batch: int = 64, lr: float = 2e-3,
           seed: int = 0, tagger_net=None):
    """Fit an autoencoder (``spec``, see :func:`parse_ae`) to inputs ``x`` by mean squared
    error; returns the network in eval mode and the seconds it took."""
    import torch

    if spec == "zero":
        return _zero_ae(), 0.0
    torch.manual_seed(seed)
    kw = parse_ae(spec)
    epochs = kw.pop("epochs", epochs)
    if "stage" in kw:
        import copy

        net = build_tag_decoder(copy.deepcopy(tagger_net), kw.pop("stage"), x.shape[1],
                                x.shape[-1], **kw)
    else:
        net = build_ae(x.shape[1], x.shape[-1], **kw)
    opt = torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=lr,
                            weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    t0 = time.perf_counter()
    for epoch in range(epochs):
        order, run = rng.permutation(len(x)), 0.0
        for a in range(0, len(x) - batch + 1, batch):
            xb = torch.from_numpy(np.asarray(x[order[a:a + batch]], np.float32))
            target, out = net(xb)
            loss = ((out - target) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run += loss.item()
        print(f"  ae {spec} epoch {epoch + 1}/{epochs} mse {run / max(len(x) // batch, 1):.5f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return net.eval(), time.perf_counter() - t0


def residuals(net, x: np.ndarray, batch: int = 128):
    """``(x - AE(x))**2`` per channel and pixel, float16 ``(N, C, S, S)``, and the
    bottleneck codes ``(N, L * s * s)`` float32."""
    import torch

    out, codes = [], []
    with torch.inference_mode():
        for a in range(0, len(x), batch):
            xb = torch.from_numpy(np.asarray(x[a:a + batch], np.float32))
            target, rec = net(xb)
            out.append(((rec - target) ** 2).numpy().astype(np.float16))
            codes.append(net.encode(xb).flatten(1).numpy())
    return np.concatenate(out), np.concatenate(codes)


def nearest_cosine(bank: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Cosine distance of each row of ``x`` to its nearest row of ``bank``."""
    def unit(a):
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    b, out = unit(np.asarray(bank, np.float32)), []
    for a in range(0, len(x), 512):
        out.append(1.0 - (unit(np.asarray(x[a:a + 512], np.float32)) @ b.T).max(1))
    return np.concatenate(out)


def residual_scores(r: np.ndarray, ch_scale: np.ndarray) -> dict[str, np.ndarray]:
    """Candidate scores of residual maps ``r`` (``ch_scale``: each channel's mean residual
    on validation frames, for the channel-normalised scores)."""
    r = np.asarray(r, np.float32)
    per_ch = r.mean(axis=(2, 3))
    out = {"mse": per_ch.mean(1), "mse_img": per_ch[:, IMAGE].mean(1),
           "mse_norm": (per_ch / ch_scale).mean(1)}
    for c, name in enumerate(CHANNELS):
        out[f"mse_{name}"] = per_ch[:, c]
    rn = r / ch_scale[None, :, None, None]
    for tag, sel in (("", slice(None)), ("_img", list(IMAGE))):
        m = rn[:, sel].mean(1)
        for g in (16, 8):  # a g x g grid of cells
            n, k = m.shape[0], m.shape[-1] // g
            cells = m[:, :g * k, :g * k].reshape(n, g, k, g, k).mean(axis=(2, 4)).reshape(n, -1)
            out[f"grid{g}_max{tag}"] = cells.max(1)
            out[f"grid{g}_q95{tag}"] = np.quantile(cells, 0.95, axis=1)
    return out


def _z(v: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Standardised on the validation frames: ``(v - median) / sd``."""
    mu, sd = np.median(v["val"]), max(float(v["val"].std()), 1e-9)
    return {k: (x - mu) / sd for k, x in v.items()}


def cost(spec: str, input_size: int, repeats: int = 20) -> dict:
    """Milliseconds per frame (batches of 8, this process's threads): a fresh network of
    ``spec`` at the resolution it would see in the product (the default model's input
    averaged to the same side as here), and the packaged default tagger's
    ``predict_inputs`` on 128-pixel inputs."""
    import torch

    from bluesky_xsml import Tagger

    def per_frame(fn, x):
        fn(x)
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn(x)
        return 1e3 * (time.perf_counter() - t0) / (repeats * len(x))

    tagger = Tagger.load()
    side = tagger.preprocess_config.size
    x = np.random.default_rng(0).random((8, 6, side, side), dtype=np.float32)
    out = {"default_predict_inputs_ms": round(per_frame(tagger.predict_inputs, x), 3),
           "default_input_size": int(side)}
    if spec != "zero" and "-t" not in spec:
        kw = parse_ae(spec)
        kw.pop("epochs", None)
        kw["pool"] = kw["pool"] * side // input_size  # the same working side as here
        ae = build_ae(6, side, **kw).eval()
        xt = torch.from_numpy(x)
        with torch.inference_mode():
            out["ae_ms"] = round(per_frame(ae, xt), 3)
        out["ae_working_side"] = side // kw["pool"]
        out["ae_share"] = round(out["ae_ms"] / out["default_predict_inputs_ms"], 3)
    return out


def run_family(fam: str, inputs, labels, b_inputs, b_labels, specs, args) -> dict:
    """Shipped score and autoencoder scores of one family's held-out frames (see module)."""
    import torch

    from bluesky_xsml import Tagger
    from bluesky_xsml.novelty import NoveltyModel, auroc
    from bluesky_xsml.preprocess import PreprocessConfig
    from bluesky_xsml.tags import TAG_NAMES

    cols = [TAG_NAMES.index(t) for t in FAMILIES[fam]]
    seen = [i for i in range(len(TAG_NAMES)) if i not in cols]
    sp = split_indices(labels, fam)
    b_rows = np.flatnonzero(~(b_labels[:, cols] > 0.5).any(axis=1))
    data = {"train": inputs[sp["train"]], "val": inputs[sp["val"]],
            "test_in": inputs[sp["test_in"]], "test_out": inputs[sp["test_out"]],
            "b": b_inputs[b_rows]}
    y = labels[sp["train"]].astype(np.float32).copy()
    y[:, cols] = np.nan
    net = load_or_train(fam, data["train"], y, args)
    tagger = Tagger(net, TAG_NAMES, preprocess=PreprocessConfig(size=inputs.shape[-1]),
                    precision="fp32")

    def analyse(x):
        probs, feats = [], []
        for a in range(0, len(x), 128):
            out = tagger.analyse_inputs(np.asarray(x[a:a + 128], np.float32),
                                        keep_features=True)
            probs.append(out.probs)
            feats.append(out.features)
        return np.concatenate(probs), np.concatenate(feats)

    an = {k: analyse(x) for k, x in data.items()}
    shipped = NoveltyModel.fit(an["train"][1], an["val"][1], embedding_dim=64, fpr=0.01)
    evals = ("val", "test_in", "test_out", "b")
    base = {"shipped": {k: shipped.score(an[k][1]) for k in evals},
            "n_tags_pred": {k: an[k][0][:, seen].sum(1) for k in evals}}
    result = {"family": fam, "tags": list(FAMILIES[fam]), "n_train": int(len(sp["train"])),
              "n_val": int(len(sp["val"])), "n_in": int(len(sp["test_in"])),
              "n_out": int(len(sp["test_out"])), "n_b": int(len(b_rows)),
              "tags_per_frame": {k: round(float((m > 0.5).sum(1).mean()), 2) for k, m in
                                 (("test_in", labels[sp["test_in"]]),
                                  ("test_out", labels[sp["test_out"]]),
                                  ("b", b_labels[b_rows]))},
              "scores": {}}
    rng = np.random.default_rng(args.seed)
    fit_rows = np.sort(rng.permutation(len(data["train"]))[:args.n_fit])
    for spec in specs:
        ae, fit_s = fit_ae(data["train"][fit_rows], spec, epochs=args.ae_epochs, seed=args.seed,
                           tagger_net=net)
        t0 = time.perf_counter()
        both = {k: residuals(ae, data[k]) for k in evals}
        res = {k: v[0] for k, v in both.items()}
        _, bank = residuals(ae, data["train"][fit_rows])
        scale = res["val"].astype(np.float32).mean(axis=(0, 2, 3)) + 1e-12
        per = {k: residual_scores(res[k], scale) for k in evals}
        # the bottleneck codes as features of their own: distance to the nearest fit frame
        for k in evals:
            per[k]["latent_knn"] = nearest_cosine(bank, both[k][1])
        names = list(per["val"])
        cand = {f"{spec}:{n}": {k: per[k][n] for k in evals} for n in names}
        zship = _z(base["shipped"])
        for n in names:
            zr = _z(cand[f"{spec}:{n}"])
            for w in args.weights:
                cand[f"{spec}:shipped+{w:g}*{n}"] = {k: zship[k] + w * zr[k] for k in evals}
        result.setdefault("ae", {})[spec] = {
            "fit_seconds": round(fit_s, 1), "score_seconds": round(time.perf_counter() - t0, 1),
            "val_mse_per_channel": [round(float(v), 6) for v in scale]}
        base.update(cand)
        del ae, res
        torch.set_num_threads(args.threads)
    for name, v in base.items():
        thr = np.quantile(v["val"], 0.99)
        result["scores"][name] = {
            "auroc": round(auroc(v["test_in"], v["test_out"]), 4),
            "flagged_out": round(float((v["test_out"] > thr).mean()), 4),
            "flagged_in": round(float((v["test_in"] > thr).mean()), 4),
            "flagged_b": round(float((v["b"] > thr).mean()), 4),
            "auroc_b_vs_in": round(auroc(v["test_in"], v["b"]), 4)}
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dev-family", default="halo",
                   help="settings are chosen on this family only (reported, marked as such)")
    p.add_argument("--ae", default="zero,w8-l8-d3-p2-e1,w8-l8-d3-p2-e3,w8-l8-d3-p2,"
                   "w8-l4-d3-p2-e3,w16-l8-d3-fc32-e2,w16-l16-d4-e2,w8-l4-d3-e2,"
                   "w16-t1-p2-e3,w16-t2-p2-e3,w16-t3-p2-e3,w8-l8-d3-p2-e3-m2,"
                   "w8-l8-d3-p2-e3-m4,w16-l16-d2-p2-e3-m2,w16-l16-d4-e2-m4",
                   help="autoencoders tried on the development family (see parse_ae)")
    p.add_argument("--ae-epochs", type=int, default=6)
    p.add_argument("--n-fit", type=int, default=4000, help="training frames the AE is fitted on")
    p.add_argument("--weights", type=lambda t: tuple(float(v) for v in t.split(",")),
                   default=(0.5, 1.0, 2.0), help="weights of a residual score added to shipped")
    p.add_argument("--n-b", type=int, default=400, help="renderer B frames")
    p.add_argument("--b-seed", type=int, default=100)
    p.add_argument("--b-cache", default=None)
    # the data and tagger options of novelty_lofo.py's reduced run (to find its cache and
    # networks; a network is trained with them when absent)
    add_options(p)
    p.set_defaults(**REDUCED, families="halo,peaks,grazing,rings")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    if set(families) - set(FAMILIES) or args.dev_family not in families:
        p.error(f"families must be of {', '.join(FAMILIES)} and include --dev-family")
    cache = Path(args.cache or f"/tmp/xsml-lofo-{args.data_seed}-{args.n}-{args.size}-"
                               f"{args.input_size}.npz")
    inputs, labels = make_data(args.n, args.size, args.input_size, args.data_seed, cache)
    b_cache = Path(args.b_cache or f"/tmp/xsml-render-b-{args.b_seed}-{args.n_b}-"
                                   f"{args.input_size}.npz")
    b_inputs, b_labels = make_b_data(args.n_b, args.b_seed, args.input_size, b_cache)
    specs = [s.strip() for s in args.ae.split(",") if s.strip()]
    for s in specs:
        if s != "zero":
            parse_ae(s)
    t0 = time.perf_counter()
    dev = run_family(args.dev_family, inputs, labels, b_inputs, b_labels, specs, args)
    recon = [n for n in dev["scores"] if ":" in n]
    recon = [n for n in recon if not n.startswith("zero:")]
    chosen = max(recon, key=lambda n: dev["scores"][n]["auroc"])
    alone = max((n for n in recon if "shipped+" not in n),
                key=lambda n: dev["scores"][n]["auroc"])
    spec = chosen.split(":")[0]
    print(f"chosen on {args.dev_family}: {chosen} (AUROC {dev['scores'][chosen]['auroc']}); "
          f"residual alone: {alone} ({dev['scores'][alone]['auroc']})", flush=True)
    results = [dev]
    for fam in families:
        if fam != args.dev_family:
            run = [spec] + (["zero"] if "zero" in specs else [])
            results.append(run_family(fam, inputs, labels, b_inputs, b_labels, run, args))
    shown = ["shipped", "n_tags_pred", alone, chosen]
    if "zero" in specs:  # the same scores of the input itself (no autoencoder)
        shown += [n for n in ("zero:" + alone.split(":")[1], "zero:latent_knn")
                  if n in dev["scores"]]
    for extra in (f"{spec}:mse", f"{spec}:mse_log_max", f"{spec}:grid16_max_img"):
        if extra not in shown:
            shown.append(extra)
    # what each network reached on the development family (the basis of the choice)
    dev_table = {}
    for sp in specs:
        mine = {n: v for n, v in dev["scores"].items() if n.startswith(sp + ":")}
        best_alone = max((n for n in mine if "shipped+" not in n), key=lambda n: mine[n]["auroc"])
        best_sum = max((n for n in mine if "shipped+" in n), key=lambda n: mine[n]["auroc"])
        dev_table[sp] = {"alone": best_alone.split(":", 1)[1], **{
            f"alone_{k}": mine[best_alone][k] for k in ("auroc", "flagged_b")},
            "sum": best_sum.split(":", 1)[1], **{
            f"sum_{k}": mine[best_sum][k] for k in ("auroc", "flagged_b")}}
    plain = [sp for sp in specs if sp != "zero" and "-t" not in sp and "-m" not in sp]
    best_plain = max(plain, key=lambda sp: dev_table[sp]["sum_auroc"]) if plain else None
    timing = {sp: cost(sp, args.input_size) for sp in [spec, best_plain] if sp}
    print("cost:", json.dumps(timing), flush=True)
    summary = {"options": {k: (list(v) if isinstance(v, tuple) else v)
                           for k, v in vars(args).items()},
               "chosen_on_dev_family": {"score": chosen, "residual_alone": alone},
               "dev_family_by_network": dev_table, "cost": timing,
               "seconds": round(time.perf_counter() - t0, 1), "results": results}
    print(f"\n{args.dev_family} (development family), each network's best score alone and "
          f"best sum with the shipped score (shipped alone: "
          f"{dev['scores']['shipped']['auroc']:.3f}):")
    for sp, row in dev_table.items():
        print(f"  {sp:22s} {row['alone']:16s} {row['alone_auroc']:.3f} "
              f"({100 * row['alone_flagged_b']:4.1f}%)   {row['sum']:28s} "
              f"{row['sum_auroc']:.3f} ({100 * row['sum_flagged_b']:4.1f}%)")
    shown = ["shipped", "n_tags_pred", alone, chosen]
    for extra in (f"{spec}:mse", f"{spec}:mse_log_max", f"{spec}:grid16_max_img"):
        if extra not in shown:
            shown.append(extra)
    if "zero" in specs:  # the same scores of the input itself (no autoencoder)
        shown += [n for n in ("zero:" + alone.split(":")[1], "zero:" + chosen.split(":")[1])
                  if n in dev["scores"] and n not in shown]
    print("\nAUROC (family frames against held-out frames without it); in brackets: share of "
          "renderer B frames without the family flagged at the 1% threshold")
    print("score".ljust(44), " ".join(r["family"][:8].rjust(14) for r in results))
    for n in shown:
        cells = [f"{r['scores'][n]['auroc']:.3f} ({100 * r['scores'][n]['flagged_b']:4.1f}%)"
                 if n in r["scores"] else "-" for r in results]
        print(n[:44].ljust(44), " ".join(c.rjust(14) for c in cells))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
