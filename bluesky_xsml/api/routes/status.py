"""``/api/status``: what the live tagger is doing."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from ..schemas import StatusOut
from ..state import ServiceState
from .deps import ERRORS, get_callback, get_state

router = APIRouter(prefix="/api", tags=["status"], responses=ERRORS)


#: Seconds a computed status is reused (keeps heavy polling off the tagger).
STATUS_MAX_AGE = 0.1


@router.get("/status", response_model=StatusOut)
async def read_status(state: ServiceState = Depends(get_state),
                      callback=Depends(get_callback)):
    """Checkpoint, device, queue depth, frames/s, latency p50/p99, skips, fine-tune state.

    Figures may be up to 0.1 s old.
    """
    return JSONResponse(state.status(max_age=STATUS_MAX_AGE))
