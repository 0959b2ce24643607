"""Where each frame was taken: a run's scan id, plan, state, and motor positions.

:class:`RunBook` reads the documents a
:class:`~bluesky_xsml.documents.callback.TaggingCallback` receives (it is one
of its document listeners) and keeps, per run, what a person needs to place a
tagged frame: the start document's ``scan_id``, ``plan_name`` and sample, whether
the run is still open or how it ended, the positions of the motors read in
each event, and the positions of motors that stay put during the run (read in
the ``baseline`` stream).

Which data keys are positions: keys of the start document's ``motors``
(matched by the data key's ``object_name``, as the frame index does) and the
readbacks of any other positioner read in the event, recognised by the
setpoint it is read with (``x`` next to ``x_setpoint`` or ``x_user_setpoint``,
as ophyd's ``SoftPositioner``/``SynAxis`` and ``EpicsMotor`` read). Only
scalar numbers count; each run keeps the positions of its last
``max_events`` events.

Examples
--------
>>> book = RunBook()
>>> book.document("start", {"uid": "r1", "time": 0.0, "scan_id": 7,
...                         "plan_name": "scan", "motors": ["x"]})
'r1'
>>> book.document("descriptor", {"uid": "d1", "run_start": "r1", "name": "primary",
...     "data_keys": {"x": {"dtype": "number", "shape": [], "source": "sim",
...                         "object_name": "x", "units": "mm"},
...                   "x_setpoint": {"dtype": "number", "shape": [], "source": "sim",
...                                  "object_name": "x"},
...                   "img": {"dtype": "array", "shape": [8, 8], "source": "sim"}}})
>>> book.document("event", {"descriptor": "d1", "seq_num": 1, "uid": "e1", "time": 1.0,
...                         "data": {"x": 0.25, "x_setpoint": 0.25, "img": None}})
>>> book.where("r1", "primary", 1)
{'scan_id': 7, 'plan_name': 'scan', 'positions': {'x': 0.25}}
>>> book.info("r1")["units"], book.info("r1")["state"]
({'x': 'mm'}, 'open')
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..documents.frame_index import _number, motor_keys
from ..readout import run_readouts

__all__ = ["RunBook", "position_keys"]

_SETPOINTS = ("_setpoint", "_user_setpoint")
_NUMERIC = ("number", "integer")


def position_keys(descriptor: Mapping, start: Mapping) -> list[str]:
    """The data keys of ``descriptor`` that hold motor positions (see the module docstring).

    The start document's motors come first, in the descriptor's order, then the
    other positioners read.
    """
    data_keys = descriptor.get("data_keys") or {}
    motors = motor_keys(descriptor, start)
    found = set(motors)
    for key in data_keys:
        if any(key + s in data_keys for s in _SETPOINTS):
            found.add(key)
    for key in list(found):  # a motor's setpoint is not a second position
        if any(key.endswith(s) and key[:-len(s)] in data_keys for s in _SETPOINTS):
            found.discard(key)
    scanned = [k for k in motors if k in found]  # the scanned motors first
    return [k for k in scanned + [k for k in data_keys if k not in scanned] if k in found
            and data_keys[k].get("dtype") in _NUMERIC and not data_keys[k].get("shape")
            and "external" not in data_keys[k]]


@dataclass(eq=False)
class _RunInfo:
    uid: str
    scan_id: int | None
    plan_name: str
    sample: str
    motors: list[str]
    start_time: float
    start: dict = field(default_factory=dict)        # the start document
    readout: dict = field(default_factory=dict)      # image key -> Readout.to_dict()
    readout_error: str = ""                          # why the start's xsml_readout was refused
    state: str = "open"
    exit_status: str = ""
    reason: str = ""
    stop_time: float | None = None
    fixed: dict = field(default_factory=dict)       # baseline positions, first reading
    units: dict = field(default_factory=dict)       # position key -> units
    precision: dict = field(default_factory=dict)   # position key -> decimals to show
    streams: dict = field(default_factory=dict)     # descriptor uid -> (stream, keys)
    positions: collections.OrderedDict = field(default_factory=collections.OrderedDict)


class RunBook:
    """Per-run scan metadata and per-event motor positions, from the documents.

    Thread-safe: documents come on the RunEngine's thread, reads from the
    inference thread and HTTP handlers.

    Parameters
    ----------
    max_runs : int
        Runs remembered (the oldest is forgotten first).
    max_events : int
        Events per run whose positions are kept (the oldest are forgotten first).
    default_readouts : dict, optional
        The callback's readouts (``TaggingCallback.readouts``): a run without
        its own ``xsml_readout`` is reported with them, as it is tagged.
    """

    def __init__(self, *, max_runs: int = 64, max_events: int = 100_000,
                 default_readouts: Mapping | None = None):
        self.default_readouts = dict(default_readouts or {})
        self.max_runs = int(max_runs)
        self.max_events = int(max_events)
        self._lock = threading.Lock()
        self._runs: collections.OrderedDict[str, _RunInfo] = collections.OrderedDict()
        self._by_descriptor: dict[str, _RunInfo] = {}

    # ------------------------------------------------------------ documents
    def document(self, name: str, doc: Mapping) -> str | None:
        """Take one document; returns the run uid when the run started or stopped."""
        if name == "start":
            return self._start(doc)
        if name == "descriptor":
            self._descriptor(doc)
        elif name == "event":
            self._events(doc.get("descriptor"), [doc.get("seq_num")],
                         {k: [v] for k, v in (doc.get("data") or {}).items()})
        elif name == "event_page":
            self._events(doc.get("descriptor"), list(doc.get("seq_num") or []),
                         doc.get("data") or {})
        elif name == "stop":
            return self._stop(doc)
        return None

    def _start(self, doc: Mapping) -> str | None:
        uid = doc.get("uid")
        if not isinstance(uid, str):
            return None
        scan_id = doc.get("scan_id")
        sample = doc.get("sample_name", doc.get("sample", ""))
        info = _RunInfo(uid=uid, scan_id=scan_id if isinstance(scan_id, int) else None,
                        plan_name=str(doc.get("plan_name") or ""),
                        sample=sample if isinstance(sample, str) else "",
                        motors=[str(m) for m in (doc.get("motors") or [])],
                        start_time=float(doc.get("time") or 0.0), start=dict(doc))
        readouts, info.readout_error = run_readouts(doc, self.default_readouts)
        info.readout = {key: r.to_dict() for key, r in readouts.items()}
        with self._lock:
            if uid in self._runs:
                return None
            self._runs[uid] = info
            while len(self._runs) > self.max_runs:
                _, old = self._runs.popitem(last=False)
                for d in old.streams:
                    self._by_descriptor.pop(d, None)
        return uid

    def _descriptor(self, doc: Mapping) -> None:
        with self._lock:
            info = self._runs.get(doc.get("run_start"))
            if info is None or not isinstance(doc.get("uid"), str):
                return
            keys = position_keys(doc, info.start)
            data_keys = doc.get("data_keys") or {}
            for k in keys:
                if data_keys[k].get("units"):
                    info.units[k] = str(data_keys[k]["units"])
                if isinstance(data_keys[k].get("precision"), int):
                    info.precision[k] = data_keys[k]["precision"]
            info.streams[doc["uid"]] = (str(doc.get("name", "primary")), keys)
            self._by_descriptor[doc["uid"]] = info

    def _events(self, descriptor: Any, seq_nums: list, data: Mapping) -> None:
        with self._lock:
            info = self._by_descriptor.get(descriptor) if isinstance(descriptor, str) else None
            if info is None:
                return
            stream, keys = info.streams[descriptor]
            if not keys:
                return
            for i, seq in enumerate(seq_nums):
                where = {}
                for k in keys:
                    values = data.get(k)
                    if values is not None and i < len(values):
                        where[k] = _number(values[i])
                if stream == "baseline":
                    for k, v in where.items():
                        info.fixed.setdefault(k, v)
                    continue
                info.positions[(stream, seq)] = where
                if len(info.positions) > self.max_events:
                    info.positions.popitem(last=False)

    def _stop(self, doc: Mapping) -> str | None:
        with self._lock:
            info = self._runs.get(doc.get("run_start"))
            if info is None:
                return None
            info.state = "closed"
            info.exit_status = str(doc.get("exit_status") or "")
            info.reason = str(doc.get("reason") or "")
            info.stop_time = float(doc.get("time") or 0.0)
            return info.uid

    # ---------------------------------------------------------------- reads
    def where(self, run_uid: str, stream: str, seq_num: int) -> dict:
        """``{"scan_id", "plan_name", "positions"}`` of one event (empty values if unknown)."""
        with self._lock:
            info = self._runs.get(run_uid)
            if info is None:
                return {"scan_id": None, "plan_name": "", "positions": {}}
            return {"scan_id": info.scan_id, "plan_name": info.plan_name,
                    "positions": dict(info.positions.get((stream, seq_num), {}))}

    def info(self, run_uid: str) -> dict | None:
        """What the run's documents said about it (JSON-able), or None if never seen."""
        with self._lock:
            info = self._runs.get(run_uid)
            if info is None:
                return None
            return {"scan_id": info.scan_id, "plan_name": info.plan_name,
                    "sample": info.sample, "motors": list(info.motors), "state": info.state,
                    "exit_status": info.exit_status, "reason": info.reason,
                    "start_time": info.start_time, "stop_time": info.stop_time,
                    "fixed_positions": dict(info.fixed), "units": dict(info.units),
                    "precision": dict(info.precision), "readout": dict(info.readout),
                    "readout_error": info.readout_error}

    def uids(self) -> list[str]:
        """Runs remembered, oldest first."""
        with self._lock:
            return list(self._runs)
