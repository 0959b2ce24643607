"""Frame results: the latest frames, runs frame by frame, thumbnails."""

from __future__ import annotations

import io
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Path, Query
from fastapi.responses import Response

from ..schemas import FramesOut, RunFramesOut, RunsOut, RunSummary, SimilarOut
from ..state import ServiceState
from .deps import ERRORS, get_callback, get_state

router = APIRouter(prefix="/api", tags=["frames"], responses=ERRORS)

RunUid = Annotated[str, Path(min_length=1, max_length=128, description="run start uid")]
Stream = Annotated[str, Query(min_length=1, max_length=128)]
Key = Annotated[str | None, Query(min_length=1, max_length=128,
                                  description="image data key (needed when an event has several)")]
SeqNum = Annotated[int, Path(ge=0, le=2**53)]
FrameIndex = Annotated[int, Query(ge=0, le=2**31)]


@router.get("/frames/latest", response_model=FramesOut)
async def latest_frames(n: Annotated[int, Query(ge=0, le=2000)] = 50,
                  after: Annotated[int | None, Query(ge=-1, le=2**62,
                                                     description="only results with a larger id")]
                  = None,
                  tag: Annotated[str | None, Query(min_length=1, max_length=64,
                                                   description="only frames with this tag")]
                  = None,
                  state: ServiceState = Depends(get_state)) -> dict:
    """The newest ``n`` tag results, oldest first."""
    return Response(state.latest_json(n, after=after, tag=tag), media_type="application/json")


@router.get("/runs", response_model=RunsOut)
def list_runs(state: ServiceState = Depends(get_state)) -> dict:
    """Runs the service has results for, newest first."""
    return {"runs": state.runs()}


@router.get("/runs/{run_uid}", response_model=RunSummary)
def read_run(run_uid: RunUid, state: ServiceState = Depends(get_state)) -> dict:
    """One run's frame and tag counts."""
    run = state.run(run_uid)
    if run is None:
        raise HTTPException(404, _unknown_run(run_uid, state))
    return run


@router.get("/runs/{run_uid}/frames", response_model=RunFramesOut)
def run_frames(run_uid: RunUid, offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
               limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
               state: ServiceState = Depends(get_state)) -> dict:
    """The tags of a run, frame by frame, in the order they were tagged."""
    got = state.run_frames(run_uid, offset, limit)
    if got is None:
        raise HTTPException(404, _unknown_run(run_uid, state))
    total, frames = got
    return {"run_uid": run_uid, "total": total, "offset": offset, "frames": frames}


@router.get("/runs/{run_uid}/frames/{seq_num}/similar", response_model=SimilarOut)
def similar_frames(run_uid: RunUid, seq_num: SeqNum, stream: Stream = "primary", key: Key = None,
                   frame_index: FrameIndex = 0, k: Annotated[int, Query(ge=1, le=100)] = 10,
                   state: ServiceState = Depends(get_state)) -> dict:
    """The ``k`` remembered frames most like one frame (cosine similarity of embeddings).

    Searches the frames the service remembers (its recent runs); for stored
    runs use ``xsml similar`` or :func:`bluesky_xsml.query.find_similar`.
    The list is empty when the tagger has no novelty statistics (no embeddings).
    """
    got = state.similar(run_uid, seq_num, stream=stream, key=key, frame_index=frame_index, k=k)
    if got is None:
        raise HTTPException(404, f"no result for frame {frame_index} of event {seq_num} "
                                 f"(stream {stream!r}, key {key!r}) of run {run_uid!r}")
    record, frames = got
    return {"query": record, "frames": frames,
            "searched": "frames of the runs this service remembers"}


def _unknown_run(run_uid: str, state: ServiceState) -> str:
    known = [r["run_uid"] for r in state.runs()][:5]
    return (f"no results for run {run_uid!r}; the service keeps the last "
            f"{state.settings.max_runs} runs (recent: {known})")


@router.get("/runs/{run_uid}/frames/{seq_num}/thumbnail.png",
            responses={200: {"content": {"image/png": {}},
                             "description": "log-scaled preview; tags in X-XSML-Tags"}},
            response_class=Response)
def thumbnail(run_uid: RunUid, seq_num: SeqNum, stream: Stream = "primary", key: Key = None,
              frame_index: FrameIndex = 0,
              scale: Annotated[int, Query(ge=1, le=4, description="pixel repetition")] = 1,
              state: ServiceState = Depends(get_state), callback=Depends(get_callback)):
    """A log-scaled PNG preview of a recent frame, with its tags.

    The tags come in the ``X-XSML-Tags`` header and the PNG's ``xsml:tags``
    text chunk. Masked pixels and pixels outside the detector are grey-blue.
    """
    record, thumb = state.find_frame(run_uid, seq_num, stream=stream, key=key,
                                     frame_index=frame_index)
    if thumb is None:
        raise HTTPException(404, f"no thumbnail for frame {frame_index} of event {seq_num} "
                                 f"(stream {stream!r}, key {key!r}) of run {run_uid!r}: "
                                 f"{state.no_thumbnail_reason()}")
    tags = ",".join(record["tags"]) if record else ""
    png = render_png(thumb.image, thumb.invalid, scale=scale, text={"xsml:tags": tags})
    return Response(png, media_type="image/png",
                    headers={"X-XSML-Tags": tags, "Cache-Control": "max-age=3600"})


def _lut() -> np.ndarray:
    anchors = np.array([(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66),
                        (245, 125, 21), (250, 193, 39), (252, 255, 164)], np.float32)
    x = np.linspace(0, len(anchors) - 1, 256)
    return np.stack([np.interp(x, np.arange(len(anchors)), anchors[:, c]) for c in range(3)],
                    axis=1).astype(np.uint8)


_LUT = _lut()
_MASKED = np.array([60, 70, 90], np.uint8)


def render_png(image: np.ndarray, invalid: np.ndarray, *, scale: int = 1,
               text: dict[str, str] | None = None) -> bytes:
    """An 8-bit intensity image and a mask -> colour PNG bytes (inferno-like map)."""
    from PIL import Image, PngImagePlugin

    rgb = _LUT[image]
    rgb[invalid] = _MASKED
    if scale > 1:
        rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb), "RGB").save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()
