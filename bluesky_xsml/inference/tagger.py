"""The :class:`Tagger`: a network, its preprocessing, tag names and thresholds.

A tagger turns detector frames into per-tag probabilities. It is what the live
callback runs, what training produces and what checkpoints hold.

Examples
--------
>>> import numpy as np
>>> from bluesky_xsml import Tagger
>>> tagger = Tagger.untrained(seed=0)
>>> probs = tagger.predict(np.random.default_rng(0).poisson(3, (256, 300)).astype("uint32"))
>>> probs.shape == (1, len(tagger.tags)), probs.dtype
(True, dtype('float32'))
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..calibration import Calibration
from ..checkpoints import (
    CHECKPOINT_FORMAT,
    MIN_SAFE_TORCH,
    atomic_torch_save,
    check_format,
    content_id,
    default_checkpoint_path,
    require_safe_torch,
    safe_torch_load,
)
from ..errors import CheckpointError, ConfigurationError, FrameError
from ..model import ProbabilitiesAndFeatures, TaggerNet, TaggerNetConfig, fuse_for_inference
from ..novelty import FrameAnalysis, NoveltyModel, sidecar_path
from ..polar import input_centers
from ..preprocess import CHANNELS, PreprocessConfig, preprocess_batch
from ..readout import as_readouts
from ..tags import TAG_NAMES, TAGS, validate_tag_names
from .device import choose_device, resolve_precision

# the checkpoint names are re-exported from bluesky_xsml.checkpoints, where they live
__all__ = ["Tagger", "CHECKPOINT_FORMAT", "MIN_SAFE_TORCH", "default_checkpoint_path",
           "atomic_torch_save", "require_safe_torch"]

log = logging.getLogger(__name__)

#: Kept for code that read it here; it lives in :mod:`bluesky_xsml.checkpoints`.
_content_id = content_id


class Tagger:
    """A multi-label tagger for scattering frames.

    Parameters
    ----------
    net : TaggerNet
        The network (its outputs are in ``tags`` order).
    tags : sequence of str
        Tag names, one per network output.
    thresholds : sequence of float, optional
        Per-tag decision thresholds (default: the vocabulary's defaults, or 0.5).
    preprocess : PreprocessConfig, optional
    metadata : dict, optional
        Provenance: ``checkpoint_id``, ``parent_id``, training data, metrics...
    device : str or torch.device, optional
        ``"cuda"`` when available, else ``"cpu"`` when not given.
    precision : {"auto", "fp32", "bf16", "fp16"}
        Autocast precision for inference; ``"auto"`` picks bf16 on CPUs with
        native bf16 support and fp16 on CUDA.
    num_threads : int, optional
        Threads for CPU preprocessing (the numba kernel releases the GIL).
    novelty : NoveltyModel, optional
        Feature statistics for novelty scores and embeddings
        (:mod:`bluesky_xsml.novelty`); without them :meth:`analyse` gives NaN
        scores and no embeddings.
    calibration : Calibration, optional
        A per-tag monotonic map applied to every probability the tagger returns
        (:mod:`bluesky_xsml.calibration`, fitted by ``xsml calibrate``). With
        one, ``thresholds`` are on the calibrated scale (what the outputs are
        compared with) and the map is part of the checkpoint id.
    """

    def __init__(
        self,
        net: TaggerNet,
        tags: Sequence[str],
        *,
        thresholds: Sequence[float] | None = None,
        preprocess: PreprocessConfig | None = None,
        metadata: dict | None = None,
        device: str | torch.device | None = None,
        precision: str = "auto",
        num_threads: int | None = None,
        novelty: NoveltyModel | None = None,
        calibration: Calibration | None = None,
    ):
        self.tags: tuple[str, ...] = validate_tag_names(tags)
        if net.config.n_tags != len(self.tags):
            raise ConfigurationError(
                f"network has {net.config.n_tags} outputs but {len(self.tags)} tag names were given"
            )
        if net.config.in_channels != len(CHANNELS):
            raise ConfigurationError(
                f"network expects {net.config.in_channels} input channels; preprocessing "
                f"makes {len(CHANNELS)}"
            )
        defaults = {t.name: t.threshold for t in TAGS}
        self.thresholds = np.asarray(
            thresholds if thresholds is not None else [defaults.get(t, 0.5) for t in self.tags],
            dtype=np.float32,
        )
        if self.thresholds.shape != (len(self.tags),):
            raise ConfigurationError(
                f"need one threshold per tag ({len(self.tags)}), got shape {self.thresholds.shape}"
            )
        #: The thresholds this tagger was built or loaded with (what a reset restores).
        self.default_thresholds = self.thresholds.copy()
        self.preprocess_config = preprocess or PreprocessConfig()
        self.metadata: dict[str, Any] = dict(metadata or {})
        if calibration is not None and calibration.n_tags != len(self.tags):
            raise ConfigurationError(f"calibration is for {calibration.n_tags} tags; the "
                                     f"tagger has {len(self.tags)}")
        #: The per-tag map applied to the network's probabilities (``None``: raw outputs).
        self.calibration: Calibration | None = calibration
        self.device = choose_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.net = net.eval()  # the trainable form, on the CPU; saved and fine-tuned
        self._lock = threading.RLock()  # guards net swaps against a running batch
        self._rebuild_inference_net()
        self._num_threads = num_threads or min(4, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None
        if "checkpoint_id" not in self.metadata:
            self.metadata["checkpoint_id"] = content_id(self.net.state_dict(), self._header())
        self.novelty: NoveltyModel | None = None
        if novelty is not None:
            self.set_novelty(novelty)

    # ------------------------------------------------------------------ identity
    @property
    def checkpoint_id(self) -> str:
        """Content id of the weights and configuration this tagger runs."""
        return str(self.metadata["checkpoint_id"])

    def _header(self) -> dict:
        return _checkpoint_header(self.net.config.to_dict(), self.preprocess_config.to_dict(),
                                  list(self.tags), self.calibration)

    def describe(self) -> dict:
        """JSON-able summary for documents and the API."""
        return {
            "checkpoint_id": self.checkpoint_id,
            "parent_id": self.metadata.get("parent_id"),
            "tags": list(self.tags),
            "thresholds": [float(t) for t in self.thresholds],
            "preprocess": self.preprocess_config.to_dict(),
            "model_config": self.net.config.to_dict(),
            "device": str(self.device),
            "precision": self.precision,
            "novelty": self.novelty_info(),
            "calibration": self.calibration_info(),
        }

    # ------------------------------------------------------------ calibration
    def calibration_info(self) -> dict:
        """JSON-able description of the calibration (``available: False`` without)."""
        cal = self.calibration
        if cal is None:
            return {"available": False}
        return {"available": True, "method": "platt", **cal.info}

    def set_calibration(self, calibration: Calibration | None) -> None:
        """Calibrate this tagger's outputs with ``calibration`` (``None``: remove it).

        The thresholds (current and default) are carried over to the new
        scale, so that every decision stays the same; the checkpoint id
        changes (the map is part of it) and the previous id becomes
        ``metadata["parent_id"]``.

        Raises
        ------
        ConfigurationError
            The calibration is for another number of tags.
        """
        if calibration is not None and calibration.n_tags != len(self.tags):
            raise ConfigurationError(f"calibration is for {calibration.n_tags} tags; the "
                                     f"tagger has {len(self.tags)}")
        with self._lock:
            old = self.calibration
            thr, dflt = self.thresholds, self.default_thresholds
            if old is not None:  # back to the network's scale first
                thr, dflt = old.invert(thr), old.invert(dflt)
            if calibration is not None:
                thr, dflt = calibration.map_thresholds(thr), calibration.map_thresholds(dflt)
            parent = self.checkpoint_id
            self.calibration = calibration
            self.thresholds = np.asarray(thr, np.float32)
            self.default_thresholds = np.asarray(dflt, np.float32)
            self.metadata["parent_id"] = parent
            self.metadata["checkpoint_id"] = content_id(self.net.state_dict(), self._header())

    def uncalibrated_thresholds(self) -> np.ndarray:
        """The thresholds on the network's own (uncalibrated) scale, float32."""
        if self.calibration is None:
            return self.thresholds.copy()
        return self.calibration.invert(self.thresholds)

    # ---------------------------------------------------------------- novelty
    @property
    def feature_dim(self) -> int:
        """Width of the pooled features (the head's input)."""
        return int(self.net.head.in_features)

    def set_novelty(self, novelty: NoveltyModel | None) -> None:
        """Use ``novelty`` for scores and embeddings (``None``: none).

        Raises
        ------
        ConfigurationError
            Its feature width is not this network's.
        """
        if novelty is not None and novelty.feature_dim != self.feature_dim:
            raise ConfigurationError(
                f"novelty statistics are for {novelty.feature_dim} features; this network "
                f"pools {self.feature_dim}")
        self.novelty = novelty

    def novelty_info(self) -> dict:
        """JSON-able description of the novelty statistics (``available: False`` without)."""
        nov = self.novelty
        if nov is None:
            return {"available": False, "threshold": None, "embedding_dim": 0}
        return {"available": True, "threshold": nov.threshold, "fpr": nov.fpr,
                "embedding_dim": nov.output_dim(len(self.tags)), "digest": nov.digest(),
                "fitted_for": nov.info.get("checkpoint_id")}

    # ------------------------------------------------------------ construction
    @classmethod
    def untrained(cls, *, seed: int = 0, config: TaggerNetConfig | None = None,
                  tags: Sequence[str] = TAG_NAMES, **kwargs) -> Tagger:
        """A randomly initialised tagger (deterministic for a seed)."""
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            net = TaggerNet(config or TaggerNetConfig(n_tags=len(tags), in_channels=len(CHANNELS)))
        finally:
            torch.random.set_rng_state(gen_state)
        md = {"untrained": True, "seed": seed, **kwargs.pop("metadata", {})}
        return cls(net, tags, metadata=md, **kwargs)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, **kwargs) -> Tagger:
        """Load a checkpoint; with no ``path``, the packaged default model.

        If the package ships no trained default (a development checkout before
        one was trained), an untrained model of the same API is returned and a
        warning is logged.

        Raises
        ------
        CheckpointError
            The file is missing, truncated, not a bluesky-xsml checkpoint,
            tampered with (content id mismatch) or would need code to unpickle.
        """
        if path is None:
            path = default_checkpoint_path()
            if not path.exists():
                log.warning("no packaged default model at %s; using an untrained model", path)
                return cls.untrained(**kwargs)
        path = Path(path)
        ckpt = safe_torch_load(path)
        tagger = cls.from_checkpoint_dict(ckpt, source=str(path), **kwargs)
        side = sidecar_path(path)
        if tagger.novelty is None and side.exists():
            try:
                novelty, fitted_for = NoveltyModel.load(side)
            except (OSError, ValueError, KeyError) as err:
                log.warning("novelty statistics %s unreadable (%s); novelty unavailable", side, err)
            else:
                if fitted_for != tagger.checkpoint_id:
                    log.warning("novelty statistics %s were fitted for checkpoint %s, not %s; "
                                "novelty unavailable", side, fitted_for, tagger.checkpoint_id)
                else:
                    tagger.set_novelty(novelty)
        return tagger

    @classmethod
    def from_checkpoint_dict(cls, ckpt: Any, *, source: str = "<dict>", **kwargs) -> Tagger:
        """Build a tagger from a loaded checkpoint dictionary (validated)."""
        check_format(ckpt, source)
        try:
            config = TaggerNetConfig.from_dict(ckpt["model_config"])
            preprocess = PreprocessConfig.from_dict(ckpt["preprocess"])
            tags = list(ckpt["tags"])
            thresholds = list(ckpt["thresholds"])
            state = ckpt["state_dict"]
            metadata = dict(ckpt.get("metadata", {}))
            calibration = (None if ckpt.get("calibration") is None
                           else Calibration.from_dict(ckpt["calibration"]))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{source} is missing or has a malformed field: {err}") from err
        if calibration is not None and calibration.n_tags != len(tags):
            raise CheckpointError(f"{source}: calibration is for {calibration.n_tags} tags, the "
                                  f"checkpoint has {len(tags)}")
        net = TaggerNet(config)
        try:
            net.load_state_dict(state)
        except Exception as err:
            raise CheckpointError(f"{source}: weights do not fit the model config: {err}") from err
        header = _checkpoint_header(config.to_dict(), preprocess.to_dict(), tags, calibration)
        expected = metadata.get("checkpoint_id")
        actual = content_id(net.state_dict(), header)
        if expected is not None and expected != actual:
            raise CheckpointError(
                f"{source}: content id mismatch (recorded {expected}, computed {actual}); the file "
                "was modified after it was written"
            )
        metadata["checkpoint_id"] = actual
        novelty = None
        if ckpt.get("novelty") is not None:
            try:
                novelty = NoveltyModel.from_arrays(ckpt["novelty"])
            except (TypeError, ValueError, AttributeError) as err:
                raise CheckpointError(f"{source}: malformed novelty statistics: {err}") from err
            if novelty.feature_dim != net.head.in_features:
                raise CheckpointError(f"{source}: novelty statistics are for "
                                      f"{novelty.feature_dim} features, the network pools "
                                      f"{net.head.in_features}")
        return cls(net, tags, thresholds=thresholds, preprocess=preprocess, metadata=metadata,
                   novelty=novelty, calibration=calibration, **kwargs)

    def _compiled(self, net: TaggerNet):
        """The inference form of ``net``: batch norms folded, cast, traced and frozen.

        One call of the frozen TorchScript graph runs the whole forward pass
        without the GIL, so a busy RunEngine thread does not slow it down op by
        op (eager mode re-acquires the GIL after every operator).
        """
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision, torch.float32)
        module = ProbabilitiesAndFeatures(fuse_for_inference(net)).to(self.device,
                                                                     dtype=dtype).eval()
        if getattr(module.net, "polar", None) is not None:
            # the polar head is small (a few % of the cost) and its inputs span decades of
            # counts: it stays fp32 whatever the network's precision
            module.net.polar.float()
        memory_format = (torch.channels_last if self.device.type == "cpu"
                         else torch.contiguous_format)
        module = module.to(memory_format=memory_format)
        S = self.preprocess_config.size
        example = torch.zeros(2, net.config.in_channels, S, S, device=self.device, dtype=dtype)
        example = example.contiguous(memory_format=memory_format)
        takes_centers = getattr(net, "polar", None) is not None
        args = (example,)
        if takes_centers:  # the polar head reads the beam centre (NaN rows: unknown)
            args = (example, torch.full((2, 2), S / 2, device=self.device))
        try:
            # TorchScript is deprecated in favour of torch.compile, but it is still the
            # way to run a whole forward pass in one GIL-free call with no cold-compile
            # cost (docs/decisions/0002-torchscript-inference.md).
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                # shapes read in forward (the relation block's position code) are fixed by
                # the input size, so the trace is valid for every batch of that size
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                traced = torch.jit.freeze(torch.jit.trace(module, args, check_trace=False))
                for _ in range(3):  # the profiling executor optimises after a few runs
                    traced(*args)
            return traced, dtype, memory_format, takes_centers
        except Exception as err:  # noqa: BLE001 - any tracing failure: run eagerly  # pragma: no cover
            log.warning("TorchScript tracing failed (%s); inference runs eagerly", err)
            return module, dtype, memory_format, takes_centers

    def _rebuild_inference_net(self) -> None:
        compiled = self._compiled(self.net)
        with self._lock:
            self._infer = compiled

    def checkpoint_dict(self) -> dict:
        """Everything :meth:`save` writes: plain types and tensors only."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        metadata = dict(self.metadata)
        metadata["checkpoint_id"] = content_id(state, self._header())
        out = {
            "format": CHECKPOINT_FORMAT,
            # version 2 adds "calibration"; an uncalibrated checkpoint stays version 1, so
            # that older bluesky-xsml releases keep reading it (and refuse a calibrated one)
            "format_version": 1 if self.calibration is None else 2,
            **self._header(),
            "thresholds": [float(t) for t in self.thresholds],
            "state_dict": state,
            "metadata": json.loads(json.dumps(metadata, default=str)),
        }
        if self.calibration is not None:
            out["calibration"] = self.calibration.to_dict()
        if self.novelty is not None:
            # outside the content id: the statistics do not change what the network tags,
            # and they can be refitted without making a new checkpoint id
            out["novelty"] = {k: (str(v) if v.dtype.kind == "U" else torch.from_numpy(
                np.array(v))) for k, v in self.novelty.to_arrays().items()}
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the checkpoint atomically (temp file, fsync, ``os.replace``)."""
        ckpt = self.checkpoint_dict()
        path = atomic_torch_save(ckpt, path)
        self.metadata["checkpoint_id"] = ckpt["metadata"]["checkpoint_id"]
        return path

    # ---------------------------------------------------------------- inference
    def _executor(self) -> ThreadPoolExecutor | None:
        if self._num_threads <= 1:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._num_threads, thread_name_prefix="xsml-prep")
        return self._pool

    def preprocess(self, frames: Sequence[np.ndarray], readouts=None):
        """Preprocess frames; see :func:`bluesky_xsml.preprocess.preprocess_batch`.

        ``readouts``: a :class:`~bluesky_xsml.readout.Readout` for all frames or
        one (or ``None``) per frame; the frames are then in ADU, turned into
        counts before preprocessing.
        """
        return preprocess_batch(frames, self.preprocess_config, pool=self._executor(),
                                readouts=readouts)

    @property
    def uses_beam_center(self) -> bool:
        """Whether the network reads the beam centre (it has a polar head).

        Such a tagger gives better spot and ring tags when :meth:`predict` is
        told where the beam is; without it, it gives the CNN's outputs alone.
        """
        return getattr(self.net, "polar", None) is not None

    def input_centers(self, shapes, beam_center) -> np.ndarray | None:
        """Beam centres on the model input for raw frames of ``shapes``.

        Parameters
        ----------
        shapes : sequence of (H, W)
        beam_center : None, (x, y) or array_like of shape (N, 2)
            Column and row of the direct beam in raw-frame pixels (it may lie
            off the detector), one for all frames or one per frame; ``NaN``
            where unknown.

        Returns
        -------
        numpy.ndarray or None
            ``(N, 2)`` (see :func:`bluesky_xsml.polar.input_centers`), or
            ``None`` when ``beam_center`` is ``None``.

        Raises
        ------
        ValueError
            If ``beam_center`` is neither one pair nor one pair per frame.
        """
        if beam_center is None:
            return None
        shapes = np.asarray([tuple(s)[-2:] for s in shapes], np.float64).reshape(-1, 2)
        try:
            c = np.asarray(beam_center, np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"beam_center must be numbers (x, y): {err}") from None
        if c.shape == (2,):
            c = np.broadcast_to(c, (len(shapes), 2))
        if c.shape != (len(shapes), 2):
            raise ValueError(f"beam_center must be one (x, y) pair or one per frame "
                             f"({len(shapes)}, 2); got shape {c.shape}")
        return input_centers(shapes, c, self.preprocess_config.size)

    def predict_inputs(self, inputs: np.ndarray | torch.Tensor,
                       centers: np.ndarray | None = None) -> np.ndarray:
        """Probabilities for already preprocessed inputs ``(N, C, S, S)``.

        ``centers`` (``(N, 2)``, from :meth:`input_centers`; ``NaN`` rows
        unknown) is read by a network with a polar head and ignored otherwise.
        """
        return self._forward(inputs, centers)[0]

    def analyse_inputs(self, inputs: np.ndarray | torch.Tensor,
                       centers: np.ndarray | None = None, *,
                       keep_features: bool = False) -> FrameAnalysis:
        """Probabilities, novelty scores and embeddings for preprocessed inputs.

        One network call, as :meth:`predict_inputs`; the score and embedding
        are computed from the pooled features it returns anyway. Without
        novelty statistics (:attr:`novelty` ``None``) the scores are NaN,
        nothing is novel and the embedding is ``None``.
        """
        probs, feats = self._forward(inputs, centers)
        n = len(probs)
        nov = self.novelty
        if nov is None or n == 0:
            scores = np.full(n, np.nan, np.float32)
            return FrameAnalysis(probs, scores, np.zeros(n, bool),
                                 None if nov is None else np.zeros(
                                     (0, nov.output_dim(len(self.tags))), np.float16),
                                 feats if keep_features else None)
        scores = nov.score(feats)
        return FrameAnalysis(probs, scores, nov.is_novel(scores), nov.embed(feats, probs),
                             feats if keep_features else None)

    def analyse(self, frames, *, batch_size: int = 32, beam_center=None, readout=None,
                keep_features: bool = False) -> FrameAnalysis:
        """:meth:`predict` with novelty scores and embeddings (see :meth:`analyse_inputs`).

        Raises
        ------
        FrameError
            If a frame cannot be used; the message names its index.
        """
        parts = [self.analyse_inputs(inputs, c, keep_features=keep_features)
                 for _, inputs, c in self._input_batches(frames, batch_size, beam_center,
                                                         readout)]
        if not parts:
            return self.analyse_inputs(np.zeros((0, len(CHANNELS), 8, 8), np.float32))

        def cat(name):
            vals = [getattr(p, name) for p in parts]
            return None if vals[0] is None else np.concatenate(vals)

        return FrameAnalysis(cat("probs"), cat("novelty"), cat("novel"), cat("embedding"),
                             cat("features"))

    def _forward(self, inputs, centers=None) -> tuple[np.ndarray, np.ndarray]:
        """``(probs, pooled features)`` as float32 arrays for preprocessed inputs."""
        x = torch.as_tensor(inputs)
        if x.shape[0] == 0:
            return (np.zeros((0, len(self.tags)), np.float32),
                    np.zeros((0, self.feature_dim), np.float32))
        with self._lock:  # the network and its calibration as one pair (see swap_weights)
            module, dtype, memory_format, takes_centers = self._infer
            cal = self.calibration
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.to(dtype=dtype).contiguous(memory_format=memory_format)
        with torch.inference_mode():
            if takes_centers:
                c = (torch.full((x.shape[0], 2), float("nan")) if centers is None
                     else torch.as_tensor(np.asarray(centers, np.float32).reshape(-1, 2)))
                if c.shape[0] != x.shape[0]:
                    raise ValueError(f"{c.shape[0]} beam centres for {x.shape[0]} inputs")
                probs, feats = module(x, c.to(self.device))
            else:
                probs, feats = module(x)
        probs = probs.cpu().numpy().astype(np.float32, copy=False)
        if cal is not None:
            probs = cal.apply(probs)
        return probs, feats.cpu().numpy().astype(np.float32, copy=False)

    def predict(self, frames, *, batch_size: int = 32, beam_center=None,
                readout=None) -> np.ndarray:
        """Per-tag probabilities for one frame, a stack or a list of frames.

        Parameters
        ----------
        frames : array_like or sequence of array_like
            One 2-D frame, an ``(N, H, W)`` stack, or a list of 2-D frames of
            different shapes and dtypes.
        batch_size : int
            Frames per network call.
        beam_center : (x, y) or array_like of shape (N, 2), optional
            Where the direct beam hits the detector, in pixels (column, row),
            for all frames or per frame (``NaN``: unknown). A tagger whose
            network has a polar head (:attr:`uses_beam_center`) reads it;
            other taggers ignore it.
        readout : Readout, dict or sequence, optional
            The detector's calibration (:class:`~bluesky_xsml.readout.Readout`,
            or its fields as a dict, as in a start document's ``xsml_readout``)
            for all frames, or one (or ``None``) per frame: the frames are in
            ADU and become counts before preprocessing, with its saturated and
            masked values told apart. Without it the frames' values are counts.

        Returns
        -------
        numpy.ndarray
            ``(N, len(tags))`` float32 probabilities in ``tags`` order.

        Raises
        ------
        FrameError
            If a frame cannot be used; the message names its index.
        ValueError
            If ``beam_center`` is neither one pair nor one pair per frame, or
            ``readout`` is malformed or not one per frame
            (:class:`~bluesky_xsml.errors.ConfigurationError`).
        """
        parts = [self.predict_inputs(inputs, c)
                 for _, inputs, c in self._input_batches(frames, batch_size, beam_center,
                                                         readout)]
        return (np.concatenate(parts) if parts
                else np.zeros((0, len(self.tags)), np.float32))

    def _input_batches(self, frames, batch_size: int, beam_center, readout=None):
        """``(start, inputs, centers)`` per batch of ``frames``: what predict and analyse run on.

        Raises ``FrameError`` naming the first unusable frame's index.
        """
        frame_list = as_frame_list(frames)
        centers = self.input_centers([np.shape(f) for f in frame_list], beam_center)
        readouts = as_readouts(readout, len(frame_list))
        for start in range(0, len(frame_list), batch_size):
            chunk = frame_list[start:start + batch_size]
            inputs, _, errors = self.preprocess(
                chunk, None if readouts is None else readouts[start:start + batch_size])
            if errors:
                i, err = min(errors.items())
                raise FrameError(f"frame {start + i}: {err}", reason=err.reason) from err
            yield start, inputs, None if centers is None else centers[start:start + len(chunk)]

    def decide(self, probs: np.ndarray) -> list[list[str]]:
        """Tag names at or above threshold, per row of ``probs``."""
        probs = np.atleast_2d(probs)
        return [[t for t, p, th in zip(self.tags, row, self.thresholds, strict=True) if p >= th]
                for row in probs]

    # -------------------------------------------------------------- hot swap
    def swap_weights(self, other: Tagger, *, allow_tag_change: bool = False) -> None:
        """Adopt ``other``'s weights, thresholds and metadata between batches.

        With ``allow_tag_change``, ``other`` may have more or fewer tags as long
        as one tag list extends the other (tags are only ever appended, e.g. by
        fine-tuning a new tag) and the networks differ only in ``n_tags``.
        The swap waits for a batch holding :meth:`hold` to finish.
        """
        same_tags = other.tags == self.tags
        if not same_tags and allow_tag_change:
            short, long_ = sorted((self.tags, other.tags), key=len)
            a, b = self.net.config.to_dict(), other.net.config.to_dict()
            a.pop("n_tags"), b.pop("n_tags")
            if long_[:len(short)] != short or a != b:
                raise ConfigurationError(
                    "can only swap in a tagger whose tags extend (or are extended by) the live "
                    f"tags, with the same network otherwise; live {list(self.tags)}, new "
                    f"{list(other.tags)}")
        elif not same_tags or other.net.config != self.net.config:
            raise ConfigurationError("can only swap in a tagger with the same tags and network")
        state = other.net.state_dict()
        compiled = self._compiled(other.net)
        net = copy.deepcopy(other.net).eval() if not same_tags else None
        with self._lock:
            if net is not None:
                self.net = net
                self.tags = other.tags
            else:
                self.net.load_state_dict(state)
            self._infer = compiled
            self.thresholds = other.thresholds.copy()
            self.default_thresholds = getattr(other, "default_thresholds",
                                              other.thresholds).copy()
            self.metadata = dict(other.metadata)
            self.preprocess_config = other.preprocess_config
            self.novelty = getattr(other, "novelty", None)
            self.calibration = getattr(other, "calibration", None)

    def hold(self):
        """Context manager that keeps weights from being swapped while it is held.

        The inference worker holds it around one batch's model call and the
        reading of :attr:`checkpoint_id`, so the two always agree.
        """
        return self._lock

    def finetune(self, frames, labels, **options) -> Tagger:
        """Fine-tune a copy of this tagger on labeled frames (deprecated).

        .. deprecated::
            Use :func:`bluesky_xsml.training.finetune.finetune_frames`
            (``finetune_frames(tagger, frames, labels, ...)``): inference does
            not depend on training (``docs/decisions/0004-layers.md``).

        Parameters
        ----------
        frames : array_like or sequence of array_like
            Raw detector frames (as for :meth:`predict`).
        labels : array_like
            ``(N, T)``: 1, 0 or ``NaN`` (unknown) per frame and tag, in
            ``self.tags`` order, or in the order of ``tags=`` (a name this
            tagger lacks grows its head).
        **options
            Keyword options of :func:`bluesky_xsml.training.finetune.finetune`
            (``steps``, ``synthetic``, ``synthetic_val``, ``val_fraction``, ...).

        Returns
        -------
        Tagger
            The fine-tuned tagger; its validation report (a
            :class:`~bluesky_xsml.training.finetune.FinetuneReport`, with the gate's
            ``passed`` and ``reason``) is ``new.report``. This tagger is unchanged.
        """
        warnings.warn("Tagger.finetune is deprecated; use bluesky_xsml.training.finetune."
                      "finetune_frames(tagger, frames, labels, ...)", DeprecationWarning,
                      stacklevel=2)
        # the one import of training from inference, for this deprecated shim only (the
        # import-linter contract "inference does not import training" names it in
        # ignore_imports); at call time, so importing inference never loads training
        from ..training.finetune import finetune_frames

        return finetune_frames(self, frames, labels, **options)

    def warmup(self, shape: tuple[int, int] = (256, 256),
               dtypes: Sequence[str] = ("uint32", "int32", "uint16", "float32"),
               batch: int = 2) -> float:
        """Compile kernels for common detector dtypes and run one batch each.

        Returns the seconds it took.
        """
        t0 = time.perf_counter()
        for dtype in dtypes:
            self.predict(np.zeros((batch, *shape), dtype))
        return time.perf_counter() - t0

    def set_num_threads(self, n: int) -> None:
        """Threads for CPU preprocessing (the kernels release the GIL)."""
        if n < 1:
            raise ConfigurationError(f"num_threads must be >= 1, got {n}")
        if n != self._num_threads:
            self.close()
            self._num_threads = int(n)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def __repr__(self) -> str:
        return (f"<Tagger {self.checkpoint_id} {len(self.tags)} tags on {self.device}"
                f" ({self.precision})>")


def _checkpoint_header(model_config: dict, preprocess: dict, tags: list,
                       calibration: Calibration | None) -> dict:
    """What the content id covers besides the weights.

    The calibration map enters only when there is one, so the ids of
    uncalibrated checkpoints are what they always were.
    """
    header = {"model_config": model_config, "preprocess": preprocess, "tags": list(tags)}
    if calibration is not None:
        d = calibration.to_dict()
        header["calibration"] = {k: d[k] for k in ("method", "a", "b", "pinned")}
    return header


def as_frame_list(frames) -> list:
    """Frames as a list of 2-D arrays: a frame, an ``(N, H, W)`` stack or a list of either.

    Raises
    ------
    FrameError
        Anything else (``reason="bad_shape"``).
    """
    if isinstance(frames, (list, tuple)):
        out = []
        for f in frames:
            a = np.asarray(f)
            out.extend(list(a) if a.ndim == 3 else [a])
        return out
    a = np.asarray(frames)
    if a.ndim == 3:
        return list(a)
    if a.ndim == 2:
        return [a]
    raise FrameError(
        f"expected a 2-D frame, an (N, H, W) stack or a list of frames; got shape {a.shape}",
        reason="bad_shape",
    )


_as_frame_list = as_frame_list  # its name before it was public
