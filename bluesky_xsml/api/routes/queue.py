"""Queue-server actions waiting for a person: list, approve, reject (the last two keyed).

Present when the app was made with ``create_app(..., queue_steering=steering)``
(a :class:`~bluesky_xsml.steering.queue.QueueSteering`); otherwise every route
answers 409 and says how to attach one.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Request
from pydantic import BaseModel, ConfigDict, Field

from ...steering.queue import QueueAction, QueueSteeringError
from .deps import ERRORS, KEYED, require_key

router = APIRouter(prefix="/api/queue", tags=["queue"], responses=ERRORS)

DecisionUid = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,128}$",
                                  description="uid of the decision whose action waits")]

NO_QUEUE = ("no queue steering is attached to this service: pass queue_steering=QueueSteering"
            "(...) to create_app or serve")


class PendingOut(BaseModel):
    require_approval: bool
    pending: list[QueueAction]


class RejectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field("", max_length=500)


def get_steering(request: Request):
    steering = getattr(request.app.state, "queue_steering", None)
    if steering is None:
        raise HTTPException(409, NO_QUEUE)
    return steering


@router.get("/pending", response_model=PendingOut)
def pending(steering=Depends(get_steering)) -> dict:
    """Queue-server actions waiting for approval, oldest first."""
    return {"require_approval": steering.require_approval, "pending": steering.pending}


@router.post("/{uid}/approve", response_model=QueueAction, dependencies=[Depends(require_key)],
             responses=KEYED)
def approve(uid: DecisionUid, steering=Depends(get_steering)) -> QueueAction:
    """Carry out the pending action of decision ``uid`` now (404: none pending)."""
    try:
        return steering.approve(uid)
    except QueueSteeringError as err:
        raise HTTPException(404, str(err)) from None


@router.post("/{uid}/reject", response_model=QueueAction, dependencies=[Depends(require_key)],
             responses=KEYED)
def reject(uid: DecisionUid, body: Annotated[RejectIn | None, Body()] = None,
           steering=Depends(get_steering)) -> QueueAction:
    """Drop the pending action of decision ``uid`` (recorded as rejected, with the reason)."""
    try:
        return steering.reject(uid, reason=body.reason if body is not None else "")
    except QueueSteeringError as err:
        raise HTTPException(404, str(err)) from None
