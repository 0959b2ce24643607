"""Deterministic partitioning of runs across N tagging workers.

Every worker on the document bus sees every document; each one tags only the
runs of its own partition, so that with workers ``0/N ... N-1/N`` running,
every frame is tagged by exactly one of them. The partition of a run is a
stable hash of its start document's uid (sha256, not Python's salted
``hash``), so every worker process, on every machine and after every restart,
agrees on it without talking to the others.

Partitioning by run keeps a run's tag stream in one writer (one descriptor,
one summary). A site whose single runs are too big for one GPU can partition
by (run, detector key) instead with :meth:`Partition.owns_key`; the run's
tag streams are then one per detector.

Examples
--------
>>> from bluesky_xsml.scaleout.partition import Partition, partition_of
>>> p = Partition.parse("1/3")
>>> p
Partition(index=1, count=3)
>>> partition_of("6f1e1c3e-5f43-4e7a-9a55-0d1b8c7cf2a4", 3)
0
>>> p.owns("6f1e1c3e-5f43-4e7a-9a55-0d1b8c7cf2a4")
False
>>> Partition(0, 3).owns("6f1e1c3e-5f43-4e7a-9a55-0d1b8c7cf2a4")
True
>>> sum(Partition(i, 3).owns("any-uid") for i in range(3))
1
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = ["Partition", "partition_of"]


def partition_of(key: str, count: int) -> int:
    """The partition (``0 <= p < count``) of ``key``: sha256 of its UTF-8 bytes, mod ``count``.

    Parameters
    ----------
    key : str
        A run's start uid (or ``f"{uid}/{data_key}"`` for detector partitioning).
    count : int
        Number of partitions (workers), at least 1.
    """
    if count < 1:
        raise ValueError(f"the number of partitions must be >= 1, got {count}")
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


@dataclass(frozen=True)
class Partition:
    """Worker ``index`` of ``count`` (written ``"index/count"`` on the command line)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"partition count must be an integer >= 1, got {self.count!r}")
        if not isinstance(self.index, int) or not 0 <= self.index < self.count:
            raise ValueError(f"partition index must be in 0..{self.count - 1}, got {self.index!r}")

    @classmethod
    def parse(cls, text: str) -> Partition:
        """Parse ``"i/N"`` (e.g. ``"0/2"``).

        Raises
        ------
        ValueError
            If ``text`` is not two integers ``i/N`` with ``0 <= i < N``.

        Examples
        --------
        >>> Partition.parse("2/2")
        Traceback (most recent call last):
        ...
        ValueError: partition index must be in 0..1, got 2
        """
        parts = str(text).strip().split("/")
        try:
            index, count = (int(p) for p in parts)
        except ValueError:
            raise ValueError(
                f"a partition is written 'i/N' with integers, e.g. '0/2'; got {text!r}") from None
        return cls(index, count)

    def owns(self, run_uid: str) -> bool:
        """Whether this worker tags the run with start uid ``run_uid``."""
        return partition_of(run_uid, self.count) == self.index

    def owns_key(self, run_uid: str, data_key: str) -> bool:
        """Whether this worker tags detector ``data_key`` of run ``run_uid``."""
        return partition_of(f"{run_uid}/{data_key}", self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"
