"""Pydantic models of every request and response of the steering service.

The policy and decision models are the steering package's own
(:class:`~bluesky_xsml.steering.policy.Policy`,
:class:`~bluesky_xsml.steering.policy.Decision`), re-exported here.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from ..label_schema import RESERVED_LABEL_NAMES, LabelIn, TagName
from ..steering.policy import Decision, FrameRef, Policy

__all__ = [
    "Health", "Problem", "FrameOut", "FramesOut", "ReadoutOut", "RunSummary", "RunsOut",
    "RunFramesOut",
    "StatusOut", "ThresholdsOut", "ThresholdsIn", "LabelIn", "LabelReceipt", "LabelsOut",
    "Suggestion", "SuggestionsOut", "CheckpointOut", "CheckpointsOut", "FinetuneOut",
    "DecisionsOut", "Decision", "FrameRef", "Policy", "RESERVED_LABEL_NAMES", "finite",
]

#: Names that cannot be tags in a label (they are the frame's address).

#: A position read from a document: a number, or what a non-numeric reading became.
Position = float | int | bool | str | None


def finite(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by None, recursively.

    >>> finite({"a": float("nan"), "b": [1.0, float("inf")], "c": "x"})
    {'a': None, 'b': [1.0, None], 'c': 'x'}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalar
        return finite(value.item())
    return value


class Problem(BaseModel):
    """An error: ``detail`` says what is wrong (and how to fix it where it can)."""

    detail: str
    errors: list[dict[str, Any]] | None = None


class Health(BaseModel):
    status: str = "ok"
    version: str
    callback: bool = Field(description="a tagging callback is attached")


class FrameOut(BaseModel):
    """One source frame's tag result."""

    id: int = Field(description="position in the service's result sequence (feed cursor)")
    run_uid: str
    stream: str
    seq_num: int
    key: str
    frame_index: int
    event_uid: str = ""
    tags: list[str] = Field(default_factory=list, description="tags at or above threshold")
    probs: dict[str, float | None] | None = Field(
        default=None, description="probability per tag; null when skipped")
    skip_reason: str = ""
    checkpoint: str = ""
    latency_s: float | None = None
    time: float
    novelty: float | None = Field(None, description="novelty score; null when unavailable")
    novel: bool = Field(False, description="novelty above the model's threshold")
    scan_id: int | None = Field(None, description="the run's scan_id (start document)")
    plan_name: str = Field("", description="the run's plan_name (start document)")
    positions: dict[str, Position] = Field(
        default_factory=dict, description="motor positions read in the frame's event")


class FramesOut(BaseModel):
    frames: list[FrameOut]
    last_id: int = Field(description="id of the newest result the service holds (-1: none)")


class ReadoutOut(BaseModel):
    """A detector's readout (:class:`~bluesky_xsml.readout.Readout`): how ADU become counts."""

    gain: float = Field(description="ADU per photon")
    offset: float = Field(description="pedestal, ADU")
    read_noise: float | None = Field(None, description="read noise, ADU rms")
    saturated_value: float | None = Field(
        None, description="raw values at or above this are saturated")
    masked_values: list[float] = Field(default_factory=list,
                                       description="raw values that mark masked pixels")
    kind: str | None = Field(None, description="'counting' or 'integrating'")


class RunSummary(BaseModel):
    run_uid: str
    frames: int
    tagged: int
    skipped: int
    dropped: int = Field(0, description="frames beyond the per-run cap, not kept")
    tag_counts: dict[str, int]
    first_time: float
    last_time: float
    scan_id: int | None = None
    plan_name: str = ""
    sample: str = Field("", description="the start document's sample_name or sample")
    motors: list[str] = Field(default_factory=list, description="the start document's motors")
    state: str = Field("", description="'open' until the stop document arrives, then 'closed'")
    exit_status: str = Field("", description="the stop document's exit_status")
    reason: str = ""
    start_time: float | None = None
    stop_time: float | None = None
    fixed_positions: dict[str, Position] = Field(
        default_factory=dict, description="motor positions read in the baseline stream")
    units: dict[str, str] = Field(default_factory=dict, description="units of positions")
    precision: dict[str, int] = Field(
        default_factory=dict, description="decimals of positions, where the data key says")
    readout: dict[str, ReadoutOut] = Field(
        default_factory=dict,
        description="the detector readout the run's frames are turned into counts with, per "
                    "image key ('*': every key): the start document's xsml_readout, else the "
                    "callback's readout option; empty: the frames are taken as counts")
    readout_error: str = Field(
        "", description="why the start document's xsml_readout was refused (the run is then "
                        "tagged without a readout)")


class RunsOut(BaseModel):
    runs: list[RunSummary]


class SimilarFrame(FrameOut):
    similarity: float = Field(description="cosine similarity of the embeddings (1: identical)")


class SimilarOut(BaseModel):
    """Frames like one frame, among those the service remembers."""

    query: FrameOut
    frames: list[SimilarFrame]
    searched: str = Field(description="what was searched")


class RunFramesOut(BaseModel):
    run_uid: str
    total: int
    offset: int
    frames: list[FrameOut]


class StatusOut(BaseModel):
    """What the live tagger is doing."""

    checkpoint_id: str
    device: str
    queue_jobs: int = Field(description="frames submitted and not yet tagged")
    frames_per_s: float = Field(description="tag results per second over the last 10 s")
    latency_p50_s: float | None
    latency_p99_s: float | None
    frames_submitted: int
    frames_tagged: int
    frames_skipped: int
    skipped_by_reason: dict[str, int]
    overflow: int
    open_runs: int
    labels_ignored: int = 0
    labels_refused: int = Field(0, description=(
        "labels refused because the frame's input was lost with a tagging process that "
        "restarted (isolation='process')"))
    finetune: dict[str, Any] | None = Field(
        None, description="fine-tuning state; null when fine-tuning is not enabled")
    decision: Decision | None = None
    policy: str = Field("", description="name of the policy in force")
    feed_clients: int
    feed_dropped: int
    uptime_s: float


class ThresholdsOut(BaseModel):
    tags: list[str]
    thresholds: dict[str, float]
    defaults: dict[str, float] = Field(
        default_factory=dict, description="the thresholds the live checkpoint came with")


class ThresholdsIn(BaseModel):
    """New thresholds for some tags (others keep theirs)."""

    model_config = ConfigDict(extra="forbid")

    thresholds: dict[TagName, Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        min_length=1, max_length=512)


class LabelReceipt(BaseModel):
    model_config = ConfigDict(extra="allow")

    run_uid: str
    stream: str
    seq_num: int
    key: str
    frame_index: int
    labels: dict[str, bool | None]
    new_tags: list[str] = Field(default_factory=list)
    stored: bool = True


class LabelsOut(BaseModel):
    receipts: list[LabelReceipt]


class Suggestion(BaseModel):
    run_uid: str
    stream: str
    seq_num: int
    key: str
    frame_index: int
    score: float
    checkpoint: str = ""


class SuggestionsOut(BaseModel):
    suggestions: list[Suggestion]


class CheckpointOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    checkpoint_id: str
    parent_id: str | None = None
    step: int = 0
    tags: list[str] = Field(default_factory=list)
    created: float | None = None
    promoted: bool = False
    reason: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict)


class CheckpointsOut(BaseModel):
    active_id: str | None
    live_checkpoint: str
    checkpoints: list[CheckpointOut]


class FinetuneOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    state: str
    active_id: str | None = None
    labels: int = 0
    labels_pending: int = 0


class DecisionsOut(BaseModel):
    current: Decision
    history: list[Decision]
