"""uvicorn's HTTP protocol with a deadline for request headers.

uvicorn (0.55) arms a timer only between requests (``timeout_keep_alive``):
a client that connects and sends nothing, or sends half its headers, holds
the connection for as long as it likes, and each such connection counts
towards ``limit_concurrency``, so a handful of them could shut everyone else
out. :func:`header_deadline_protocol` returns uvicorn's own protocol class
(httptools when installed, else h11) with one addition: from the moment a
connection opens, or a new request's first byte arrives, the client has
``header_timeout_s`` seconds to finish the headers; otherwise the connection
is closed. The body is not covered (the app reads it, bounded in size).

Request headers are also capped at :data:`MAX_HEADER_BYTES` (431 and close
above it): h11 has such a cap (``h11_max_incomplete_event_size``); uvicorn's
httptools protocol took 200 KiB of header lines and kept them in memory.

Examples
--------
>>> cls = header_deadline_protocol(2.0)
>>> cls.header_timeout_s, cls.__name__.startswith("HeaderDeadline")
(2.0, True)
"""

from __future__ import annotations

import asyncio
import logging

__all__ = ["header_deadline_protocol", "MAX_HEADER_BYTES"]

log = logging.getLogger(__name__)

#: Most bytes of request line and headers accepted for one request.
MAX_HEADER_BYTES = 64 * 1024

_TOO_LARGE_BODY = b"request headers are too large\n"
_TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
              b"content-type: text/plain; charset=utf-8\r\n"
              b"content-length: " + str(len(_TOO_LARGE_BODY)).encode() + b"\r\n"
              b"connection: close\r\n\r\n" + _TOO_LARGE_BODY)


class _Deadline:
    """The timer shared by both protocol flavours (mixed in before uvicorn's class)."""

    header_timeout_s = 5.0
    _header_timer: asyncio.TimerHandle | None = None

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s,
                                                      self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            log.info("closing a connection that sent no complete request headers in %g s",
                     self.header_timeout_s)
            self.transport.close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)


def _httptools_class():
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderDeadlineHttpTools(_Deadline, HttpToolsProtocol):
        _in_headers = False
        _header_bytes = 0

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_headers and not self.transport.is_closing():
                self._header_bytes += len(data)  # all of it: the headers are still open
                if self._header_bytes > MAX_HEADER_BYTES:
                    self.transport.write(_TOO_LARGE)
                    self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_headers, self._header_bytes = True, 0
            self._arm_header_timer()

        def on_headers_complete(self) -> None:
            self._in_headers = False
            self._disarm_header_timer()
            super().on_headers_complete()

    return HeaderDeadlineHttpTools


def _h11_class():
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineH11(_Deadline, H11Protocol):
        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.transport.is_closing():
                return
            if self.conn.their_state is h11.IDLE:  # headers of a request not complete yet
                self._arm_header_timer()
            else:
                self._disarm_header_timer()

    return HeaderDeadlineH11


def header_deadline_protocol(header_timeout_s: float, *, flavour: str = "auto") -> type:
    """uvicorn's HTTP protocol class with a ``header_timeout_s`` deadline for headers.

    Parameters
    ----------
    header_timeout_s : float
    flavour : {"auto", "httptools", "h11"}
        ``auto`` picks what uvicorn's ``http="auto"`` picks.

    Returns
    -------
    type
        Pass it as ``uvicorn.Config(app, http=cls)``.
    """
    if flavour == "auto":
        try:
            import httptools  # noqa: F401
        except ImportError:  # pragma: no cover - httptools comes with uvicorn[standard]
            flavour = "h11"
        else:
            flavour = "httptools"
    if flavour not in ("httptools", "h11"):
        raise ValueError(f"flavour must be 'auto', 'httptools' or 'h11', not {flavour!r}")
    base = _httptools_class() if flavour == "httptools" else _h11_class()
    return type(base.__name__, (base,), {"header_timeout_s": float(header_timeout_s)})
