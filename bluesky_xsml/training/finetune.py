"""Fine-tune a tagger on a few labeled frames, with replay and a validation gate.

Starting from a :class:`~bluesky_xsml.Tagger` (a checkpoint), :func:`finetune`
takes a mini-batch of labeled, preprocessed frames (labels ``NaN`` where
unknown, masked out of the loss) and runs a few optimiser steps. Each step's
batch mixes the new labels with *replay*: older labeled frames and synthetic
frames of the original domain, so old skills are not forgotten. Batch norm
statistics stay frozen (the network runs in eval mode) so a handful of
frames cannot drag the normalisation of every layer towards themselves.

The result is checked by a **validation gate**:

* new-domain held-out labeled frames must improve: their mAP over the tags
  that have positives and negatives among them rises by more than
  ``min_improvement`` (with no such tag, their masked loss must fall). A tag
  the parent does not have scores, before, as the constant predictor (its
  AP is the positive rate);
* the original domain (a synthetic validation set) may not drop by more than
  ``max_forgetting`` mAP (default 0.01, one point).

A tag name the tagger does not have grows the head: the new output starts
from zero weights (probability 0.5 before training) and the old outputs are
copied exactly. Synthetic frames count as negatives for a tag the generator
does not know (it never renders it).

Examples
--------
>>> import numpy as np
>>> from bluesky_xsml import Tagger
>>> from bluesky_xsml.model import TaggerNetConfig
>>> from bluesky_xsml.training.finetune import finetune
>>> tagger = Tagger.untrained(config=TaggerNetConfig(stem_width=8, widths=(8,), depths=(1,)))
>>> rng = np.random.default_rng(0)
>>> x = rng.random((12, 6, 128, 128), dtype=np.float32)
>>> y = np.full((12, 23), np.nan, np.float32); y[:, 0] = np.arange(12) % 2
>>> new, report = finetune(tagger, x, y, steps=3, batch_size=4, synthetic=None)
>>> report.steps, new.metadata["parent_id"] == tagger.checkpoint_id
(3, True)
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigurationError, FrameError
from ..inference.tagger import Tagger, as_frame_list
from ..model import TaggerNet
from ..tags import TAG_NAMES, validate_tag_names
from .config import DEFAULT_SYNTHETIC_REPLAY, DEFAULT_SYNTHETIC_VAL, FineTuneConfig
from .data import load_arrays
from .metrics import average_precision, best_f1_threshold
from .novelty_fit import refit_novelty
from .recipe import augment as augment_fn

__all__ = [
    "DEFAULT_SYNTHETIC_REPLAY",
    "DEFAULT_SYNTHETIC_VAL",
    "FineTuneConfig",
    "FinetuneReport",
    "finetune",
    "finetune_frames",
    "grow_head",
    "load_synthetic",
    "split_holdout",
]

log = logging.getLogger(__name__)


@dataclass
class FinetuneReport:
    """What a fine-tuning round did and how its validation gate decided."""

    passed: bool
    reason: str
    parent_id: str
    checkpoint_id: str = ""
    steps: int = 0
    seconds: float = 0.0
    n_train: int = 0
    n_val: int = 0
    n_replay: int = 0
    n_synthetic: int = 0
    new_tags: list = field(default_factory=list)
    new_domain_metric: str = "mAP"
    new_domain_before: float = math.nan
    new_domain_after: float = math.nan
    new_domain_tags: list = field(default_factory=list)
    original_before: float = math.nan
    original_after: float = math.nan
    new_tag_ap: dict = field(default_factory=dict)
    max_forgetting: float = 0.01
    min_improvement: float = 0.0
    stopped_early: bool = False

    def to_dict(self) -> dict:
        """JSON-able (NaN becomes ``None``)."""
        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v
        return {k: clean(v) for k, v in asdict(self).items()}


# ----------------------------------------------------------------------- helpers
def grow_head(tagger, new_tags: Sequence[str]):
    """A copy of ``tagger`` with outputs appended for ``new_tags``.

    Old outputs keep their weights exactly; new ones start at zero weight and
    bias (probability 0.5), threshold 0.5, positive weight 1. A polar head's
    output layer grows the same way (the new tags get no correction at first).
    """
    import torch

    new = [t for t in dict.fromkeys(new_tags) if t not in tagger.tags]
    if not new:
        return tagger
    tags = validate_tag_names(tagger.tags + tuple(new))
    config = copy.deepcopy(tagger.net.config)
    config.n_tags = len(tags)
    net = TaggerNet(config)
    old = tagger.net.state_dict()
    state = net.state_dict()
    # one row per tag: the classifier, and the polar head's output layer when there is one
    per_tag = [k for k in ("head.weight", "head.bias", "polar.out.weight", "polar.out.bias")
               if k in state]
    for k, v in old.items():
        if k in per_tag or k == "pos_weight":
            continue
        state[k] = v.clone()
    n = len(tagger.tags)
    with torch.no_grad():
        for k in per_tag:
            state[k] = torch.zeros_like(state[k])
            state[k][:n] = old[k]
        state["pos_weight"] = torch.ones_like(state["pos_weight"])
        state["pos_weight"][:n] = old["pos_weight"]
    net.load_state_dict(state)
    # a calibration fitted to the old network does not carry over: back to its own scale
    thresholds = np.concatenate([_raw_thresholds(tagger), np.full(len(new), 0.5, np.float32)])
    metadata = {k: v for k, v in tagger.metadata.items() if k != "checkpoint_id"}
    metadata["parent_id"] = tagger.checkpoint_id
    return Tagger(net.eval(), tags, thresholds=thresholds, preprocess=tagger.preprocess_config,
                  metadata=metadata, device=tagger.device, precision=tagger.precision)


def _raw_thresholds(tagger) -> np.ndarray:
    """A tagger's thresholds on its network's own scale (undoing a calibration), a copy."""
    raw = getattr(tagger, "uncalibrated_thresholds", None)
    return np.asarray(raw() if raw is not None else tagger.thresholds, np.float32).copy()


def split_holdout(n: int, *, fraction: float, seed: int = 0, min_val: int = 2) -> np.ndarray:
    """Boolean mask of the rows held out for validation (deterministic for a seed)."""
    if n < 2 * min_val or fraction <= 0:
        return np.zeros(n, bool)
    k = max(min_val, int(round(fraction * n)))
    mask = np.zeros(n, bool)
    mask[np.random.default_rng(seed).permutation(n)[:k]] = True
    return mask


def load_synthetic(source, preprocess, *, progress: bool = False):
    """``(inputs, labels, tags)`` of a synthetic source (spec string, arrays or ``None``).

    Spec strings go through the cached data machinery of
    :func:`bluesky_xsml.training.data.load_arrays`; a tuple ``(inputs, labels)``
    is taken as ``TAG_NAMES``-ordered labels, a 3-tuple adds the tag names.
    """
    if source is None:
        return None
    if isinstance(source, str):
        arrays = load_arrays(source, config=preprocess, progress=progress)
        return arrays.inputs, np.asarray(arrays.labels, np.float32), tuple(arrays.tags)
    if hasattr(source, "inputs") and hasattr(source, "labels"):
        return source.inputs, np.asarray(source.labels, np.float32), tuple(
            getattr(source, "tags", TAG_NAMES))
    if isinstance(source, tuple) and len(source) in (2, 3):
        tags = tuple(source[2]) if len(source) == 3 else TAG_NAMES
        return source[0], np.asarray(source[1], np.float32), tags
    raise ConfigurationError(
        "synthetic data must be a 'synth:...' spec, CachedArrays, (inputs, labels[, tags]) or "
        f"None; got {type(source).__name__}")


def _remap(labels: np.ndarray, src_tags: Sequence[str], dst_tags: Sequence[str], *,
           absent_negative: bool) -> np.ndarray:
    """Labels in ``src_tags`` order -> ``dst_tags`` order.

    Tags missing in ``src_tags`` are ``NaN`` (unknown), or 0 when
    ``absent_negative`` and the tag is not one the generator knows.
    """
    out = np.full((len(labels), len(dst_tags)), np.nan, np.float32)
    index = {t: i for i, t in enumerate(src_tags)}
    for j, t in enumerate(dst_tags):
        if t in index:
            out[:, j] = labels[:, index[t]]
        elif absent_negative and t not in TAG_NAMES:
            out[:, j] = 0.0
    return out


def _scores(net, inputs, batch: int = 64) -> np.ndarray:
    import torch

    out = []
    with torch.inference_mode():
        for a in range(0, len(inputs), batch):
            x = torch.as_tensor(np.asarray(inputs[a:a + batch], np.float32))
            out.append(torch.sigmoid(net(x)[0].float()).numpy())
    n_tags = net.config.n_tags
    return np.concatenate(out) if out else np.zeros((0, n_tags), np.float32)


def _masked_loss(scores: np.ndarray, labels: np.ndarray) -> float:
    known = np.isfinite(labels)
    if not known.any():
        return math.nan
    p = np.clip(scores, 1e-6, 1 - 1e-6)
    y = np.where(known, labels, 0)
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float(bce[known].mean())


def _scorable(labels: np.ndarray) -> list[int]:
    known = np.isfinite(labels)
    pos = (np.where(known, labels, 0) >= 0.5) & known
    return [j for j in range(labels.shape[1]) if pos[:, j].any() and (known & ~pos)[:, j].any()]


def _map(labels, scores, cols) -> float:
    aps = [average_precision(labels[:, j], scores[:, j]) for j in cols]
    aps = [a for a in aps if math.isfinite(a)]
    return float(np.mean(aps)) if aps else math.nan


def _tag_ap(labels, scores, j) -> float:
    return float(average_precision(labels[:, j], scores[:, j]))


def _gate(report: FinetuneReport, y_val: np.ndarray, before: np.ndarray | None,
          after: np.ndarray | None, *, out_tags: Sequence[str], new_tags: Sequence[str],
          n_labeled: int, original: tuple[float, float] | None) -> None:
    """Decide the validation gate: fill ``report``'s metrics, ``passed`` and ``reason``.

    Parameters
    ----------
    report : FinetuneReport
        The round's report; its ``min_improvement`` and ``max_forgetting`` are the limits.
    y_val : numpy.ndarray
        ``(V, len(out_tags))`` held-out labels of the new data (``NaN``: unknown).
    before, after : numpy.ndarray or None
        The parent's and the new network's probabilities for those frames (both ``None``:
        no held-out frames, which fails the gate).
    out_tags, new_tags : sequence of str
        The new network's tags, and those of them the parent does not have (the parent
        scores those as the constant predictor: AP = their positive rate).
    n_labeled : int
        Labeled frames given (for the reason when none were held out).
    original : (float, float) or None
        Original-domain mAP before and after, or ``None`` when not checked.
    """
    reasons: list[str] = []
    ok = True
    if before is not None:
        n_val = len(y_val)
        cols = _scorable(y_val)
        report.new_domain_tags = [out_tags[j] for j in cols]
        if cols:
            prior = {j: float(np.nanmean(y_val[:, j])) for j in cols}
            aps_before = [prior[j] if out_tags[j] in new_tags else _tag_ap(y_val, before, j)
                          for j in cols]
            aps_after = [_tag_ap(y_val, after, j) for j in cols]
            report.new_domain_before = float(np.nanmean(aps_before))
            report.new_domain_after = float(np.nanmean(aps_after))
            report.new_tag_ap = {out_tags[j]: round(a, 4)
                                 for j, a in zip(cols, aps_after, strict=True)
                                 if out_tags[j] in new_tags}
            gain = report.new_domain_after - report.new_domain_before
            if not gain > report.min_improvement:
                ok = False
                reasons.append(f"held-out new-domain mAP did not improve "
                               f"({report.new_domain_before:.4f}"
                               f" -> {report.new_domain_after:.4f}, {n_val} frames)")
            else:
                reasons.append(f"held-out new-domain mAP {report.new_domain_before:.4f} -> "
                               f"{report.new_domain_after:.4f}")
        else:
            report.new_domain_metric = "loss"
            report.new_domain_before = _masked_loss(before[:, :before.shape[1]], y_val)
            report.new_domain_after = _masked_loss(after, y_val)
            if not report.new_domain_after < report.new_domain_before:
                ok = False
                reasons.append(f"held-out new-domain loss did not fall "
                               f"({report.new_domain_before:.4f} -> "
                               f"{report.new_domain_after:.4f}; no tag has both classes held out)")
            else:
                reasons.append(f"held-out new-domain loss {report.new_domain_before:.4f} -> "
                               f"{report.new_domain_after:.4f} (no tag has both classes held out)")
    else:
        ok = False
        reasons.append(f"no held-out labeled frames to validate on ({n_labeled} labeled; need "
                       "at least 4)")
    if original is not None:
        report.original_before, report.original_after = original
        drop = report.original_before - report.original_after
        if not drop <= report.max_forgetting:
            ok = False
            reasons.append(f"original-domain mAP fell {100 * drop:.2f} points "
                           f"({report.original_before:.4f} -> {report.original_after:.4f}; "
                           f"allowed {100 * report.max_forgetting:.2f})")
        else:
            reasons.append(f"original-domain mAP {report.original_before:.4f} -> "
                           f"{report.original_after:.4f}")
    else:
        reasons.append("original domain not checked (no synthetic validation set)")
    report.passed = ok
    report.reason = "; ".join(reasons)


# -------------------------------------------------------------------- fine-tune
def _checked_labeled(tagger, inputs, labels, names: Sequence[str], *,
                     what: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """``(inputs, labels)`` as arrays, refused unless they fit ``tagger`` and ``names``.

    ``what`` names the two arguments in the messages (``("val_inputs", "val_labels")``).

    Raises
    ------
    ValueError
        Inputs not ``(N, C, S, S)`` preprocessed for ``tagger``, labels not
        ``(N, len(names))``, or a label other than 0, 1 or ``NaN``.
    """
    x_name, y_name = what
    x = np.asarray(inputs)
    y = np.asarray(labels, np.float32)
    channels, size = tagger.net.config.in_channels, tagger.preprocess_config.size
    if x.ndim != 4 or x.shape[1:] != (channels, size, size):
        raise ValueError(f"{x_name} must be preprocessed (N, {channels}, {size}, {size}); got "
                         f"{x.shape}. Use Tagger.preprocess(frames) or finetune_frames(tagger, "
                         "frames, labels)")
    if y.shape != (len(x), len(names)):
        raise ValueError(f"{y_name} must be (N={len(x)}, {len(names)}) in tag order "
                         f"{list(names)[:3]}... (one row per frame of {x_name}); got {y.shape}")
    bad = np.isfinite(y) & (y != 0) & (y != 1)
    if bad.any():
        raise ValueError(f"{y_name} must be 0, 1 or NaN (unknown); got "
                         f"{sorted(set(y[bad].tolist()))[:5]}")
    return x, y


def finetune(tagger, inputs, labels, *, config: FineTuneConfig | None = None,
             tags: Sequence[str] | None = None, val_inputs=None, val_labels=None,
             replay_inputs=None, replay_labels=None, original_before: float | None = None,
             should_stop: Callable[[], bool] | None = None,
             on_step: Callable[[int, float], None] | None = None, **options):
    """Fine-tune ``tagger`` on labeled inputs; returns ``(new_tagger, FinetuneReport)``.

    The round's settings are a :class:`~bluesky_xsml.training.config.FineTuneConfig`
    (``config``); its fields may also be given as keywords (``steps=50``), which
    override ``config``'s.

    Parameters
    ----------
    tagger : Tagger
        Starting point (not modified).
    inputs : array_like
        ``(N, C, S, S)`` preprocessed inputs (``tagger.preprocess``).
    labels : array_like
        ``(N, len(tags))``: 1, 0 or ``NaN`` (unknown, masked out of the loss).
    config : FineTuneConfig, optional
        Steps, batch size, learning rate, replay mix, the gate's limits,
        augmentation, seed, frozen modules, distillation (default: its defaults).
    tags : sequence of str, optional
        Column names of ``labels`` (default ``tagger.tags``); names the tagger
        does not have grow its head.
    val_inputs, val_labels : array_like, optional
        Held-out labeled frames of the new data for the gate, checked like
        ``inputs`` and ``labels`` (same shapes, labels 0, 1 or ``NaN``, one row
        per frame) and given together; by default ``config.val_fraction`` of
        the given frames are held out (not trained on).
    replay_inputs, replay_labels : array_like, optional
        Older labeled frames to mix in (labels in the same ``tags`` order),
        checked like ``inputs`` and ``labels`` and given together.
    original_before : float, optional
        The parent's original-domain mAP on ``synthetic_val`` if already known.
    should_stop : callable, optional
        Polled every step; returning True ends training early (the gate still runs).
    on_step : callable, optional
        ``on_step(step, loss)`` after every step.
    **options
        Fields of :class:`FineTuneConfig` (``steps``, ``batch_size``, ``lr``,
        ``synthetic``, ``max_forgetting``, ``freeze``, ``distill``, ...).

    Raises
    ------
    TypeError
        A keyword that is neither a parameter nor a config field.
    ConfigurationError
        A setting out of range.
    ValueError
        Inputs or labels (training, validation or replay) of the wrong shape
        or values, or only one of ``val_inputs`` and ``val_labels`` (or of
        ``replay_inputs`` and ``replay_labels``); raised before any training.

    Returns
    -------
    (Tagger, FinetuneReport)
        The fine-tuned tagger (``metadata["parent_id"]`` names the parent,
        ``metadata["finetune"]`` holds the report) and the gate's report.
    """
    import torch

    cfg = FineTuneConfig.resolve(config, options)
    (steps, batch_size, lr, weight_decay, new_fraction, val_fraction, synthetic, synthetic_val,
     max_forgetting, min_improvement, augment, seed, freeze, distill) = (
        cfg.steps, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.new_fraction, cfg.val_fraction,
        cfg.synthetic, cfg.synthetic_val, cfg.max_forgetting, cfg.min_improvement, cfg.augment,
        cfg.seed, cfg.freeze, cfg.distill)
    t0 = time.perf_counter()
    names = tuple(tags) if tags is not None else tagger.tags
    for pair, (a, b), neither in (
            (("val_inputs", "val_labels"), (val_inputs, val_labels),
             "neither (config.val_fraction is held out)"),
            (("replay_inputs", "replay_labels"), (replay_inputs, replay_labels),
             "neither (no replay)")):
        if (a is None) != (b is None):
            given, missing = pair if b is None else pair[::-1]
            raise ValueError(f"{given} was given without {missing}; pass both (frames and "
                             f"their labels) or {neither}")
    x_all, y_all = _checked_labeled(tagger, inputs, labels, names, what=("inputs", "labels"))
    if len(x_all) == 0:
        raise ValueError("need at least one labeled frame to fine-tune on")
    # refused before any work, like the training frames
    if val_inputs is not None:
        x_val, y_val = _checked_labeled(tagger, val_inputs, val_labels, names,
                                        what=("val_inputs", "val_labels"))
    if replay_inputs is not None and len(replay_inputs):
        replay_inputs, replay_labels = _checked_labeled(
            tagger, replay_inputs, replay_labels, names, what=("replay_inputs", "replay_labels"))

    new_tags = [t for t in dict.fromkeys(names) if t not in tagger.tags]
    base = grow_head(tagger, new_tags) if new_tags else tagger
    out_tags = base.tags
    y_all = _remap(y_all, names, out_tags, absent_negative=False)

    if val_inputs is not None:
        x_tr, y_tr = x_all, y_all
        y_val = _remap(y_val, names, out_tags, absent_negative=False)
    else:
        hold = split_holdout(len(x_all), fraction=val_fraction, seed=seed)
        x_tr, y_tr, x_val, y_val = x_all[~hold], y_all[~hold], x_all[hold], y_all[hold]
    # (inputs, labels, distilled): only original-domain frames are held to the parent's
    # outputs; on older labels of the new data those outputs are what fine-tuning corrects
    pools: list[tuple[Any, np.ndarray, bool]] = []
    n_replay = 0
    if replay_inputs is not None and len(replay_inputs):
        ry = _remap(replay_labels, names, out_tags, absent_negative=False)
        pools.append((replay_inputs, ry, False))
        n_replay = len(replay_inputs)
    syn = load_synthetic(synthetic, tagger.preprocess_config)
    n_syn = 0
    if syn is not None and len(syn[0]):
        pools.append((syn[0], _remap(syn[1], syn[2], out_tags, absent_negative=True), True))
        n_syn = len(syn[0])
    syn_val = load_synthetic(synthetic_val, tagger.preprocess_config)

    report = FinetuneReport(passed=False, reason="", parent_id=tagger.checkpoint_id,
                            n_train=len(x_tr), n_val=len(x_val), n_replay=n_replay,
                            n_synthetic=n_syn, new_tags=list(new_tags),
                            max_forgetting=max_forgetting, min_improvement=min_improvement)

    n_new = max(1, int(round(batch_size * new_fraction))) if pools else batch_size
    if steps is None:
        steps = int(np.clip(15 * math.ceil(len(x_tr) / n_new), 30, 300))
    net = copy.deepcopy(base.net).float().eval()  # frozen batch-norm statistics, no dropout
    for module in ([net.stem, *net.stages][:max(0, int(freeze))]):
        module.requires_grad_(False)
    trainable = [p for p in net.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim > 1]
    no_decay = [p for p in trainable if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    teacher = copy.deepcopy(tagger.net).float().eval() if distill > 0 else None
    warm = max(1, steps // 10)
    done = 0
    if len(x_tr):
        for step in range(steps):
            if should_stop is not None and should_stop():
                report.stopped_early = True
                break
            lr_now = lr * min(1.0, (step + 1) / warm) * (
                0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))
            for g in opt.param_groups:
                g["lr"] = lr_now
            idx = np.sort(rng.integers(0, len(x_tr), n_new))
            xs = [np.asarray(x_tr[idx], np.float32)]
            ys = [y_tr[idx]]
            held = [np.zeros(len(idx), bool)]  # rows distilled towards the parent
            rest = batch_size - n_new
            for k, (px, py, distilled) in enumerate(pools):
                share = rest // len(pools) + (1 if k < rest % len(pools) else 0)
                if share <= 0:
                    continue
                j = np.sort(rng.integers(0, len(px), share))
                xs.append(np.asarray(px[j], np.float32))
                ys.append(py[j])
                held.append(np.full(share, distilled))
            x = torch.from_numpy(np.concatenate(xs))
            y = torch.from_numpy(np.concatenate(ys))
            rows = torch.from_numpy(np.concatenate(held))
            if augment:
                x = augment_fn(x, generator=gen)
            logits, loss = net(x, y)
            if distill > 0 and bool(rows.any()):
                with torch.no_grad():
                    soft = torch.sigmoid(teacher(x[rows])[0].float())
                k = soft.shape[1]
                loss = loss + distill * torch.nn.functional.binary_cross_entropy_with_logits(
                    logits[rows, :k].float(), soft)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 2.0)
            opt.step()
            done = step + 1
            if on_step is not None:
                on_step(step, float(loss.detach()))
    net.eval().requires_grad_(True)
    report.steps = done

    # ------------------------------------------------------------------ the gate
    parent_net = base.net.float().eval()
    before = after = original = None
    if len(x_val):
        before, after = _scores(parent_net, x_val), _scores(net, x_val)
    if syn_val is not None and len(syn_val[0]):
        vy = _remap(syn_val[1], syn_val[2], out_tags, absent_negative=False)
        cols = [j for j in _scorable(vy) if out_tags[j] in tagger.tags]
        if original_before is None or not math.isfinite(original_before):
            original_before = _map(vy, _scores(parent_net, syn_val[0]), cols)
        original = (float(original_before), _map(vy, _scores(net, syn_val[0]), cols))
    _gate(report, y_val, before, after, out_tags=out_tags, new_tags=new_tags,
          n_labeled=len(x_all), original=original)

    # the new tagger is uncalibrated (the network changed): thresholds on the network's scale
    thresholds = _raw_thresholds(base)
    for j, t in enumerate(out_tags):
        if t in new_tags and len(x_val) and j in _scorable(y_val):
            thresholds[j] = best_f1_threshold(y_val[:, j], _scores(net, x_val)[:, j])[0]
    metadata = {k: v for k, v in tagger.metadata.items()
                if k not in ("checkpoint_id", "finetune", "untrained")}
    metadata["parent_id"] = tagger.checkpoint_id
    report.seconds = round(time.perf_counter() - t0, 3)
    metadata["finetune"] = report.to_dict()
    new = Tagger(net, out_tags, thresholds=thresholds, preprocess=tagger.preprocess_config,
                 metadata=metadata, device=tagger.device, precision=tagger.precision)
    report.checkpoint_id = new.checkpoint_id
    if getattr(tagger, "novelty", None) is not None:  # the parent's statistics are stale now
        fit_x = [x_tr] + [p[0] for p in pools]
        val_x = syn_val[0] if syn_val is not None and len(syn_val[0]) else x_val
        refit_novelty(tagger.novelty, new, fit_x, val_x)
    new.report = report
    return new, report


def finetune_frames(tagger, frames, labels, **options):
    """Fine-tune a copy of ``tagger`` on labeled raw frames; returns the new tagger.

    The frames are preprocessed as for :meth:`Tagger.predict <bluesky_xsml.Tagger.predict>`,
    then :func:`finetune` runs; what was ``Tagger.finetune``.

    Parameters
    ----------
    tagger : Tagger
        Starting point (not modified).
    frames : array_like or sequence of array_like
        Raw detector frames: one, an ``(N, H, W)`` stack or a list.
    labels : array_like
        ``(N, T)``: 1, 0 or ``NaN`` (unknown) per frame and tag, in
        ``tagger.tags`` order, or in the order of ``tags=`` (a name the tagger
        lacks grows its head).
    **options
        Keywords of :func:`finetune` (``config``, ``steps``, ``synthetic``, ...).

    Returns
    -------
    Tagger
        The fine-tuned tagger; its validation report (a :class:`FinetuneReport`,
        with the gate's ``passed`` and ``reason``) is ``new.report``.

    Raises
    ------
    FrameError
        A frame that cannot be preprocessed (the first one, by index).
    """
    frame_list = as_frame_list(frames)
    inputs, _ok, errors = tagger.preprocess(frame_list)
    if errors:
        i, err = min(errors.items())
        raise FrameError(f"frame {i}: {err}", reason=err.reason) from err
    new, _report = finetune(tagger, inputs, labels, **options)
    return new
