"""The RunEngine's view of the model, registry and fine-tuner in the tagging process.

:class:`RemoteTagger`, :class:`RemoteRegistry` and :class:`RemoteFineTuner`
stand in, in the RunEngine's process, for the
:class:`~bluesky_xsml.Tagger`, the checkpoint registry and the
:class:`~bluesky_xsml.training.live.LiveFineTuner` that live in the tagging
process (:mod:`bluesky_xsml.inference.process`); every method is a call over
:meth:`ProcessInferenceWorker.call <bluesky_xsml.inference.process.ProcessInferenceWorker.call>`.
Moved out of :mod:`~bluesky_xsml.inference.process`, which re-exports them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

__all__ = ["ProcessLink", "RemoteFineTuner", "RemoteRegistry", "RemoteTagger"]


class ProcessLink(Protocol):
    """What the remote views need of
    :class:`~bluesky_xsml.inference.process.ProcessInferenceWorker`."""

    tagger: RemoteTagger

    def call(self, target: str, method: str, args: tuple = (), kwargs: dict | None = None, *,
             wait: bool = True, timeout: float | None = 120.0) -> Any: ...

    def enable_finetuning(self, directory, options: dict) -> dict: ...


class RemoteDevice:
    """``tagger.device`` for the RunEngine's side: its name and type."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.type = name.split(":")[0]

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"device({self.name!r})"


class RemoteTagger:
    """What the RunEngine's process knows of the model in the tagging process.

    It answers what the callback and the service ask a :class:`Tagger`
    (``tags``, ``thresholds``, ``checkpoint_id``, ``describe()``, ``device``,
    ``uses_beam_center``, ``hold()``) from the child's last report; it runs
    nothing. Setting ``thresholds`` sends them to the tagging process, where
    they decide the tags from its next batch on.
    """

    def __init__(self, info: dict, on_thresholds: Callable[[list], None] | None = None) -> None:
        self._on_thresholds = on_thresholds
        self._lock = threading.RLock()
        self.update(info)

    def update(self, info: dict) -> None:
        with self._lock:
            self.tags: tuple[str, ...] = tuple(info["tags"])
            self._thresholds = np.asarray(info["thresholds"], np.float32)
            self.default_thresholds = np.asarray(
                info.get("default_thresholds", info["thresholds"]), np.float32)
            self.checkpoint_id: str = str(info["checkpoint_id"])
            self._describe = dict(info["describe"])
            self.device = RemoteDevice(info["device"])
            self.precision = str(info["describe"].get("precision", ""))
            self.uses_beam_center = bool(info["uses_beam_center"])
            self.pid = int(info["pid"])
            self.priority = info.get("priority", "")

    @property
    def thresholds(self) -> np.ndarray:
        """Per-tag decision thresholds (setting them reaches the tagging process)."""
        return self._thresholds

    @thresholds.setter
    def thresholds(self, values) -> None:
        new = np.asarray(values, np.float32)
        if new.shape != (len(self.tags),):
            raise ValueError(f"need one threshold per tag ({len(self.tags)}), got shape "
                             f"{new.shape}")
        with self._lock:
            self._thresholds = new
        if self._on_thresholds is not None:
            self._on_thresholds([float(v) for v in new])

    def hold(self):
        """A lock held while thresholds are changed (the child applies them between batches)."""
        return self._lock

    def describe(self) -> dict:
        out = dict(self._describe)
        out["thresholds"] = [float(t) for t in self._thresholds]
        return out

    def __repr__(self) -> str:
        return f"RemoteTagger({self.checkpoint_id}, pid {self.pid}, {self.device})"


class RemoteRegistry:
    """The tagging process's checkpoint registry, seen from the RunEngine's process."""

    def __init__(self, worker: ProcessLink) -> None:
        self._worker = worker

    @property
    def active_id(self) -> str | None:
        return self._worker.call("child", "registry_active_id")

    def list(self) -> list:
        return self._worker.call("registry", "list")

    def rollback(self, *args, **kwargs):
        return self._worker.call("registry", "rollback", args, kwargs)

    def activate(self, checkpoint_id: str, *args, **kwargs):
        return self._worker.call("registry", "activate", (checkpoint_id, *args), kwargs)

    def __len__(self) -> int:
        return self._worker.call("registry", "__len__")


class RemoteFineTuner:
    """Live fine-tuning that runs in the tagging process (the RunEngine's never trains).

    The methods the callback and the service use, answered by the
    :class:`~bluesky_xsml.training.live.LiveFineTuner` in the tagging process;
    a restarted tagging process resumes it from its directory.
    """

    def __init__(self, worker: ProcessLink, directory, options: dict) -> None:
        self._worker = worker
        self.directory = os.fspath(directory)
        self.registry = RemoteRegistry(worker)
        worker.enable_finetuning(directory, options)

    @property
    def tagger(self) -> RemoteTagger:
        return self._worker.tagger

    def add_labels(self, inputs, labels, provenance=None, *, tags=None) -> dict:
        return self._worker.call("finetuner", "add_labels",
                                 (np.asarray(inputs), np.asarray(labels), provenance),
                                 {"tags": tags})

    def add_labels_async(self, inputs, labels, provenance=None, *, tags=None) -> None:
        self._worker.call("finetuner", "add_labels_async",
                          (np.asarray(inputs), np.asarray(labels), provenance), {"tags": tags},
                          wait=False)

    def flush_labels(self, timeout: float | None = 30.0) -> bool:
        return self._worker.call("finetuner", "flush_labels", (timeout,),
                                 timeout=None if timeout is None else timeout + 30)

    def retrain_now(self, *, wait: bool = False, timeout: float | None = None) -> dict:
        return self._worker.call("finetuner", "retrain_now", (), {"wait": wait,
                                                                   "timeout": timeout},
                                 timeout=None if wait else 120.0)

    def status(self) -> dict:
        return self._worker.call("finetuner", "status")

    def close(self, timeout: float = 30.0) -> None:
        """Fine-tuning stops with the tagging process (``TaggingCallback.close``)."""
