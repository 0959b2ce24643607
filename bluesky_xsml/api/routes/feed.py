"""``/api/feed``: the live feed of tag results and decisions (Server-Sent Events).

Events: ``frames`` (``{"run_uid", "frames": [FrameOut, ...]}``, with the last
result id as the SSE id), ``decision`` (``{"decision": Decision, "after": the
newest frame it accounts for, "policy": the policy's name, "where": the scan id,
plan and motor positions of each evidence frame}``) and ``run`` (a
``RunSummary``, when a run starts and when its stop document arrives). A
reconnecting client sends
``Last-Event-ID`` (browsers do) and gets the results it missed that the
service still holds.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from fastapi.responses import StreamingResponse

from ..state import ServiceState, frames_json
from .deps import ERRORS, get_state

router = APIRouter(prefix="/api", tags=["feed"], responses=ERRORS)

#: A usable ``Last-Event-ID``: ASCII digits only (``str.isdigit`` also accepts superscripts and
#: Arabic-Indic digits).
_EVENT_ID = re.compile(r"[0-9]{1,18}")


def last_event_id_start(value: str | None) -> int | None:
    """The result id to replay after, from a ``Last-Event-ID`` header (None: ignore it).

    >>> last_event_id_start(" 42 "), last_event_id_start("²"), last_event_id_start("-1")
    (42, None, None)
    """
    if value is None or _EVENT_ID.fullmatch(value.strip()) is None:
        return None
    return int(value.strip())


def _sse(event: str, rid: int | None, data: str) -> str:
    head = f"id: {rid}\n" if rid is not None else ""
    return f"{head}event: {event}\ndata: {data}\n\n"


@router.get("/feed", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "Server-Sent Events: frames, decision, run"}})
async def feed(request: Request,
               after: Annotated[int | None, Query(ge=-1, le=2**62,
                                                  description="replay results after this id")]
               = None,
               max_s: Annotated[float | None, Query(gt=0, le=86400,
                                                    description="end the stream after this")]
               = None,
               last_event_id: Annotated[str | None, Header(max_length=32)] = None,
               state: ServiceState = Depends(get_state)):
    """Tag results and decisions as they happen.

    A ``Last-Event-ID`` that is not a result id is ignored. At most
    ``max_feed_clients`` feeds run at once; one more gets 503.
    """
    start = after if after is not None else last_event_id_start(last_event_id)
    loop = asyncio.get_running_loop()
    limit = state.settings.max_feed_clients
    client = state.subscribe(loop, limit=limit)
    if client is None:
        raise HTTPException(503, f"too many live-feed clients: {limit} are connected "
                                 "(setting max_feed_clients); try again later",
                            headers={"Retry-After": "5"})
    heartbeat = state.settings.feed_heartbeat_s
    deadline = None if max_s is None else loop.time() + max_s

    async def stream():
        try:
            yield "retry: 2000\n\n"
            if start is not None:
                by_run: dict[str, list] = {}
                for rec in state.latest(state.settings.latest_frames, after=start):
                    by_run.setdefault(rec["run_uid"], []).append(rec)
                for run_uid, recs in by_run.items():
                    yield _sse("frames", recs[-1]["id"], frames_json(run_uid, recs))
            yield _sse("decision", None, json.dumps(
                {"decision": json.loads(state.engine.current.model_dump_json()), "after": None}))
            while True:
                wait = heartbeat if deadline is None else min(heartbeat, deadline - loop.time())
                if wait <= 0:
                    break
                try:
                    message = await asyncio.wait_for(client.queue.get(), wait)
                except TimeoutError:
                    if await request.is_disconnected():
                        break
                    yield ": keep-alive\n\n"
                    continue
                if message is None:
                    break
                yield _sse(*message)
        finally:
            state.unsubscribe(client)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
