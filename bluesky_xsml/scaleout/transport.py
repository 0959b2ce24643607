"""The transport seam: where a tagging worker gets its documents from.

A worker reads ``(name, doc)`` pairs from a :class:`DocumentSource` and does
not care how they travelled. Two implementations live here:

* :class:`ZMQSource`: bluesky's 0MQ document bus. A RunEngine publishes with
  ``bluesky.callbacks.zmq.Publisher`` to a ``bluesky-0MQ-proxy``; this source
  subscribes to the proxy's output port on a background thread and hands
  documents over through a queue. Messages are decoded with msgpack
  (:mod:`~bluesky_xsml.scaleout.serialization`), not bluesky's default pickle:
  publish with :func:`~bluesky_xsml.scaleout.serialization.publisher`.
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

import collections
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

from .serialization import Serializer, codec

__all__ = ["CallbackSource", "DocumentSource", "IterableSource", "ZMQSource"]

log = logging.getLogger(__name__)

Document = tuple[str, dict]

#: The names bluesky documents travel under (``event_model.DocumentNames``).
DOCUMENT_NAMES = frozenset({
    "start", "descriptor", "event", "event_page", "stop", "resource", "datum", "datum_page",
    "stream_resource", "stream_datum", "bulk_events", "bulk_datum",
})


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

    A SUB socket on the proxy's output port, read on a background thread. Each
    message is bluesky's ``prefix name payload``; it is delivered only if the
    name is a document name and the payload decodes. Anything else is counted
    in :attr:`rejected`, logged (without its content) and dropped: the bus is
    a network input, and a crafted message must neither run code nor stop the
    source.

    Parameters
    ----------
    address : str
        The proxy's output port, e.g. ``"127.0.0.1:5578"``.
    prefix : bytes
        Only documents published with this prefix (bluesky's ``Publisher``
        ``prefix``); empty: all.
    serializer : {"msgpack", "pickle"}
        The encoding publishers use. ``"msgpack"`` (default; see
        :mod:`bluesky_xsml.scaleout.serialization`) cannot run code.
        ``"pickle"`` is bluesky's own default and runs code chosen by whoever
        can publish to the proxy: trusted networks only (a warning is logged).
    deserializer : callable, optional
        Overrides ``serializer`` with any ``bytes -> dict`` decoder.
    curve_config : bluesky.callbacks.zmq.ClientCurve, optional
        0MQ CURVE keys (``secret_path``, ``server_public_key``) for a proxy
        whose output socket requires them.
    max_message_bytes : int
        0MQ drops the connection of a peer sending a bigger message.

    Notes
    -----
    0MQ SUB sockets miss what is published before their subscription reaches
    the proxy and drop at the high-water mark; :attr:`ready` is set once the
    socket is connected, not once the subscription is in effect.
    """

    def __init__(self, address: str, *, prefix: bytes = b"",
                 serializer: Serializer = "msgpack",
                 deserializer: Callable[[bytes], Any] | None = None,
                 curve_config: Any = None, max_message_bytes: int = 2**30):
        super().__init__()
        if b" " in prefix:
            raise ValueError(f"prefix {prefix!r} may not contain b' '")
        self.address = address
        self.prefix = prefix
        self.serializer = serializer if deserializer is None else "custom"
        self.deserializer = deserializer if deserializer is not None else codec(serializer)[1]
        self.curve_config = curve_config
        self.max_message_bytes = int(max_message_bytes)
        self.rejected: collections.Counter = collections.Counter()
        self._stop_requested = threading.Event()

    def _socket(self, context):
        import zmq

        sock = context.socket(zmq.SUB)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve_config is not None:
            import zmq.auth

            public, secret = zmq.auth.load_certificate(self.curve_config.secret_path)
            if secret is None:
                raise ValueError(f"no CURVE secret key in {self.curve_config.secret_path}")
            server, _ = zmq.auth.load_certificate(self.curve_config.server_public_key)
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
            sock.setsockopt(zmq.CURVE_SERVERKEY, server)
        address = self.address
        if isinstance(address, tuple):
            address = f"tcp://{address[0]}:{address[1]}"
        elif "://" not in address:
            address = f"tcp://{address}"
        sock.connect(address)
        sock.setsockopt(zmq.SUBSCRIBE, self.prefix)
        return sock

    def _reject(self, why: str, detail: str = "") -> None:
        self.rejected[why] += 1
        log.warning("%r rejected a bus message (%s)%s", self, why, f": {detail}" if detail else "")

    def _decode(self, message: bytes) -> Document | None:
        """``(name, doc)`` from one bus message, or None (counted in :attr:`rejected`)."""
        parts = message.split(b" ", 2)
        if len(parts) != 3:
            self._reject("malformed")
            return None
        prefix, name, payload = parts
        if self.prefix and prefix != self.prefix:
            return None
        try:
            name_str = name.decode("ascii")
        except UnicodeDecodeError:
            name_str = ""
        if name_str not in DOCUMENT_NAMES:
            self._reject("unknown_document_name", repr(name[:40]))
            return None
        try:
            doc = self.deserializer(payload)
        except Exception as err:  # noqa: BLE001 - any failure is a rejected message
            self._reject("undecodable", f"{type(err).__name__}: {str(err)[:200]}")
            return None
        if not isinstance(doc, dict):
            self._reject("not_a_document", type(doc).__name__)
            return None
        return name_str, doc

    def _run(self) -> None:
        import zmq

        context = zmq.Context()
        sock = self._socket(context)
        try:
            self.ready.set()
            while not self._stop_requested.is_set():
                if not sock.poll(100):
                    continue
                item = self._decode(sock.recv())
                if item is not None:
                    self.put(*item)
        finally:
            sock.close(0)
            context.term()

    def _request_stop(self) -> None:
        self._stop_requested.set()

    def __repr__(self) -> str:
        return f"ZMQSource({self.address!r})"
