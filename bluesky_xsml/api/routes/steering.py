"""Steering: the current decision with its evidence, and the policy."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from ..schemas import Decision, DecisionsOut, Policy
from ..state import ServiceState
from .deps import ERRORS, KEYED, get_state, require_key

router = APIRouter(prefix="/api", tags=["steering"], responses=ERRORS)


@router.get("/decision", response_model=Decision)
def current_decision(state: ServiceState = Depends(get_state)) -> Decision:
    """The current decision: action, reason, evidence frames, parameters."""
    return state.engine.current


@router.get("/decisions", response_model=DecisionsOut)
def decisions(n: Annotated[int, Query(ge=1, le=1000)] = 50,
              state: ServiceState = Depends(get_state)) -> dict:
    """The current decision and the last ``n`` decisions that changed something."""
    return {"current": state.engine.current, "history": state.engine.history[-n:]}


@router.get("/policy", response_model=Policy)
def read_policy(state: ServiceState = Depends(get_state)) -> Policy:
    """The policy in force (its rules, in priority order)."""
    return state.engine.policy


@router.put("/policy", response_model=Policy, dependencies=[Depends(require_key)],
            responses=KEYED)
def replace_policy(policy: Policy, state: ServiceState = Depends(get_state)) -> Policy:
    """Replace the policy; it applies from the next tagged batch."""
    state.engine.set_policy(policy)
    return state.engine.policy
