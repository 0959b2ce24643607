"""The label cache: the last frames a tagging callback tagged, kept for labeling.

:class:`FrameCache` holds each frame's preprocessed input (float16) and, once
tagged, its probabilities, so a frame can be labeled after the fact and the
least certain frames suggested for labeling. Plain numpy, no torch. It lives
where the model runs: in the RunEngine's process with ``isolation="thread"``,
in the tagging process with ``isolation="process"``, where the RunEngine's
process keeps only the frames' keys (:class:`FrameKeys`) and forwards labels.
"""

from __future__ import annotations

import collections
import threading
import time

import numpy as np

__all__ = ["FrameCache", "FrameKeys", "LabelCacheLost"]


class FrameCache:
    """The last frames a callback tagged: preprocessed inputs and probabilities.

    Bounded (oldest frames are forgotten first); labeling a frame after the
    fact and suggesting which frames to label read from it. One entry costs
    ``C * S * S * 2`` bytes (192 KiB for the default 6 x 128 x 128 inputs), so
    the default 2,000 frames take about 400 MB.

    Parameters
    ----------
    max_frames : int
        Frames kept (0 keeps none: labeling after the fact is then impossible).
    """

    def __init__(self, max_frames: int = 2000):
        if max_frames < 0:
            raise ValueError(f"max_frames must be >= 0, got {max_frames}")
        self.max_frames = int(max_frames)
        self._entries: collections.OrderedDict[tuple, dict] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def put_inputs(self, items) -> None:
        """``[(job, frame_index, input), ...]`` from the inference worker."""
        if not self.max_frames:
            return
        with self._lock:
            for job, idx, x in items:
                ident = (job.run_uid, job.stream, int(job.seq_num), job.key, int(idx))
                self._entries[ident] = {"input": np.asarray(x, np.float16), "probs": None,
                                        "labeled": False, "time": time.time()}
                self._entries.move_to_end(ident)
            while len(self._entries) > self.max_frames:
                self._entries.popitem(last=False)

    def put_probs(self, run_uid: str, results, thresholds) -> None:
        """Attach probabilities (``FrameResult`` list) to cached frames."""
        th = np.asarray(thresholds, np.float32)
        with self._lock:
            for r in results:
                if r.probs is None:
                    continue
                e = self._entries.get((run_uid, r.stream, int(r.seq_num), r.key,
                                       int(r.frame_index)))
                if e is not None:
                    e["probs"] = np.asarray(r.probs, np.float32)
                    e["thresholds"] = th
                    e["checkpoint"] = r.checkpoint

    def find(self, run_uid: str, seq_num: int, *, stream: str = "primary",
             key: str | None = None, frame_index: int = 0) -> tuple[tuple, dict]:
        """The cached frame ``(identity, entry)``.

        Raises
        ------
        KeyError
            Not cached (too old, never tagged, or a wrong stream/key); when
            ``key`` is None and the event has several image keys, the message
            names them.
        """
        with self._lock:
            ident = _find_ident(self._entries, run_uid, seq_num, stream, key, frame_index,
                                self.max_frames)
            return ident, self._entries[ident]

    def get_input(self, ident: tuple) -> np.ndarray | None:
        """The cached float16 input of the frame ``ident`` (None if it is not cached)."""
        with self._lock:
            e = self._entries.get(tuple(ident))
            return None if e is None else e["input"]

    def mark_labeled(self, ident: tuple) -> None:
        """Leave ``ident`` out of :meth:`suggest` from now on."""
        with self._lock:
            if ident in self._entries:
                self._entries[ident]["labeled"] = True

    def suggest(self, k: int) -> list[dict]:
        """The ``k`` unlabeled cached frames the model is least sure about.

        Per tag, uncertainty is 1 at the decision threshold and 0 at
        probability 0 or 1 (linear in between); a frame's score is the mean of
        its three most uncertain tags.
        """
        if k < 1:
            return []
        out = []
        with self._lock:
            items = [(i, e) for i, e in self._entries.items()
                     if e["probs"] is not None and not e["labeled"]]
        for ident, e in items:
            p = e["probs"]
            th = e["thresholds"][: len(p)]
            p = p[: len(th)]
            u = np.where(p < th, p / np.maximum(th, 1e-6), (1 - p) / np.maximum(1 - th, 1e-6))
            score = float(np.sort(np.clip(u, 0, 1))[-3:].mean()) if len(u) else 0.0
            out.append({"run_uid": ident[0], "stream": ident[1], "seq_num": ident[2],
                        "key": ident[3], "frame_index": ident[4], "score": round(score, 6),
                        "checkpoint": e.get("checkpoint", "")})
        out.sort(key=lambda d: -d["score"])
        return out[:int(k)]


def _find_ident(idents, run_uid: str, seq_num: int, stream: str, key: str | None,
                frame_index: int, max_frames: int) -> tuple:
    """The identity in ``idents`` (a mapping) of one frame; KeyError as :meth:`FrameCache.find`."""
    if key is None:
        hits = [i for i in idents if i[0] == run_uid and i[1] == stream
                and i[2] == int(seq_num) and i[4] == int(frame_index)]
        keys = sorted({i[3] for i in hits})
        if len(keys) > 1:
            raise KeyError(f"event {seq_num} of stream {stream!r} has several image "
                           f"keys {keys}; pass key=")
        ident = hits[-1] if hits else None
    else:
        ident = (run_uid, stream, int(seq_num), key, int(frame_index))
        ident = ident if ident in idents else None
    if ident is None:
        raise KeyError(
            f"frame {frame_index} of event {seq_num} (stream {stream!r}, key "
            f"{key!r}) of run {run_uid!r} is not in the label cache, which keeps the "
            f"last {max_frames} tagged frames; label frames while they are recent "
            "(or raise label_cache_size)")
    return ident


class LabelCacheLost(KeyError):
    """The frame's model input was in a tagging process that has since died.

    Raised (by :meth:`FrameKeys.find`) for a frame tagged by an earlier
    tagging process (``isolation="process"``): its label cache went with it,
    so the frame can no longer be labeled; frames tagged since the restart can.
    A ``KeyError``, so the API answers it as it answers any frame not cached
    (404).
    """

    def __str__(self) -> str:  # KeyError's str() is the repr of its argument
        return str(self.args[0]) if self.args else ""


class FrameKeys:
    """The RunEngine's side of a label cache that lives in the tagging process.

    It keeps only the identities ``(run_uid, stream, seq_num, key,
    frame_index)`` of the frames the tagging process cached (its
    :class:`FrameCache` holds their inputs), each with the generation of the
    tagging process that tagged it (how many had started then), so that a
    label can be refused here, before anything crosses the pipe, when the
    frame is gone: too old, never tagged, or tagged by a process that has died
    since (:class:`LabelCacheLost`, counted in :attr:`refused`).

    Parameters
    ----------
    max_frames : int
        Frames remembered; the tagging process's cache keeps as many.
    generation : callable
        The current tagging process's generation (``worker.process_starts``).
    """

    def __init__(self, max_frames: int, generation) -> None:
        if max_frames < 0:
            raise ValueError(f"max_frames must be >= 0, got {max_frames}")
        self.max_frames = int(max_frames)
        self.generation = generation
        self._entries: collections.OrderedDict[tuple, int] = collections.OrderedDict()
        self._labeled: set[tuple] = set()
        self._lock = threading.Lock()
        #: Labels refused because the frame's input died with its tagging process.
        self.refused = 0

    def __len__(self) -> int:
        """Frames that can still be labeled (tagged by the running tagging process)."""
        gen = self.generation()
        with self._lock:
            return sum(1 for g in self._entries.values() if g == gen)

    def put_results(self, run_uid: str, results) -> None:
        """Remember the frames of ``results`` (``FrameResult`` list) that were tagged."""
        if not self.max_frames:
            return
        gen = self.generation()
        with self._lock:
            for r in results:
                if r.probs is None:
                    continue
                ident = (run_uid, r.stream, int(r.seq_num), r.key, int(r.frame_index))
                self._entries[ident] = gen
                self._entries.move_to_end(ident)
                self._labeled.discard(ident)
            while len(self._entries) > self.max_frames:
                old, _ = self._entries.popitem(last=False)
                self._labeled.discard(old)

    def find(self, run_uid: str, seq_num: int, *, stream: str = "primary",
             key: str | None = None, frame_index: int = 0,
             record: bool = True) -> tuple[tuple, dict]:
        """The frame's ``(identity, {"generation": g})``.

        ``record=False``: a refusal is not counted in :attr:`refused` (a look-up
        that is no label, e.g. for a thumbnail).

        Raises
        ------
        LabelCacheLost
            The frame was tagged by a tagging process that has died since.
        KeyError
            Not cached (too old, never tagged, or a wrong stream/key).
        """
        with self._lock:
            ident = _find_ident(self._entries, run_uid, seq_num, stream, key, frame_index,
                                self.max_frames)
            gen = self._entries[ident]
        if gen != self.generation():
            if record:
                self.refused += 1
            raise LabelCacheLost(
                f"frame {ident[4]} of event {ident[2]} (stream {ident[1]!r}, key "
                f"{ident[3]!r}) of run {ident[0]!r} was tagged by a tagging process that "
                "has stopped since (it was restarted); the label cache of model inputs lived "
                "in that process and was lost with it, so this frame can no longer be "
                "labeled (frames tagged since the restart can)")
        return ident, {"generation": gen}

    def mark_labeled(self, ident: tuple) -> None:
        with self._lock:
            if ident in self._entries:
                self._labeled.add(ident)
