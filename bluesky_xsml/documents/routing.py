"""Documents routed per run: event-model's ``RunRouter``, made safe for live streams.

Whatever consumes documents run by run (the tagging callback, the live view,
gap tracking) does it the same way: a *factory* builds one small per-run
object, an :class:`event_model.DocumentRouter`, when a run starts; the
:class:`RunRouter` here hands each later document of that run to it and to no
other run's object, and forgets the run at its stop::

    def factory(name, start_doc):
        return [MyRunState(start_doc)], []          # callbacks, subfactories

    router = RunRouter([factory], on_unrouted=count_it)
    RE.subscribe(router)

It is :class:`event_model.RunRouter` (1.24) with three differences that a
stream of documents from a network or a misbehaving device needs:

* **No filling.** event-model's router fills external data with a ``Filler``
  per run; here documents pass through as they came (the per-run objects read
  files themselves, off the RunEngine's thread).
* **Documents it cannot route are reported, never raised.** A descriptor,
  resource or stop of a run it has no start for, an event of a descriptor it
  does not know (or of a run already stopped), a ``stream_datum`` of an
  unknown ``stream_resource``, a second start with a known uid: each goes to
  ``on_unrouted(name, doc, reason, run_uid)`` and nowhere else.
  (event-model raises ``KeyError`` for most of these.)
* **Nothing kept after a run's stop** but the uids of its descriptors, in a
  bounded memory, so that a late event is told apart from an unknown one
  (event-model 1.24 keeps each run's resource and stream-resource uids).

``resource`` documents without a ``run_start`` (old ophyd) go to every open
run, as event-model does; ``resource``/``datum`` and
``stream_resource``/``stream_datum`` of a known run go to that run only.
Events arrive at the per-run objects as ``event_page`` documents, datums as
``datum_page`` documents.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable
from typing import Any

import event_model
from event_model import DocumentRouter

__all__ = ["ROUTED_NAMES", "PassThroughFiller", "RunRouter", "Unrouted"]

log = logging.getLogger(__name__)

#: Document names a :class:`RunRouter` routes; anything else is not a run's document.
ROUTED_NAMES = frozenset({"start", "descriptor", "event", "event_page", "resource", "datum",
                          "datum_page", "stream_resource", "stream_datum", "stop"})

#: ``on_unrouted(name, doc, reason, run_uid)``; ``run_uid`` where the document names a run.
Unrouted = Callable[[str, dict, str, "str | None"], Any]


class PassThroughFiller(DocumentRouter):
    """A ``filler_class`` for :class:`event_model.RunRouter` that fills nothing.

    ``RunRouter`` calls its filler's methods directly and routes what they
    return, so each returns the document it was given.
    """

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        super().__init__()

    def descriptor(self, doc):
        return doc

    def event_page(self, doc):
        return doc

    def resource(self, doc):
        return doc

    def datum_page(self, doc):
        return doc

    def stream_resource(self, doc):
        return doc

    def stream_datum(self, doc):
        return doc


class RunRouter(event_model.RunRouter):
    """Route each run's documents to the objects its factories built for it.

    Parameters
    ----------
    factories : list of callables
        ``factory("start", start_doc) -> (callbacks, subfactories)``, as for
        :class:`event_model.RunRouter`.
    on_unrouted : callable, optional
        ``on_unrouted(name, doc, reason, run_uid)`` for a document that belongs
        to no open run (see the module text); default: logged at debug level.
    remember_stopped : int
        Descriptors of stopped runs remembered, to report a late event as
        ``"event after stop"`` rather than ``"event for unknown descriptor"``.
    """

    def __init__(self, factories: Iterable[Callable], *, on_unrouted: Unrouted | None = None,
                 remember_stopped: int = 10_000) -> None:
        super().__init__(list(factories), filler_class=PassThroughFiller)
        self.on_unrouted = on_unrouted or _log_unrouted
        self._stopped: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._remember_stopped = int(remember_stopped)

    # -- what the router knows
    def is_open(self, run_uid: str | None) -> bool:
        """Whether ``run_uid`` started and did not stop yet."""
        return run_uid is not None and run_uid in self._start_to_start_doc

    @property
    def open_runs(self) -> list[str]:
        """Start uids of the runs open now, oldest first."""
        return list(self._start_to_start_doc)

    def run_of_descriptor(self, descriptor_uid: str | None) -> str | None:
        """The start uid of an open run's descriptor, or None."""
        return self._descriptor_to_start.get(descriptor_uid)

    # -- routing
    def start(self, doc):
        if doc["uid"] in self._start_to_start_doc:
            self.on_unrouted("start", doc, "start seen twice", doc["uid"])
            return None
        return super().start(doc)

    def descriptor(self, doc):
        run = doc.get("run_start")
        if not self.is_open(run):
            self.on_unrouted("descriptor", doc, "descriptor for unknown run", run)
            return None
        return super().descriptor(doc)

    def event(self, doc):
        # one page per event, without event-model's unpacking of the result
        self.event_page(event_model.pack_event_page(doc))
        return None

    def event_page(self, doc):
        descriptor = doc["descriptor"]
        if descriptor not in self._descriptor_to_start:
            stopped = self._stopped.get(descriptor)
            if stopped is not None:
                self.on_unrouted("event_page", doc, "event after stop", stopped)
            else:
                self.on_unrouted("event_page", doc, "event for unknown descriptor", None)
            return None
        return super().event_page(doc)

    def datum(self, doc):
        self.datum_page(event_model.pack_datum_page(doc))
        return None

    def datum_page(self, doc):
        resource = doc.get("resource")
        if resource not in self._resources and resource not in self._unlabeled_resources:
            self.on_unrouted("datum_page", doc, "datum for unknown resource", None)
            return None
        return super().datum_page(doc)

    def resource(self, doc):
        run = doc.get("run_start")
        if run is None and not self._start_to_start_doc:
            self.on_unrouted("resource", doc, "resource for unknown run", None)
            return None
        if run is not None and not self.is_open(run):
            self.on_unrouted("resource", doc, "resource for unknown run", run)
            return None
        if run is None and "run_start" in doc:  # ``None``: event-model wants the key absent
            doc = {k: v for k, v in doc.items() if k != "run_start"}
        return super().resource(doc)

    def stream_resource(self, doc):
        run = doc.get("run_start")
        if not self.is_open(run):
            self.on_unrouted("stream_resource", doc, "stream_resource for unknown run", run)
            return None
        return super().stream_resource(doc)

    def stream_datum(self, doc):
        if doc.get("stream_resource") not in self._stream_resources:
            self.on_unrouted("stream_datum", doc, "stream_datum for unknown stream_resource",
                             None)
            return None
        return super().stream_datum(doc)

    def stop(self, doc):
        run = doc.get("run_start")
        if not self.is_open(run):
            self.on_unrouted("stop", doc, "stop for unknown run", run)
            return None
        descriptors = list(self._start_to_descriptors.get(run, ()))
        try:
            return super().stop(doc)
        finally:  # forget the run even if one of its callbacks raised
            self._forget(run, descriptors)

    def _forget(self, run: str, descriptors: list[str]) -> None:
        for uid in descriptors:
            self._stopped[uid] = run
            self._descriptor_to_start.pop(uid, None)
            self._factory_cbs_by_descriptor.pop(uid, None)
            self._subfactory_cbs_by_descriptor.pop(uid, None)
        while len(self._stopped) > self._remember_stopped:
            self._stopped.popitem(last=False)
        for table in (self._resources, self._stream_resources):
            for uid in [u for u, r in table.items() if r == run]:
                del table[uid]
        for table in (self._fillers, self._subfactories, self._factory_cbs_by_start,
                      self._subfactory_cbs_by_start, self._start_to_descriptors,
                      self._start_to_start_doc):
            table.pop(run, None)


def _log_unrouted(name: str, doc: dict, reason: str, run_uid: str | None) -> None:
    log.debug("%s (%s document, run %s) not routed", reason, name, run_uid)
