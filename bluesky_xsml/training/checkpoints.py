"""Versioned checkpoints of fine-tuned taggers: list, activate, roll back.

A :class:`CheckpointRegistry` owns a folder::

    checkpoints/
      registry.json          records, the active id and the activation history
      <checkpoint_id>.pt     one file per checkpoint (Tagger.save: atomic, weights only)

Every record says where a checkpoint came from and how it did: content id,
parent id, fine-tuning step, label counts, validation metrics, whether it was
promoted and, when it was kept but not promoted, the reason. Files are
written before the registry that names them, both atomically (temporary file,
``fsync``, ``os.replace``), so a crash at any moment leaves the previous
registry and the active checkpoint intact. Every change is built on a copy of
the registry, saved, and only then made the registry's state, so a save that
fails (a full disk) leaves memory and file agreeing on the previous state.
Checkpoints are loaded with
``torch.load(weights_only=True)`` and their content id is verified.

Examples
--------
>>> import tempfile
>>> from bluesky_xsml import Tagger
>>> from bluesky_xsml.model import TaggerNetConfig
>>> from bluesky_xsml.training.checkpoints import CheckpointRegistry
>>> reg = CheckpointRegistry(tempfile.mkdtemp())
>>> cfg = TaggerNetConfig(widths=(8,), depths=(1,), stem_width=8)
>>> base = Tagger.untrained(seed=0, config=cfg)
>>> rec = reg.add(base, promote=True, reason="base model")
>>> reg.active_id == base.checkpoint_id, rec["status"]
(True, 'active')
>>> other = reg.add(Tagger.untrained(seed=1, config=cfg), parent_id=base.checkpoint_id,
...                 promote=False, reason="original-domain mAP fell 3.1 points")
>>> other["status"], reg.active_id == base.checkpoint_id
('kept', True)
>>> _ = reg.activate(other["checkpoint_id"]); _ = reg.rollback()
>>> reg.active_id == base.checkpoint_id
True
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..inference.tagger import Tagger
from .replay import atomic_write_json

__all__ = ["CheckpointRegistry"]

log = logging.getLogger(__name__)

_REGISTRY = "registry.json"


class CheckpointRegistry:
    """Checkpoints in a folder with one of them active.

    Parameters
    ----------
    directory : path
        Folder of the registry (created if missing).

    Notes
    -----
    Methods are thread-safe. Listeners added with :meth:`add_listener` are
    called with the new active record after :meth:`activate` and
    :meth:`rollback` (and a promoting :meth:`add`); the live fine-tuner uses
    this to swap the weights into the running tagger.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._listeners: list[Callable[[dict], None]] = []
        for tmp in self.directory.glob("*.tmp"):  # leftovers of an interrupted write
            tmp.unlink(missing_ok=True)
        path = self.directory / _REGISTRY
        if path.exists():
            try:
                state = json.loads(path.read_text())
            except ValueError as err:
                raise CheckpointError(f"checkpoint registry {str(path)!r} is unreadable: {err}"
                                      ) from err
        else:
            state = {"format": "bluesky-xsml-registry", "active": None, "history": [],
                     "checkpoints": {}}
        self._state: dict[str, Any] = state

    # ---------------------------------------------------------------- reading
    @property
    def active_id(self) -> str | None:
        """Id of the active checkpoint (``None`` for an empty registry)."""
        return self._state["active"]

    def __len__(self) -> int:
        return len(self._state["checkpoints"])

    def __contains__(self, checkpoint_id: str) -> bool:
        return checkpoint_id in self._state["checkpoints"]

    def list(self) -> list[dict]:
        """All checkpoint records, oldest first (JSON-able dicts)."""
        with self._lock:
            return [self._public(r) for r in sorted(self._state["checkpoints"].values(),
                                                   key=lambda r: r["created"])]

    def get(self, checkpoint_id: str) -> dict:
        """The record of ``checkpoint_id``.

        Raises
        ------
        KeyError
            Unknown id (the message lists the known ones).
        """
        with self._lock:
            rec = self._state["checkpoints"].get(checkpoint_id)
            if rec is None:
                known = ", ".join(self._state["checkpoints"]) or "none"
                raise KeyError(f"no checkpoint {checkpoint_id!r} in {str(self.directory)!r}; "
                               f"known: {known}")
            return self._public(rec)

    def path_of(self, checkpoint_id: str) -> Path:
        return self.directory / f"{checkpoint_id}.pt"

    def load(self, checkpoint_id: str | None = None, **kwargs):
        """The :class:`~bluesky_xsml.Tagger` of ``checkpoint_id`` (default: the active one).

        Loaded with ``weights_only=True``; the content id is verified.
        """
        cid = checkpoint_id or self.active_id
        if cid is None:
            raise CheckpointError(f"checkpoint registry {str(self.directory)!r} is empty")
        self.get(cid)
        tagger = Tagger.load(self.path_of(cid), **kwargs)
        if tagger.checkpoint_id != cid:
            raise CheckpointError(f"{self.path_of(cid)} holds {tagger.checkpoint_id}, not {cid}")
        return tagger

    # ---------------------------------------------------------------- writing
    def add(self, tagger, *, parent_id: str | None = None, step: int = 0,
            label_counts: Mapping | None = None, metrics: Mapping | None = None,
            promote: bool = False, reason: str = "", extra: Mapping | None = None) -> dict:
        """Save ``tagger`` as a checkpoint; activate it when ``promote``.

        The weights file is written (atomically) before the registry names it.
        Adding a checkpoint that is already registered updates nothing but its
        activation. Returns the record.
        """
        path = None
        with self._lock:
            new = copy.deepcopy(self._state)
            cid = tagger.checkpoint_id
            if cid not in new["checkpoints"]:
                path = tagger.save(self.path_of(tagger.checkpoint_id))
                cid = tagger.checkpoint_id  # save() recomputes the content id
                if path != self.path_of(cid):  # pragma: no cover - ids agree by construction
                    os.replace(path, self.path_of(cid))
                rec = {
                    "checkpoint_id": cid,
                    "parent_id": parent_id if parent_id is not None
                    else tagger.metadata.get("parent_id"),
                    "step": int(step),
                    "label_counts": _jsonable(label_counts or {}),
                    "metrics": _jsonable(metrics or {}),
                    "tags": list(tagger.tags),
                    "created": time.time(),
                    "promoted": bool(promote),
                    "reason": str(reason),
                    "extra": _jsonable(extra or {}),
                }
                new["checkpoints"][cid] = rec
            if promote:
                _set_active(new, cid)
            self._commit(new)
            out = self.get(cid)
        if promote:
            self._notify(out)
        return out

    def activate(self, checkpoint_id: str) -> dict:
        """Make ``checkpoint_id`` the active checkpoint (any registered one)."""
        with self._lock:
            self.get(checkpoint_id)
            if not self.path_of(checkpoint_id).exists():
                raise CheckpointError(f"checkpoint file {str(self.path_of(checkpoint_id))!r} "
                                      "is missing")
            new = copy.deepcopy(self._state)
            _set_active(new, checkpoint_id)
            self._commit(new)
            out = self.get(checkpoint_id)
        self._notify(out)
        return out

    def rollback(self) -> dict:
        """Go back to the checkpoint active before the current one.

        Raises
        ------
        CheckpointError
            Nothing to roll back to.
        """
        with self._lock:
            if len(self._state["history"]) < 2:
                raise CheckpointError("nothing to roll back to: only one checkpoint was ever "
                                      "active")
            new = copy.deepcopy(self._state)
            new["history"].pop()
            new["active"] = new["history"][-1]
            self._commit(new)  # a failed save (OSError) leaves the old state everywhere
            out = self.get(new["active"])
        self._notify(out)
        return out

    def add_listener(self, listener: Callable[[dict], None]) -> None:
        """Call ``listener(record)`` whenever the active checkpoint changes."""
        self._listeners.append(listener)

    # ---------------------------------------------------------------- helpers
    def _commit(self, new: dict) -> None:
        """Save ``new`` (atomically), then make it the state; on error nothing changes."""
        atomic_write_json(self.directory / _REGISTRY, new)
        self._state = new

    def _public(self, rec: dict) -> dict:
        out = json.loads(json.dumps(rec))
        active = rec["checkpoint_id"] == self._state["active"]
        out["active"] = active
        out["status"] = "active" if active else ("promoted" if rec["promoted"] else "kept")
        return out

    def _notify(self, record: dict) -> None:
        for listener in list(self._listeners):
            try:
                listener(record)
            except Exception:
                log.exception("checkpoint listener failed for %s", record["checkpoint_id"])

    def __repr__(self) -> str:
        return f"<CheckpointRegistry {str(self.directory)!r}: {len(self)}, active {self.active_id}>"


def _set_active(state: dict, cid: str) -> None:
    """Make ``cid`` active in ``state`` (a registry state being built)."""
    state["active"] = cid
    if not state["history"] or state["history"][-1] != cid:
        state["history"].append(cid)
    state["checkpoints"][cid]["activated"] = time.time()


def _jsonable(obj: Any) -> Any:
    """Plain JSON types; NaN and infinities become ``None`` (strict JSON)."""
    import math

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return clean(json.loads(json.dumps(obj, default=_default)))


def _default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
