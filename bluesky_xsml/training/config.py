"""Options of fine-tuning as validated objects.

:class:`FineTuneConfig` holds the settings of one fine-tuning round
(:func:`~bluesky_xsml.training.finetune.finetune`), :class:`LiveFineTuneConfig`
those of the background fine-tuner
(:class:`~bluesky_xsml.training.live.LiveFineTuner`), which wraps one. Both
are frozen dataclasses checked once, in ``__post_init__``, with errors that
name the option; ``dataclasses.replace`` checks again. The functions and
classes that take them still accept the old keywords, mapped onto a config
(:meth:`FineTuneConfig.resolve`).

Examples
--------
>>> cfg = FineTuneConfig(steps=50, lr=1e-4)
>>> cfg.steps, cfg.batch_size
(50, 32)
>>> FineTuneConfig.resolve(cfg, {"batch_size": 8}).batch_size
8
>>> FineTuneConfig(batch_size=0)
Traceback (most recent call last):
...
bluesky_xsml.errors.ConfigurationError: fine-tuning option batch_size must be an integer >= 1, got 0
>>> LiveFineTuneConfig.resolve(None, {"min_labels": 4, "steps": 10}).finetune.steps
10
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigurationError
from ..option_checks import bad, integer, number, with_keywords

__all__ = [
    "DEFAULT_SYNTHETIC_REPLAY",
    "DEFAULT_SYNTHETIC_VAL",
    "FineTuneConfig",
    "LiveFineTuneConfig",
]

#: Original-domain frames replayed while fine-tuning (the kind the default model trained on).
DEFAULT_SYNTHETIC_REPLAY = "synth:seed=0,n=512,sizes=256+512,detectors=train"
#: Original-domain validation frames for the forgetting check (another seed).
DEFAULT_SYNTHETIC_VAL = "synth:seed=1,n=256,sizes=256+512,detectors=train"


def _bad(name: str, need: str, value: Any) -> ConfigurationError:
    return bad("fine-tuning", name, need, value)


def _int(name: str, value: Any, low: int) -> int:
    return integer("fine-tuning", name, value, low)


def _float(name: str, value: Any, low: float | None = None, high: float | None = None, *,
           open_low: bool = False, open_high: bool = False) -> float:
    return number("fine-tuning", name, value, low, high, open_low=open_low, open_high=open_high)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise _bad(name, "True or False", value)
    return bool(value)


def _synthetic(name: str, value: Any) -> None:
    ok = (value is None or isinstance(value, str)
          or (isinstance(value, tuple) and len(value) in (2, 3))
          or (hasattr(value, "inputs") and hasattr(value, "labels")))
    if not ok:
        raise _bad(name, "a 'synth:...' spec, CachedArrays, (inputs, labels[, tags]) or None",
                   type(value).__name__)


def _resolve(cls, config, options: Mapping[str, Any], what: str):
    return with_keywords(cls, config, options, what)


@dataclass(frozen=True)
class FineTuneConfig:
    """Settings of one fine-tuning round (:func:`~bluesky_xsml.training.finetune.finetune`).

    Parameters
    ----------
    steps : int, optional
        Optimiser steps (default: about 15 passes over the new frames, 30 to 300).
    batch_size : int
        Frames per step; ``new_fraction`` of them from the new labels, the
        rest replay (older labels and synthetic, half each when both exist).
    lr, weight_decay : float
        AdamW settings (cosine decay after a short warm-up).
    new_fraction : float
        Share of each batch taken from the new labels, in (0, 1].
    val_fraction : float
        Share of the given frames held out for the gate when no validation
        frames are given, in [0, 1).
    synthetic, synthetic_val : spec str, CachedArrays, tuple or None
        Original-domain frames to replay, and to check forgetting on. ``None``
        turns either off (without ``synthetic_val`` the gate cannot check
        forgetting and says so in its reason).
    max_forgetting : float
        Largest allowed drop of original-domain mAP (0.01 = one point).
    min_improvement : float
        New-domain mAP must rise by more than this.
    augment : bool
        Flips and count scaling (:func:`bluesky_xsml.training.recipe.augment`).
    seed : int
        Seed of the hold-out split, the batches and the augmentation.
    freeze : int
        Leading modules kept fixed, counting the stem as the first and then
        each residual block (0 trains everything).
    distill : float
        Weight of the distillation term on replayed original-domain frames
        (learning without forgetting); 0 turns it off.
    """

    steps: int | None = None
    batch_size: int = 32
    lr: float = 2e-4
    weight_decay: float = 1e-4
    new_fraction: float = 0.5
    val_fraction: float = 0.25
    synthetic: Any = DEFAULT_SYNTHETIC_REPLAY
    synthetic_val: Any = DEFAULT_SYNTHETIC_VAL
    max_forgetting: float = 0.01
    min_improvement: float = 0.0
    augment: bool = True
    seed: int = 0
    freeze: int = 0
    distill: float = 0.0

    def __post_init__(self) -> None:
        checked = {
            "steps": None if self.steps is None else _int("steps", self.steps, 0),
            "batch_size": _int("batch_size", self.batch_size, 1),
            "lr": _float("lr", self.lr, 0.0, open_low=True),
            "weight_decay": _float("weight_decay", self.weight_decay, 0.0),
            "new_fraction": _float("new_fraction", self.new_fraction, 0.0, 1.0, open_low=True),
            "val_fraction": _float("val_fraction", self.val_fraction, 0.0, 1.0, open_high=True),
            "max_forgetting": _float("max_forgetting", self.max_forgetting, 0.0),
            "min_improvement": _float("min_improvement", self.min_improvement),
            "augment": _bool("augment", self.augment),
            "seed": _int("seed", self.seed, 0),
            "freeze": _int("freeze", self.freeze, 0),
            "distill": _float("distill", self.distill, 0.0),
        }
        _synthetic("synthetic", self.synthetic)
        _synthetic("synthetic_val", self.synthetic_val)
        for name, value in checked.items():  # frozen: store the normalised values
            object.__setattr__(self, name, value)

    @classmethod
    def resolve(cls, config: FineTuneConfig | None, options: Mapping[str, Any]
                ) -> FineTuneConfig:
        """``config`` (default: the defaults) with keyword ``options`` applied on top.

        Raises
        ------
        TypeError
            An option that is not a field (as for an unknown keyword argument).
        ConfigurationError
            A value out of range.
        """
        return _resolve(cls, config, options, "finetune()")

    def to_dict(self) -> dict:
        """The fields; synthetic data that are not spec strings appear as their type name."""
        out = dataclasses.asdict(self)
        for k in ("synthetic", "synthetic_val"):
            if not (out[k] is None or isinstance(out[k], str)):
                out[k] = type(getattr(self, k)).__name__
        return out


#: Field names of :class:`LiveFineTuneConfig` besides ``finetune``.
_LIVE_FIELDS = ("min_labels", "auto", "nice", "pause", "fsync")


@dataclass(frozen=True)
class LiveFineTuneConfig:
    """Settings of :class:`~bluesky_xsml.training.live.LiveFineTuner`.

    Parameters
    ----------
    min_labels : int
        New training labels that start a fine-tuning round (``auto``).
    auto : bool
        Start rounds by themselves; otherwise only ``retrain_now`` does.
    nice : int
        Niceness of the training thread (Linux: per thread; 0 leaves it).
    pause : float
        Seconds slept after each optimiser step (gives the CPU back).
    fsync : bool
        ``fsync`` label writes (see :class:`~bluesky_xsml.training.replay.ReplayStore`).
    finetune : FineTuneConfig
        Each round's settings; ``distill`` is 1.0 by default here (the live
        model should not forget).
    """

    min_labels: int = 16
    auto: bool = True
    nice: int = 19
    pause: float = 0.0
    fsync: bool = True
    finetune: FineTuneConfig = field(default_factory=lambda: FineTuneConfig(distill=1.0))

    def __post_init__(self) -> None:
        try:
            min_labels = _int("min_labels", self.min_labels, 1)
        except ConfigurationError:
            raise ConfigurationError(f"min_labels must be >= 1, got {self.min_labels}") from None
        checked = {
            "min_labels": min_labels,
            "auto": _bool("auto", self.auto),
            "fsync": _bool("fsync", self.fsync),
            "nice": _int("nice", self.nice, -20),
            "pause": _float("pause", self.pause, 0.0),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)
        if not isinstance(self.finetune, FineTuneConfig):
            raise _bad("finetune", "a FineTuneConfig", type(self.finetune).__name__)

    @classmethod
    def resolve(cls, config: LiveFineTuneConfig | None, options: Mapping[str, Any]
                ) -> LiveFineTuneConfig:
        """``config`` with keyword ``options`` applied: its own fields, or a round's.

        ``LiveFineTuner(tagger, d, min_labels=4, steps=100)`` sets ``min_labels``
        here and ``steps`` in :attr:`finetune`.
        """
        base = cls() if config is None else config
        if not isinstance(base, cls):
            raise ConfigurationError(
                f"config must be a {cls.__name__}, got {type(config).__name__}")
        own = {k: v for k, v in options.items() if k in _LIVE_FIELDS or k == "finetune"}
        rest = {k: v for k, v in options.items() if k not in own}
        try:
            ft = FineTuneConfig.resolve(own.pop("finetune", base.finetune), rest)
        except TypeError as err:
            raise TypeError(f"LiveFineTuner got unexpected keyword arguments: {err}; its own "
                            f"options are {list(_LIVE_FIELDS)}") from None
        return dataclasses.replace(base, finetune=ft, **own)
