"""Retrying a catalog call after a Tiled server error (HTTP 5xx), for re-tag drivers and workers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

__all__ = ["is_server_error", "with_server_retries"]

log = logging.getLogger(__name__)


def is_server_error(err: BaseException) -> bool:
    """Whether ``err`` is an HTTP 5xx from the Tiled server (worth a retry)."""
    response = getattr(err, "response", None)
    return getattr(response, "status_code", 0) >= 500


def with_server_retries(fn: Callable[[], Any], *, retries: int = 2, delay: float = 1.0,
                        what: str = "a catalog call") -> Any:
    """``fn()``, called again (up to ``retries`` times) after a Tiled server error."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as err:
            if attempt >= retries or not is_server_error(err):
                raise
            log.warning("%s: server error (%s); retrying (%d/%d)", what, err, attempt + 1,
                        retries)
            time.sleep(delay * (attempt + 1))
    raise AssertionError("unreachable")  # pragma: no cover
