"""The FastAPI application factory of the steering service.

::

    from bluesky_xsml.api.app import create_app
    app = create_app(xsml)          # xsml: a live TaggingCallback
    # uvicorn.run(app, host="127.0.0.1", port=8765), or api.serve.serve(xsml, port=8765)

The app publishes its OpenAPI schema at ``/openapi.json`` (docs at ``/docs``),
answers ``/healthz``, serves the live page at ``/page/`` and the JSON API under
``/api``. Requests must name a trusted host; state-changing requests (and,
off loopback, every ``/api`` request) need the API key in the ``X-API-Key``
header or as ``Authorization: Bearer <key>`` (reads: or the read cookie that
``POST /api/session`` sets, for a page's feed and pictures); request bodies are capped;
malformed requests get a 4xx whose ``detail`` says what is wrong.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .hot_reads import HotReads
from .schemas import Health
from .security import GuardMiddleware
from .settings import ServiceSettings
from .state import ServiceState

__all__ = ["create_app", "PAGE_DIR"]

log = logging.getLogger(__name__)

#: Folder of the live page's static files.
PAGE_DIR = Path(__file__).with_name("page")


def _union_branch(errors, body) -> list:
    """Keep only the errors of the union branch that fits the body (object vs list).

    A body typed ``Model | list[Model]`` reports errors under both branches
    (``body.Model...`` and ``body.list[Model]``); only one of them is useful.
    """
    tags = {e["loc"][1] for e in errors if len(e.get("loc", ())) > 1 and e["loc"][0] == "body"
            and isinstance(e["loc"][1], str)
            and (e["loc"][1][:1].isupper() or e["loc"][1].startswith("list["))}
    if not any(t.startswith("list[") for t in tags) or not isinstance(body, (dict, list)):
        return errors
    want_list = isinstance(body, list)
    out = []
    for e in errors:
        loc = list(e.get("loc", ()))
        if len(loc) > 1 and loc[1] in tags:
            if str(loc[1]).startswith("list[") != want_list:
                continue
            e = {**e, "loc": tuple([loc[0], *loc[2:]])}
        out.append(e)
    return out or errors


def _describe_errors(errors, body=None) -> tuple[str, list[dict]]:
    clean, parts = [], []
    for e in _union_branch(list(errors), body):
        loc = [str(p) for p in e.get("loc", ())]
        msg = str(e.get("msg", "invalid value"))
        clean.append({"loc": loc, "msg": msg, "type": str(e.get("type", ""))})
        parts.append(f"{'.'.join(loc) or 'request'}: {msg}")
    return "; ".join(parts) or "invalid request", clean


def create_app(callback=None, *, settings: ServiceSettings | None = None,
               policy_engine=None, queue_steering=None) -> FastAPI:
    """Build the service app around a live tagging callback.

    Parameters
    ----------
    callback : TaggingCallback, optional
        The live callback whose results, model and fine-tuner the service
        exposes. Without one, only the policy and decision endpoints work
        (the others answer 503).
    settings : ServiceSettings, optional
        Defaults come from the environment (``XSML_*``). When no API key is
        set, one is generated; read it from ``app.state.api_key``.
    policy_engine : PolicyEngine, optional
        The steering engine whose decisions are served and whose policy the
        API replaces (default: a new engine with the default policy).
    queue_steering : QueueSteering, optional
        Whose pending queue-server actions ``/api/queue/pending`` lists and
        ``/api/queue/{uid}/approve`` / ``reject`` decide (key required).

    Returns
    -------
    FastAPI
        ``app.state.service`` is the :class:`ServiceState`,
        ``app.state.api_key`` the key.
    """
    from .routes import feed, frames, model, queue, session, status, steering

    settings = settings if settings is not None else ServiceSettings()
    generated = settings.api_key is None
    api_key = settings.resolved_api_key()
    state = ServiceState(callback, settings=settings, policy_engine=policy_engine)
    state.attach()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.attach()
        try:
            yield
        finally:
            state.close()

    app = FastAPI(
        title="bluesky-xsml steering service",
        version=__version__,
        description="Live tags of x-ray scattering frames, steering decisions, labels and "
                    "model control. State-changing requests need the `X-API-Key` header "
                    "(or `Authorization: Bearer <key>`).",
        lifespan=lifespan,
    )
    app.state.service = state
    app.state.settings = settings
    app.state.api_key = api_key
    app.state.api_key_generated = generated
    app.state.queue_steering = queue_steering

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        detail, errors = _describe_errors(exc.errors(), exc.body)
        return JSONResponse({"detail": detail, "errors": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400 and detail == "There was an error parsing the body":
            detail = "the request body could not be read as JSON (is it UTF-8 encoded JSON?)"
        return JSONResponse({"detail": detail}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.get("/healthz", response_model=Health, tags=["service"])
    def healthz() -> Health:
        """Liveness: the service answers (and whether a callback is attached)."""
        return Health(version=__version__, callback=callback is not None)

    @app.get("/", include_in_schema=False)
    def index():
        return RedirectResponse("/page/")

    def openapi() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            # validation errors are answered as {"detail": "<message>", "errors": [...]}
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            comps["HTTPValidationError"] = {
                "title": "HTTPValidationError", "type": "object", "required": ["detail"],
                "properties": {"detail": {"type": "string"},
                               "errors": {"type": "array", "items": {"type": "object"}}}}
            comps.pop("ValidationError", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    for module in (status, frames, steering, queue, model, feed, session):
        app.include_router(module.router)
    app.mount("/page", StaticFiles(directory=PAGE_DIR, html=True), name="page")
    # the polled reads skip FastAPI's routing (inner to the guard, which adds its headers)
    app.add_middleware(HotReads, state=state, status_max_age=status.STATUS_MAX_AGE)
    app.add_middleware(GuardMiddleware, api_key=api_key,
                       max_body_bytes=settings.max_body_bytes,
                       allowed_hosts=settings.allowed_hosts(),
                       keyed_reads=settings.reads_need_key())
    return app
