"""The schema of one frame's label: checked the same way from the API and from documents.

Below both :mod:`bluesky_xsml.api` (the ``/labels`` routes) and
:mod:`bluesky_xsml.documents` (labels declared in a run's documents), so that
neither imports the other (ADR 0004).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

__all__ = ["RESERVED_LABEL_NAMES", "LabelIn", "Name", "TagName", "Uid"]

#: Keys that address a frame, so never tag names.
RESERVED_LABEL_NAMES = frozenset({"run_uid", "seq_num", "stream", "key", "frame_index", "self"})

Uid = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=128)]
TagName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]


class LabelIn(BaseModel):
    """A correction of one frame: ``tags`` maps tag names to True/False/None (unknown)."""

    model_config = ConfigDict(extra="forbid")

    run_uid: Uid
    seq_num: int = Field(ge=0, le=2**53)
    stream: Name = "primary"
    key: Name | None = None
    frame_index: int = Field(0, ge=0, le=2**31)
    tags: dict[TagName, bool | None] = Field(min_length=1, max_length=512)

    @field_validator("tags")
    @classmethod
    def _not_reserved(cls, v: dict) -> dict:
        bad = sorted(set(v) & RESERVED_LABEL_NAMES)
        if bad:
            raise ValueError(f"{bad} cannot be tag names (they address the frame)")
        return v
