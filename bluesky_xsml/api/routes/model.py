"""The model: thresholds, labels for fine-tuning, checkpoints and retraining."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, Body, Depends, HTTPException, Path, Query

from ...errors import CheckpointError, ConfigurationError
from ..schemas import (
    CheckpointOut,
    CheckpointsOut,
    FinetuneOut,
    LabelIn,
    LabelsOut,
    SuggestionsOut,
    ThresholdsIn,
    ThresholdsOut,
    finite,
)
from .deps import ERRORS, KEYED, get_callback, get_finetuner, require_key

router = APIRouter(prefix="/api", tags=["model"], responses=ERRORS)

CheckpointId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,128}$",
                                   description="content id of a registered checkpoint")]


def _message(err: BaseException) -> str:
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


# ------------------------------------------------------------------ thresholds
def _thresholds(tagger) -> dict:
    defaults = getattr(tagger, "default_thresholds", tagger.thresholds)
    return {"tags": list(tagger.tags),
            "thresholds": {t: round(float(v), 6)
                           for t, v in zip(tagger.tags, tagger.thresholds, strict=True)},
            "defaults": {t: round(float(v), 6) for t, v in zip(tagger.tags, defaults, strict=True)}}


@router.get("/thresholds", response_model=ThresholdsOut)
def read_thresholds(callback=Depends(get_callback)) -> dict:
    """The live model's tags and per-tag decision thresholds."""
    return _thresholds(callback.tagger)


@router.put("/thresholds", response_model=ThresholdsOut, dependencies=[Depends(require_key)],
            responses=KEYED)
def set_thresholds(body: ThresholdsIn, callback=Depends(get_callback)) -> dict:
    """Set the thresholds of some tags (the others keep theirs).

    They apply from the next batch; activating a checkpoint brings that
    checkpoint's thresholds back.
    """
    tagger = callback.tagger
    with tagger.hold():  # between inference batches
        tags = list(tagger.tags)
        unknown = sorted(set(body.thresholds) - set(tags))
        if unknown:
            raise HTTPException(422, f"unknown tags {unknown}; the model's tags are {tags}")
        new = np.array(tagger.thresholds, np.float32, copy=True)
        for t, v in body.thresholds.items():
            new[tags.index(t)] = v
        tagger.thresholds = new
    return _thresholds(tagger)


# ---------------------------------------------------------------------- labels
@router.post("/labels", response_model=LabelsOut, dependencies=[Depends(require_key)],
             responses=KEYED)
def post_labels(body: Annotated[LabelIn | list[LabelIn], Body(
        description="one label or a list of up to 1000",
        openapi_examples={"one": {"value": {"run_uid": "…", "seq_num": 3,
                                            "tags": {"ring_oriented": True}}}})],
                callback=Depends(get_callback)) -> dict:
    """Label recently tagged frames (corrections feed fine-tuning).

    Each label names a frame (run, ``seq_num``, ``stream``, ``key``,
    ``frame_index``) and maps tags to true (present), false (absent) or null
    (unknown); tags not given stay unknown. Every frame is checked before any
    label is stored: a frame no longer cached fails the whole request (404).
    """
    labels = body if isinstance(body, list) else [body]
    if not labels:
        raise HTTPException(422, "no labels given: send one label object or a non-empty list")
    if len(labels) > 1000:
        raise HTTPException(422, f"{len(labels)} labels in one request; send at most 1000")
    if getattr(callback, "finetuner", None) is None:
        from .deps import NO_FINETUNER

        raise HTTPException(409, NO_FINETUNER)
    for lab in labels:  # all frames must be there before anything is stored
        try:
            callback.frame_cache.find(lab.run_uid, lab.seq_num, stream=lab.stream, key=lab.key,
                                      frame_index=lab.frame_index)
        except KeyError as err:
            raise HTTPException(404, _message(err)) from None
    receipts = []
    for lab in labels:
        try:
            receipt = callback.label(lab.run_uid, lab.seq_num, stream=lab.stream, key=lab.key,
                                     frame_index=lab.frame_index, **lab.tags)
        except KeyError as err:
            raise HTTPException(404, _message(err)) from None
        except ConfigurationError as err:
            raise HTTPException(409, str(err)) from None
        except ValueError as err:
            raise HTTPException(422, str(err)) from None
        receipts.append(finite(receipt))
    return {"receipts": receipts}


@router.get("/labels/suggestions", response_model=SuggestionsOut)
def suggest_labels(k: Annotated[int, Query(ge=1, le=500)] = 10,
                   callback=Depends(get_callback)) -> dict:
    """Recent unlabeled frames the model is least sure about (label these first)."""
    return {"suggestions": finite(callback.suggest_labels(k))}


# ------------------------------------------------------------ fine-tuning
@router.get("/finetune", response_model=FinetuneOut)
def finetune_status(finetuner=Depends(get_finetuner)) -> dict:
    """State of live fine-tuning (409 when it is not enabled)."""
    return finite(finetuner.status())


@router.post("/retrain", response_model=FinetuneOut, status_code=202,
             dependencies=[Depends(require_key)], responses=KEYED)
def retrain(finetuner=Depends(get_finetuner)) -> dict:
    """Start a fine-tuning round now; poll ``/api/finetune`` or ``/api/checkpoints``."""
    return finite(finetuner.retrain_now())


@router.get("/checkpoints", response_model=CheckpointsOut)
def list_checkpoints(finetuner=Depends(get_finetuner)) -> dict:
    """Registered checkpoints, oldest first, and which one is active."""
    return {"active_id": finetuner.registry.active_id,
            "live_checkpoint": finetuner.tagger.checkpoint_id,
            "checkpoints": finite(finetuner.registry.list())}


@router.post("/checkpoints/rollback", response_model=CheckpointOut,
             dependencies=[Depends(require_key)], responses=KEYED)
def rollback_checkpoint(finetuner=Depends(get_finetuner)) -> dict:
    """Go back to the checkpoint active before the current one."""
    try:
        return finite(finetuner.registry.rollback())
    except CheckpointError as err:
        raise HTTPException(409, str(err)) from None


@router.post("/checkpoints/{checkpoint_id}/activate", response_model=CheckpointOut,
             dependencies=[Depends(require_key)], responses=KEYED)
def activate_checkpoint(checkpoint_id: CheckpointId, finetuner=Depends(get_finetuner)) -> dict:
    """Make a registered checkpoint the live model (swapped in between batches)."""
    try:
        return finite(finetuner.registry.activate(checkpoint_id))
    except KeyError as err:
        raise HTTPException(404, _message(err)) from None
    except CheckpointError as err:
        raise HTTPException(409, str(err)) from None
