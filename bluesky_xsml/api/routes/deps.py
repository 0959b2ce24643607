"""Dependencies shared by the routers: the state, the callback, the API key."""

from __future__ import annotations

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import APIKeyHeader

from ..schemas import Problem
from ..security import request_key_problem
from ..settings import API_KEY_HEADER
from ..state import ServiceState

__all__ = ["get_state", "get_callback", "get_finetuner", "require_key", "NO_FINETUNER",
           "ERRORS", "KEYED"]

_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False,
                           description="the service's API key (also accepted as "
                                       "'Authorization: Bearer <key>')")

def _problem(text: str) -> dict:
    return {"model": Problem, "description": text}


#: Error answers every route can give (documented so clients and fuzzers know them).
ERRORS = {400: _problem("the request body is not readable JSON"),
          404: _problem("not found (the message says what and why)"),
          409: _problem("not possible in this state (e.g. fine-tuning not enabled)"),
          413: _problem("request body over the limit"),
          503: _problem("no tagging callback attached")}
#: Extra answers of routes that need the API key.
KEYED = {401: _problem("missing API key"), 403: _problem("wrong API key")}

NO_FINETUNER = ("fine-tuning is not enabled: call callback.enable_finetuning(directory) "
                "before serving, or start the service with `xsml serve --finetune-dir DIR`")


async def get_state(request: Request) -> ServiceState:
    return request.app.state.service


async def get_callback(state: ServiceState = Depends(get_state)):
    if state.callback is None:
        raise HTTPException(503, "no tagging callback is attached to this service: create "
                                 "the app with create_app(callback) or use "
                                 "bluesky_xsml.api.serve.serve(callback)")
    return state.callback


async def get_finetuner(callback=Depends(get_callback)):
    ft = getattr(callback, "finetuner", None)
    if ft is None:
        raise HTTPException(409, NO_FINETUNER)
    return ft


async def require_key(request: Request, key: str | None = Security(_key_header)) -> None:
    """The API key (also enforced by the guard middleware before the body is read).

    The key comes from ``X-API-Key`` or ``Authorization: Bearer|ApiKey <key>``
    (``key``, the documented header, is there for the OpenAPI schema). The
    read cookie counts only for ``GET``/``HEAD``, exactly as in the guard
    (both call :func:`~bluesky_xsml.api.security.request_key_problem`).
    """
    problem = request_key_problem(request.method, request.headers.raw,
                                  request.app.state.api_key)
    if problem is not None:
        raise HTTPException(problem[0], problem[1],
                            headers={"WWW-Authenticate": "Bearer"} if problem[0] == 401
                            else None)
