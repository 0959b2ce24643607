"""The outcome for one source frame: :class:`FrameResult`.

Below documents and inference (``docs/decisions/0004-layers.md``): inference
produces results, documents turn them into the tag stream
(:mod:`bluesky_xsml.documents.compose`, which re-exports the class).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FrameResult"]


@dataclass
class FrameResult:
    """The outcome for one source frame."""

    stream: str
    seq_num: int
    event_uid: str
    key: str
    frame_index: int
    probs: Sequence[float] | None  # None when skipped
    skip_reason: str = ""
    checkpoint: str = ""
    tags: tuple[str, ...] = ()
    latency: float = math.nan
    time: float = field(default_factory=time.time)
    novelty: float = math.nan
    novel: bool = False
    embedding: Any = None  # (D,) float16 array, or None
