"""The label cache: the last frames a tagging callback tagged, kept for labeling.

It holds each frame's preprocessed input (float16) and, once tagged, its
probabilities, so a frame can be labeled after the fact and the least certain
frames suggested for labeling. Plain numpy: the RunEngine's process keeps it
without importing torch, whichever process tags the frames.
"""

from __future__ import annotations

import collections
import threading
import time

import numpy as np

__all__ = ["FrameCache"]


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
            if key is None:
                hits = [i for i in self._entries if i[0] == run_uid and i[1] == stream
                        and i[2] == int(seq_num) and i[4] == int(frame_index)]
                keys = sorted({i[3] for i in hits})
                if len(keys) > 1:
                    raise KeyError(f"event {seq_num} of stream {stream!r} has several image "
                                   f"keys {keys}; pass key=")
                ident = hits[0] if hits else None
            else:
                ident = (run_uid, stream, int(seq_num), key, int(frame_index))
                ident = ident if ident in self._entries else None
            if ident is None:
                raise KeyError(
                    f"frame {frame_index} of event {seq_num} (stream {stream!r}, key "
                    f"{key!r}) of run {run_uid!r} is not in the label cache, which keeps the "
                    f"last {self.max_frames} tagged frames; label frames while they are recent "
                    "(or raise label_cache_size)")
            return ident, self._entries[ident]

    def mark_labeled(self, ident: tuple) -> None:
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
