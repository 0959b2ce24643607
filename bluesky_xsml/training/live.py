"""Live fine-tuning: labels in, better weights swapped into the running tagger.

:class:`LiveFineTuner` owns a folder with a replay store and a checkpoint
registry::

    <directory>/replay.zarr     labeled frames (ReplayStore)
    <directory>/checkpoints/    versioned checkpoints (CheckpointRegistry)

Labels are appended durably (:meth:`LiveFineTuner.add_labels` returns once
they are on disk). A background thread at low priority (``nice`` 19 by
default, on Linux per thread) waits until ``min_labels`` new labels arrived
(or :meth:`LiveFineTuner.retrain_now`), fine-tunes from the *active*
checkpoint with :func:`~bluesky_xsml.training.finetune.finetune` (new labels,
replay of older labels and synthetic frames, the validation gate), registers
the result, and when the gate passes activates it. Activation (also through
:meth:`CheckpointRegistry.activate` / :meth:`~CheckpointRegistry.rollback`)
swaps the weights into the live tagger with :meth:`Tagger.swap_weights`,
which waits for the running inference batch, so every tag event names the
checkpoint that really produced it.

Every fourth labeled frame (rows 3, 7, 11, ...) is held out for the gate and
never trained on. On restart the active checkpoint is loaded into the tagger
and labels not yet trained on are picked up.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import queue
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..frame_cache import FrameCache  # its home before it moved
from ..label_rows import parse_tag_labels  # its home before it moved
from .checkpoints import CheckpointRegistry
from .config import LiveFineTuneConfig
from .finetune import finetune, load_synthetic
from .replay import ReplayStore

__all__ = ["HOLDOUT_EVERY", "FrameCache", "LiveFineTuneConfig", "LiveFineTuner",
           "parse_tag_labels"]

log = logging.getLogger(__name__)

#: Every ``HOLDOUT_EVERY``-th labeled frame is held out for the validation gate.
HOLDOUT_EVERY = 4


class LiveFineTuner:
    """Fine-tune in the background as labels arrive; swap promoted weights in.

    Parameters
    ----------
    tagger : Tagger
        The live tagger (the one the callback runs); its weights get swapped.
    directory : path
        Folder for the replay store and the checkpoints (created if missing).
    config : LiveFineTuneConfig, optional
        ``min_labels`` (new training labels that start a round), ``auto``,
        ``nice``, ``pause``, ``fsync`` and each round's
        :class:`~bluesky_xsml.training.config.FineTuneConfig` (``distill`` 1.0
        by default here: the live model should not forget). The synthetic
        data are loaded once, on the training thread.
    **options
        Fields of either config, as keywords (``min_labels=4, steps=100``);
        they override ``config``'s.
    """

    def __init__(self, tagger, directory: str | os.PathLike,
                 config: LiveFineTuneConfig | None = None, **options):
        self.config = config = LiveFineTuneConfig.resolve(config, options)
        ft = config.finetune
        self.tagger = tagger
        self.directory = Path(directory)
        self.min_labels = config.min_labels
        #: The per-round settings as a dict (what this attribute held before the config).
        self.options = {k: getattr(ft, k) for k in ("steps", "batch_size", "lr",
                                                    "max_forgetting", "min_improvement",
                                                    "seed", "freeze", "distill")}
        self.auto = config.auto
        self.nice = config.nice
        self.pause = config.pause
        fsync = config.fsync
        self._synthetic_src, self._synthetic_val_src = ft.synthetic, ft.synthetic_val
        self._synthetic: Any = None
        self._synthetic_val: Any = None
        self._original_before: dict[str, float] = {}
        cfg = tagger.preprocess_config
        self.replay = ReplayStore(self.directory / "replay.zarr",
                                  input_shape=(tagger.net.config.in_channels, cfg.size, cfg.size),
                                  tags=tagger.tags, fsync=fsync)
        self.registry = CheckpointRegistry(self.directory / "checkpoints")
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._round_done = threading.Condition()
        self._force = False
        self._state = "idle"
        self._rounds = 0
        self._promoted = 0
        self._kept = 0
        self._step = 0
        self._planned = 0
        self._last_report: dict | None = None
        self._last_error: str | None = None
        self._total_steps = 0
        self._ingest: queue.SimpleQueue = queue.SimpleQueue()
        self._ingest_pending = 0
        self._ingest_done = threading.Condition()
        self._ingest_errors = 0
        if self.registry.active_id is None:
            self.registry.add(tagger, promote=True, reason="starting checkpoint",
                              extra={"replay_rows": len(self.replay)})
        elif self.registry.active_id != tagger.checkpoint_id:
            log.info("resuming fine-tuned checkpoint %s", self.registry.active_id)
            self._swap_in(self.registry.active_id)
        self._trained_rows = self._rows_trained_at_start()
        self.registry.add_listener(self._on_activate)
        self._thread = threading.Thread(target=self._loop, name="xsml-finetune", daemon=True)
        self._thread.start()
        self._ingest_thread = threading.Thread(target=self._ingest_loop, name="xsml-labels",
                                               daemon=True)
        self._ingest_thread.start()
        if self.auto and self._pending_train() >= self.min_labels:
            self._wake.set()

    # ------------------------------------------------------------------ labels
    def add_labels(self, inputs, labels, provenance: Sequence[Mapping] | None = None, *,
                   tags: Sequence[str] | None = None) -> dict:
        """Append labeled frames durably and wake the trainer; returns a receipt.

        Parameters
        ----------
        inputs : array_like
            ``(n, C, S, S)`` preprocessed inputs.
        labels : array_like
            ``(n, len(tags))``: 1, 0 or ``NaN`` (unknown).
        provenance : sequence of dict, optional
            Where each label came from (run uid, stream, seq_num, key, source...).
        tags : sequence of str, optional
            Column names of ``labels`` (default: the store's tags).

        Returns
        -------
        dict
            ``rows`` (replay row numbers), ``holdout`` (per row), ``replay_rows``,
            ``pending`` (training labels not yet trained on), ``stored`` (True).
        """
        x = np.asarray(inputs)
        n = 1 if x.ndim == 3 else len(x)
        prov = [dict(p) for p in (provenance or [{} for _ in range(n)])]
        with self._lock:
            start = len(self.replay)
            for i, p in enumerate(prov):
                p["holdout"] = (start + i) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
            rows = self.replay.append(x, labels, prov, tags=tags)
        pending = self._pending_train()
        if self.auto and pending >= self.min_labels:
            self._wake.set()
        return {"stored": True, "rows": rows, "holdout": [p["holdout"] for p in prov],
                "replay_rows": len(self.replay), "pending": pending}

    def add_labels_async(self, inputs, labels, provenance=None, *, tags=None) -> None:
        """Queue labels for a background append (for callers that must not wait)."""
        with self._ingest_done:
            self._ingest_pending += 1
        self._ingest.put((inputs, labels, provenance, tags))

    def flush_labels(self, timeout: float | None = 30.0) -> bool:
        """Wait until queued labels (:meth:`add_labels_async`) are on disk."""
        with self._ingest_done:
            return self._ingest_done.wait_for(lambda: self._ingest_pending == 0, timeout)

    def _ingest_loop(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._ingest.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                inputs, labels, prov, tags = item
                self.add_labels(inputs, labels, prov, tags=tags)
            except Exception:
                self._ingest_errors += 1
                log.exception("xsml could not store labels")
            finally:
                with self._ingest_done:
                    self._ingest_pending -= 1
                    self._ingest_done.notify_all()

    # ---------------------------------------------------------------- control
    def retrain_now(self, *, wait: bool = False, timeout: float | None = None) -> dict:
        """Start a fine-tuning round now (on every training label when none is new).

        With ``wait``, block until that round ends and return its report;
        otherwise return the status.
        """
        with self._round_done:
            target = self._rounds + 1
            self._force = True
        self._wake.set()
        if not wait:
            return {"queued": True, **self.status()}
        with self._round_done:
            self._round_done.wait_for(lambda: self._rounds >= target or self._stop.is_set(),
                                      timeout)
        return dict(self._last_report or {"error": self._last_error})

    def status(self) -> dict:
        """JSON-able state of the fine-tuner."""
        return {
            "state": self._state,
            "active_id": self.registry.active_id,
            "live_checkpoint": self.tagger.checkpoint_id,
            "labels": len(self.replay),
            "labels_pending": self._pending_train(),
            "labels_queued": self._ingest_pending,
            "label_errors": self._ingest_errors,
            "min_labels": self.min_labels,
            "auto": self.auto,
            "rounds": self._rounds,
            "promoted": self._promoted,
            "kept": self._kept,
            "step": self._step,
            "steps_planned": self._planned,
            "checkpoints": len(self.registry),
            "tags": list(self.replay.tags),
            "last_report": self._last_report,
            "last_error": self._last_error,
            "directory": str(self.directory),
        }

    def close(self, timeout: float = 30.0) -> None:
        """Stop the threads (a running round stops at its next step, unregistered)."""
        self.flush_labels(timeout)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self._ingest_thread.join(timeout)

    # ---------------------------------------------------------------- helpers
    def _rows_trained_at_start(self) -> int:
        recs = [r for r in self.registry.list() if "replay_rows" in (r.get("extra") or {})]
        if not recs:
            return 0
        return min(len(self.replay), max(int(r["extra"]["replay_rows"]) for r in recs))

    def _pending_train(self) -> int:
        n = len(self.replay)
        a = self._trained_rows if hasattr(self, "_trained_rows") else 0
        return sum(1 for i in range(a, n) if i % HOLDOUT_EVERY != HOLDOUT_EVERY - 1)

    def _on_activate(self, record: dict) -> None:
        try:
            self._swap_in(record["checkpoint_id"])
        except Exception as err:
            self._last_error = f"swap to {record['checkpoint_id']} failed: {err}"
            log.exception("xsml could not swap in checkpoint %s", record["checkpoint_id"])

    def _swap_in(self, checkpoint_id: str) -> None:
        if checkpoint_id == self.tagger.checkpoint_id:
            return
        new = self.registry.load(checkpoint_id, device=self.tagger.device,
                                 precision=self.tagger.precision)
        allow = new.tags != self.tagger.tags
        self.tagger.swap_weights(new, allow_tag_change=allow)
        log.info("xsml live tagger now runs checkpoint %s", checkpoint_id)

    def _lower_priority(self) -> None:
        if self.nice and hasattr(os, "setpriority"):
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
            except OSError:  # pragma: no cover - not allowed here
                log.debug("could not renice the fine-tuning thread")

    def _loop(self) -> None:
        self._lower_priority()
        while not self._stop.is_set():
            self._wake.wait(0.5)
            if self._stop.is_set():
                break
            if not self._wake.is_set():
                continue
            self._wake.clear()
            with self._round_done:
                force, self._force = self._force, False
            if not force and not (self.auto and self._pending_train() >= self.min_labels):
                continue
            self._state = "training"
            failed = False
            try:
                self._round(force)
                self._last_error = None
            except Exception as err:  # noqa: BLE001 - a failed round is recorded; tagging goes on
                failed = True
                self._last_error = f"{type(err).__name__}: {err}"
                log.error("xsml fine-tuning round failed:\n%s", traceback.format_exc())
            finally:
                self._state = "idle"
                with self._round_done:
                    self._rounds += 1
                    self._round_done.notify_all()
            # after a failure only new labels or retrain_now() start the next round
            if not failed and self.auto and self._pending_train() >= self.min_labels:
                self._wake.set()

    def _round(self, force: bool) -> None:
        if self._synthetic is None and self._synthetic_src is not None:
            self._synthetic = load_synthetic(self._synthetic_src, self.tagger.preprocess_config)
        if self._synthetic_val is None and self._synthetic_val_src is not None:
            self._synthetic_val = load_synthetic(self._synthetic_val_src,
                                                 self.tagger.preprocess_config)
        n_rows = len(self.replay)
        rows, labels, prov = self.replay.merged()
        hold = np.array([bool(p.get("holdout")) for p in prov], bool)
        fresh = rows >= self._trained_rows
        train_new = ~hold & fresh
        train_old = ~hold & ~fresh
        if not train_new.any():
            if not force or not train_old.any():
                self._last_report = {"passed": False, "reason": "no training labels"}
                return
            train_new, train_old = train_old, np.zeros_like(train_old)
        parent_id = self.registry.active_id
        parent = self.registry.load(parent_id)
        tags = self.replay.tags
        inputs = self.replay.inputs(rows)

        def on_step(step: int, loss: float) -> None:
            self._step = step + 1
            if self.pause:
                time.sleep(self.pause)

        ft = self.config.finetune
        self._planned = ft.steps or 0
        self._step = 0
        # the synthetic data loaded once above, and a new seed every round
        round_config = dataclasses.replace(ft, synthetic=self._synthetic,
                                           synthetic_val=self._synthetic_val,
                                           seed=ft.seed + self._rounds)
        new, report = finetune(
            parent, inputs[train_new], labels[train_new], config=round_config, tags=tags,
            val_inputs=inputs[hold], val_labels=labels[hold],
            replay_inputs=inputs[train_old] if train_old.any() else None,
            replay_labels=labels[train_old] if train_old.any() else None,
            original_before=self._original_before.get(parent_id),
            should_stop=self._stop.is_set,
            on_step=on_step)
        if self._stop.is_set():
            return
        if math.isfinite(report.original_before):
            self._original_before[parent_id] = report.original_before
        self._total_steps += report.steps
        parent_rec = self.registry.get(parent_id)
        self.registry.add(new, parent_id=parent_id,
                          step=int(parent_rec.get("step", 0)) + report.steps,
                          label_counts=self.replay.label_counts(), metrics=report.to_dict(),
                          promote=report.passed, reason=report.reason,
                          extra={"replay_rows": n_rows})
        self._trained_rows = n_rows
        self._last_report = report.to_dict()
        if report.passed:
            self._promoted += 1
        else:
            self._kept += 1
            log.info("xsml fine-tuned checkpoint %s kept, not promoted: %s", new.checkpoint_id,
                     report.reason)

    def __repr__(self) -> str:
        return f"<LiveFineTuner {str(self.directory)!r} active {self.registry.active_id}>"
