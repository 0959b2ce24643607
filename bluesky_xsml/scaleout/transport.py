"""The transport seam: where a tagging worker gets its documents from.

A worker reads ``(name, doc)`` pairs from a :class:`DocumentSource` and does
not care how they travelled. Two implementations live here:

* :class:`ZMQSource`: bluesky's 0MQ document bus. A RunEngine publishes with
  ``bluesky.callbacks.zmq.Publisher`` to a ``bluesky-0MQ-proxy``; this source
  subscribes to the proxy's output port with bluesky's ``RemoteDispatcher``,
  which runs its asyncio loop on a background thread and hands documents over
  through a queue.
* :class:`IterableSource`: documents from any iterable (a replay of stored
  documents, tests).

**Kafka plugs in here.** Facilities that run Kafka publish with
``bluesky_kafka.Publisher`` and consume with ``bluesky_kafka.RemoteDispatcher``
(or ``BlueskyConsumer``), whose ``subscribe(callback)`` and
``start(continue_polling=...)`` have the same shape as the 0MQ dispatcher's.
A ``KafkaSource`` is therefore a :class:`CallbackSource` subclass whose
``_run`` builds ``bluesky_kafka.RemoteDispatcher(topics=[...],
bootstrap_servers=..., group_id=..., consumer_config={...})``, subscribes
:meth:`CallbackSource.put` and calls ``start(continue_polling=lambda: not
self.closed)``. It is not shipped: no Kafka broker can run on the machines
this project is tested on, and an untested transport would be a stub. See
``docs/scale-out.md`` for what changes with Kafka (consumer groups give
partitioning and replay; gaps become rare, the gap checks stay).

Examples
--------
>>> from bluesky_xsml.scaleout.transport import IterableSource
>>> src = IterableSource([("start", {"uid": "a"}), ("stop", {"run_start": "a"})])
>>> [name for name, doc in src]
['start', 'stop']
>>> src.get(timeout=0.01) is None  # exhausted
True
"""

from __future__ import annotations

import logging
import pickle
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

__all__ = ["CallbackSource", "DocumentSource", "IterableSource", "ZMQSource"]

log = logging.getLogger(__name__)

Document = tuple[str, dict]


@runtime_checkable
class DocumentSource(Protocol):
    """Anything a worker can read documents from.

    ``get(timeout)`` returns the next ``(name, doc)`` or ``None`` when nothing
    arrived within ``timeout`` seconds (the worker uses these pauses for its
    housekeeping); ``closed`` is true once the source will deliver nothing
    more; ``close()`` releases it (idempotent).
    """

    closed: bool

    def get(self, timeout: float) -> Document | None: ...

    def close(self) -> None: ...


class IterableSource:
    """Documents from an iterable of ``(name, doc)`` pairs.

    Parameters
    ----------
    documents : iterable of (str, dict)
    """

    def __init__(self, documents: Iterable[Document]):
        self._it = iter(documents)
        self.closed = False

    def get(self, timeout: float) -> Document | None:
        if self.closed:
            return None
        try:
            return next(self._it)
        except StopIteration:
            self.closed = True
            return None

    def close(self) -> None:
        self.closed = True

    def __iter__(self) -> Iterator[Document]:
        while (item := self.get(0)) is not None:
            yield item


class CallbackSource:
    """Base for sources fed by a callback-style dispatcher running on a thread.

    Subclasses implement :meth:`_run`, which must block delivering documents
    to :meth:`put` until :meth:`_request_stop` makes it return. The queue is
    unbounded on purpose: the worker keeps up or falls behind in memory
    rather than losing documents here (the bus in front of it may still drop;
    see :mod:`bluesky_xsml.scaleout.gaps`).
    """

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self.ready = threading.Event()
        self.closed = False
        self.error: BaseException | None = None
        self.received = 0
        self._thread = threading.Thread(target=self._main, name=type(self).__name__, daemon=True)

    def start(self) -> CallbackSource:
        """Start the background thread (returns ``self``)."""
        self._thread.start()
        return self

    def put(self, name: str, doc: dict) -> None:
        """Called by the dispatcher for every document."""
        self.received += 1
        self._queue.put((str(getattr(name, "value", name)), doc))

    def get(self, timeout: float) -> Document | None:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            if not self._thread.is_alive() and self._thread.ident is not None:
                self.closed = True
            return None

    def _main(self) -> None:
        try:
            self._run()
        except BaseException as err:
            if not self.closed:
                self.error = err
                log.exception("%s stopped", type(self).__name__)
        finally:
            self.ready.set()

    def _run(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _request_stop(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self, timeout: float = 5.0) -> None:
        """Stop the dispatcher thread (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self._thread.is_alive():
            self._request_stop()
            self._thread.join(timeout)


class ZMQSource(CallbackSource):
    """Documents from a bluesky 0MQ proxy (``bluesky-0MQ-proxy``).

    Parameters
    ----------
    address : str
        The proxy's output port, e.g. ``"127.0.0.1:5578"``.
    prefix : bytes
        Only documents published with this prefix (bluesky's ``Publisher``
        ``prefix``); empty: all.
    deserializer : callable
        Must match the publisher's serializer (bluesky's default is pickle,
        which is for trusted networks only).

    Notes
    -----
    0MQ SUB sockets miss what is published before their subscription reaches
    the proxy and drop at the high-water mark; :attr:`ready` is set once the
    socket is connected, not once the subscription is in effect.
    """

    def __init__(self, address: str, *, prefix: bytes = b"",
                 deserializer: Callable[[bytes], Any] = pickle.loads):
        super().__init__()
        self.address = address
        self.prefix = prefix
        self.deserializer = deserializer
        self._loop = None

    def _run(self) -> None:
        import asyncio

        from bluesky.callbacks.zmq import RemoteDispatcher

        loop = asyncio.new_event_loop()
        self._loop = loop
        dispatcher = RemoteDispatcher(self.address, prefix=self.prefix, loop=loop,
                                      deserializer=self.deserializer)
        dispatcher.subscribe(self.put)
        loop.call_soon(self.ready.set)  # runs once the socket is set up and the loop spins
        try:
            dispatcher.start()
        except (asyncio.CancelledError, RuntimeError):
            if not self.closed:
                raise

    def _request_stop(self) -> None:
        import asyncio

        loop = self._loop
        if loop is None or loop.is_closed():
            return

        def cancel_all():
            for task in asyncio.all_tasks(loop):
                task.cancel()

        try:
            loop.call_soon_threadsafe(cancel_all)
        except RuntimeError:  # the loop closed meanwhile
            pass

    def __repr__(self) -> str:
        return f"ZMQSource({self.address!r})"
