"""The training recipe's pieces: loss weights, augmentation, batches, schedule, EMA.

The library half of ``xsml train`` (:mod:`bluesky_xsml.training.train` is the
command's wiring); fine-tuning (:mod:`bluesky_xsml.training.finetune`) uses the
same augmentation.

Loss: masked BCE (``NaN`` labels are unknown and ignored) with a per-tag
``pos_weight = clip(sqrt(neg/pos), 1, 10)`` from the training label
frequencies (:func:`pos_weights`), stored in ``net.pos_weight``.

Augmentation respects the geometry: horizontal flips (left/right are
equivalent) and an intensity scale of the count channels; never vertical
flips or rotations (the grazing-incidence horizon and Yoneda band lie below
and above the beam).
"""

from __future__ import annotations

import math
import queue
import threading

import numpy as np

from ..preprocess import LOG_SCALE
from .data import label_frequencies

__all__ = ["BatchLoader", "augment", "ema_update", "lr_at", "pos_weights"]


def pos_weights(labels: np.ndarray, *, max_weight: float = 10.0) -> np.ndarray:
    """``clip(sqrt(neg/pos), 1, max_weight)`` per tag from known labels.

    >>> [round(float(w), 3) for w in pos_weights(np.array([[1, 0], [0, 0], [0, 0], [0, 1.]]))]
    [1.732, 1.732]
    """
    p = np.clip(label_frequencies(labels), 1e-4, 1.0)
    return np.clip(np.sqrt((1 - p) / p), 1.0, max_weight).astype(np.float32)


def augment(x, *, generator, flip_p: float = 0.5, log_scale_range: float = 0.35):
    """Physics-respecting augmentation of preprocessed inputs ``(B, 6, S, S)``.

    Horizontal flips (per sample, probability ``flip_p``) and a count scale
    ``a = exp(U(-r, r))`` applied exactly to the ``log_mean``/``log_max``
    channels (``log1p(a * expm1(v))``), with ``relative`` recomputed. Vertical
    flips are never applied. ``generator`` is a ``torch.Generator``.
    """
    import torch

    B = x.shape[0]
    flip = torch.rand(B, generator=generator) < flip_p
    if flip.any():
        x[flip] = x[flip].flip(-1)
    if log_scale_range > 0:
        a = torch.exp((torch.rand(B, 1, 1, 1, generator=generator) * 2 - 1) * log_scale_range)
        counts = torch.expm1(x[:, 0:2] * LOG_SCALE)
        x[:, 0:2] = torch.log1p(counts * a) / LOG_SCALE
        peak = x[:, 0].amax(dim=(1, 2), keepdim=True)
        x[:, 2] = torch.where(peak > 0, x[:, 0] / peak.clamp(min=1e-12), torch.zeros_like(x[:, 0]))
    return x


class BatchLoader:
    """Shuffled batches from cached arrays, assembled in a background thread.

    Epoch ``e`` uses the permutation of ``numpy.random.default_rng([seed, e])``,
    so a resumed run sees the same batches it would have seen.
    """

    def __init__(self, inputs, labels, batch_size: int, *, seed: int, augment_fn=None,
                 prefetch: int = 3):
        self.inputs, self.labels = inputs, labels
        self.batch_size = batch_size
        self.seed = seed
        self.augment_fn = augment_fn
        self.prefetch = prefetch

    def __len__(self) -> int:
        return len(self.labels) // self.batch_size  # drop the last partial batch

    def epoch(self, e: int):
        """Yield ``(x, y)`` float32 tensors for epoch ``e``."""
        import torch

        order = np.random.default_rng([self.seed, e]).permutation(len(self.labels))
        gen = torch.Generator().manual_seed(int(self.seed) * 100003 + e)
        q: queue.Queue = queue.Queue(self.prefetch)
        stop = threading.Event()

        def work():
            try:
                for b in range(len(self)):
                    if stop.is_set():
                        return
                    idx = np.sort(order[b * self.batch_size:(b + 1) * self.batch_size])
                    x = torch.from_numpy(np.asarray(self.inputs[idx], dtype=np.float32))
                    y = torch.from_numpy(np.asarray(self.labels[idx], dtype=np.float32))
                    if self.augment_fn is not None:
                        x = self.augment_fn(x, generator=gen)
                    q.put((x, y))
                q.put(None)
            except BaseException as err:  # noqa: BLE001  # pragma: no cover - re-raised by the consumer
                q.put(err)

        t = threading.Thread(target=work, daemon=True, name="xsml-batches")
        t.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while t.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    t.join(0.05)


def lr_at(step: int, *, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up then cosine decay to 1 % of ``peak``.

    >>> lr_at(0, total=100, warmup=10, peak=1.0), lr_at(10, total=100, warmup=10, peak=1.0)
    (0.1, 1.0)
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))


def ema_update(ema: dict, net, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * weights`` for floating tensors; others copied."""
    import torch

    with torch.no_grad():
        for k, v in net.state_dict().items():
            e = ema[k]
            if e.dtype.is_floating_point:
                e.mul_(decay).add_(v.detach(), alpha=1 - decay)
            else:
                e.copy_(v)
