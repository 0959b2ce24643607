"""Decisions to queue-server actions, with an approval switch.

:class:`QueueSteering` turns :class:`~bluesky_xsml.steering.policy.Decision`
objects into requests to a running RE Manager (bluesky-queueserver) through
bluesky-queueserver-api's 0MQ ``REManagerAPI``:

- ``pause``: pause the running plan (``re_pause``, deferred by default);
- ``stop``: let the running plan finish and start no more (``queue_stop``);
- any other action with a plan configured for it (``plans={"remeasure": ...}``):
  add that plan to the queue with ``md={"xsml_decision": <the decision>}``
  (at the front by default), and optionally start the queue;
- ``continue`` and actions with nothing configured: nothing (recorded as ``ignored``).

By default (``require_approval=True``) every action waits in
:attr:`QueueSteering.pending` until a person calls :meth:`~QueueSteering.approve`
(or :meth:`~QueueSteering.reject`), in code or over the service's keyed
``/api/queue/{uid}/approve`` route; ``require_approval=False`` acts at once. The
switch can be flipped at run time.

Decisions arrive from a :class:`~bluesky_xsml.steering.policy.PolicyEngine`
(:meth:`QueueSteering.attach`) on the tagging thread; they are handed to a
thread of this object, so a slow or unreachable RE Manager never delays
tagging. A decision is acted on when it differs from the previous one (another
action or rule), so a condition that holds frame after frame gives one action,
not one per frame.
"""

from __future__ import annotations

import logging
import queue as _queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigurationError, XsmlError
from .policy import ACTIONS, PARAM_BOUNDS, Decision, check_param

__all__ = ["PlanTemplate", "QueueAction", "QueueSteering", "QueueSteeringError"]

log = logging.getLogger(__name__)

#: Actions that can add a plan (pause and stop act on the queue itself).
_PLAN_ACTIONS = tuple(a for a in ACTIONS if a not in ("continue", "pause", "stop"))

#: RE Manager states in which a queue is running (or about to run its first plan).
_RUNNING_STATES = ("starting_queue", "executing_queue")

ActionStatus = Literal["pending", "done", "failed", "rejected", "ignored"]


class QueueSteeringError(XsmlError, LookupError):
    """An approval or rejection names no pending action."""


class PlanTemplate(BaseModel):
    """A plan to queue for a decision: name, args and kwargs as the queue server expects.

    Parameters
    ----------
    name : str
        Plan name in the RE Manager's environment (e.g. ``"count"``).
    args : list
        Positional arguments (device names as strings).
    kwargs : dict
        Keyword arguments; ``md`` is merged with the decision's metadata.
    params : dict
        Decision parameter -> plan keyword: ``{"exposure_factor": "exposure_factor"}``
        copies ``decision.params["exposure_factor"]`` into the plan's kwargs.
    bounds : dict
        Decision parameter -> ``(low, high)``: the closed range a copied value
        must lie in (default: :data:`~bluesky_xsml.steering.policy.PARAM_BOUNDS`
        for the names it knows). A value outside it, or not finite, makes
        :meth:`item` raise ``ValueError``: nothing is queued.

    Examples
    --------
    >>> from bluesky_xsml.steering.policy import Decision
    >>> t = PlanTemplate(name="count", args=[["det"]], kwargs={"num": 3})
    >>> item = t.item(Decision(action="remeasure", reason="saturation", uid="d1"))
    >>> item["name"], item["args"], item["kwargs"]["num"]
    ('count', [['det']], 3)
    >>> item["kwargs"]["md"]["xsml_decision"]["uid"]
    'd1'
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, str] = Field(default_factory=dict)
    bounds: dict[str, tuple[float, float]] = Field(default_factory=dict)

    def item(self, decision: Decision) -> dict:
        """The queue item (``item_type="plan"``) for ``decision``.

        Raises
        ------
        ValueError
            A copied parameter is outside its bounds (or not a plain value).
        """
        kwargs = dict(self.kwargs)
        for source, target in self.params.items():
            if source in decision.params:
                bounds = self.bounds.get(source, PARAM_BOUNDS.get(source))
                kwargs[target] = check_param(source, decision.params[source], bounds)
        md = dict(kwargs.get("md") or {})
        md["xsml_decision"] = decision.model_dump(mode="json")
        kwargs["md"] = md
        return {"item_type": "plan", "name": self.name, "args": list(self.args),
                "kwargs": kwargs}


class QueueAction(BaseModel):
    """What was (or will be) done on the queue for one decision."""

    uid: str
    decision: Decision
    kind: Literal["add_plan", "pause", "stop", "none"]
    item: dict | None = None
    status: ActionStatus = "pending"
    detail: str = ""
    response: dict | None = None
    created: float = Field(default_factory=time.time)
    finished: float | None = None


PlanFactory = Callable[[Decision], "dict | PlanTemplate | None"]


class QueueSteering:
    """Send decisions to a bluesky queue server, optionally after a person approves.

    Parameters
    ----------
    api : REManagerAPI, optional
        A ``bluesky_queueserver_api.zmq.REManagerAPI`` (one is made from
        ``zmq_control_addr`` when omitted).
    zmq_control_addr : str, optional
        E.g. ``"tcp://127.0.0.1:60615"``.
    plans : mapping, optional
        Action -> :class:`PlanTemplate` (or a dict of its fields, or a callable
        ``decision -> item dict | PlanTemplate | None``) for actions that add a
        plan (``remeasure``, ``refine``, ``count_longer``, ...).
    require_approval : bool
        Hold every action in :attr:`pending` until :meth:`approve` (default:
        a person approves what reaches the beamline's queue; ``False`` acts at once).
    pause_option : {"deferred", "immediate"}
        How ``pause`` pauses the running plan.
    add_position : {"front", "back"}
        Where added plans go in the queue.
    start_queue : bool
        Start the queue after adding a plan when the manager is idle.
    pause_wait : float
        Longest wait, for ``pause``, for the queue's next plan to start running
        when the decision comes between two plans.
    max_pending : int
        Most actions waiting for approval; beyond it the oldest is rejected
        (``detail`` says so).
    history_size : int
        Most finished actions kept in :attr:`actions`.
    """

    def __init__(self, api: Any = None, *, zmq_control_addr: str | None = None,
                 plans: Mapping[str, Any] | None = None, require_approval: bool = True,
                 pause_option: str = "deferred", add_position: str = "front",
                 start_queue: bool = False, pause_wait: float = 5.0, max_pending: int = 100,
                 history_size: int = 1000):
        if pause_option not in ("deferred", "immediate"):
            raise ConfigurationError(
                f"pause_option must be 'deferred' or 'immediate', got {pause_option!r}")
        if add_position not in ("front", "back"):
            raise ConfigurationError(
                f"add_position must be 'front' or 'back', got {add_position!r}")
        if max_pending < 1:
            raise ConfigurationError(f"max_pending must be >= 1, got {max_pending!r}")
        self._plans: dict[str, Any] = {}
        for action, plan in (plans or {}).items():
            if action not in _PLAN_ACTIONS:
                raise ConfigurationError(
                    f"plans can be given for {', '.join(_PLAN_ACTIONS)}; not for {action!r}")
            if isinstance(plan, Mapping):
                plan = PlanTemplate.model_validate(plan)
            if not (isinstance(plan, PlanTemplate) or callable(plan)):
                raise ConfigurationError(
                    f"plan for {action!r} must be a PlanTemplate, a dict or a callable, "
                    f"got {type(plan).__name__}")
            self._plans[action] = plan
        if api is None:
            if zmq_control_addr is None:
                raise ConfigurationError("QueueSteering needs an api or a zmq_control_addr")
            from bluesky_queueserver_api.zmq import REManagerAPI

            api = REManagerAPI(zmq_control_addr=zmq_control_addr)
        self.api = api
        self.pause_option = pause_option
        self.add_position = add_position
        self.start_queue = bool(start_queue)
        self.pause_wait = float(pause_wait)
        self.max_pending = int(max_pending)
        self._require_approval = bool(require_approval)
        self._lock = threading.RLock()
        self._api_lock = threading.Lock()
        self._pending: OrderedDict[str, QueueAction] = OrderedDict()
        self._done: deque[QueueAction] = deque(maxlen=history_size)
        self._last_key: tuple | None = None
        self._suppressed = 0
        self._inbox: _queue.Queue = _queue.Queue(maxsize=1000)
        self._dropped = 0
        self._busy = 0
        self._engine = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="xsml-queue-steering",
                                        daemon=True)
        self._thread.start()

    # ----------------------------------------------------------- properties
    @property
    def require_approval(self) -> bool:
        """Whether actions wait for :meth:`approve`."""
        return self._require_approval

    @require_approval.setter
    def require_approval(self, value: bool) -> None:
        self._require_approval = bool(value)

    @property
    def pending(self) -> list[QueueAction]:
        """Actions waiting for approval, oldest first."""
        with self._lock:
            return list(self._pending.values())

    @property
    def actions(self) -> list[QueueAction]:
        """Finished actions (done, failed, rejected, ignored), oldest first."""
        with self._lock:
            return list(self._done)

    def stats(self) -> dict[str, int]:
        """Counts: pending, finished by status, repeats suppressed, decisions dropped."""
        with self._lock:
            out = {"pending": len(self._pending), "suppressed": self._suppressed,
                   "dropped": self._dropped}
            for a in self._done:
                out[a.status] = out.get(a.status, 0) + 1
            return out

    # ---------------------------------------------------------- engine side
    def attach(self, engine) -> None:
        """Act on every decision of ``engine`` (a PolicyEngine) from now on."""
        self.detach()
        engine.add_listener(self.on_decision)
        self._engine = engine

    def detach(self) -> None:
        """Stop listening to the attached engine."""
        if self._engine is not None:
            self._engine.remove_listener(self.on_decision)
            self._engine = None

    def on_decision(self, decision: Decision) -> None:
        """Hand ``decision`` to the steering thread; never blocks (drops, counted, when full)."""
        key = (decision.action, decision.rule, decision.run_uid)
        with self._lock:
            if key == self._last_key:
                if decision.action != "continue":
                    self._suppressed += 1
                return
            self._last_key = key
        if decision.action == "continue":
            return
        try:
            self._inbox.put_nowait(decision)
        except _queue.Full:
            with self._lock:
                self._dropped += 1
            log.warning("queue steering inbox full; decision %s dropped", decision.uid)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every decision handed over so far has been handled."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                idle = self._inbox.empty() and self._busy == 0
            if idle:
                return True
            time.sleep(0.01)
        return False

    def close(self, timeout: float = 10.0) -> None:
        """Detach, finish queued decisions and stop the thread (the api is not closed)."""
        if self._closed:
            return
        self.detach()
        self.flush(timeout)
        self._closed = True
        self._inbox.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            decision = self._inbox.get()
            if decision is None:
                return
            with self._lock:
                self._busy += 1
            try:
                self.submit(decision)
            except Exception:  # never let the thread die
                log.exception("queue steering failed on decision %s", decision.uid)
            finally:
                with self._lock:
                    self._busy -= 1

    # ---------------------------------------------------------- actions
    def plan_for(self, decision: Decision) -> QueueAction:
        """The action ``decision`` calls for (not carried out)."""
        if decision.action == "pause":
            return QueueAction(uid=decision.uid, decision=decision, kind="pause")
        if decision.action == "stop":
            return QueueAction(uid=decision.uid, decision=decision, kind="stop")
        plan = self._plans.get(decision.action)
        item = None
        try:
            if isinstance(plan, PlanTemplate):
                item = plan.item(decision)
            elif plan is not None:
                made = plan(decision)
                if isinstance(made, PlanTemplate):
                    item = made.item(decision)
                elif made is not None:
                    item = self._item_of(made, decision)
        except ValueError as err:
            return QueueAction(uid=decision.uid, decision=decision, kind="none",
                               status="failed", detail=f"not queued: {err}",
                               finished=time.time())
        if item is None:
            detail = ("no queue action for 'continue'" if decision.action == "continue"
                      else f"no plan configured for {decision.action!r}")
            return QueueAction(uid=decision.uid, decision=decision, kind="none",
                               status="ignored", detail=detail, finished=time.time())
        return QueueAction(uid=decision.uid, decision=decision, kind="add_plan", item=item)

    @staticmethod
    def _item_of(made, decision: Decision) -> dict:
        """A factory's item (a BPlan or a dict) with the decision in its ``md``."""
        item = dict(made.to_dict() if hasattr(made, "to_dict") else made)
        kwargs = dict(item.get("kwargs") or {})
        md = dict(kwargs.get("md") or {})
        md.setdefault("xsml_decision", decision.model_dump(mode="json"))
        kwargs["md"] = md
        item["kwargs"] = kwargs
        item.setdefault("item_type", "plan")
        return item

    def submit(self, decision: Decision) -> QueueAction:
        """Act on ``decision`` now, or hold it for approval; returns the action."""
        action = self.plan_for(decision)
        if action.status in ("ignored", "failed"):
            return self._finish(action)
        if self._require_approval:
            with self._lock:
                self._pending[action.uid] = action
                while len(self._pending) > self.max_pending:
                    _, old = self._pending.popitem(last=False)
                    old.status, old.finished = "rejected", time.time()
                    old.detail = f"more than max_pending={self.max_pending} actions waiting"
                    self._done.append(old)
            return action
        return self._execute(action)

    def approve(self, uid: str) -> QueueAction:
        """Carry out the pending action of decision ``uid``.

        Raises
        ------
        QueueSteeringError
            If no action with that uid is pending (the message lists those that are).
        """
        action = self._take(uid)
        return self._execute(action)

    def reject(self, uid: str, *, reason: str = "") -> QueueAction:
        """Drop the pending action of decision ``uid`` (recorded as rejected)."""
        action = self._take(uid)
        action.status, action.detail = "rejected", reason or "rejected by a person"
        return self._finish(action)

    def _take(self, uid: str) -> QueueAction:
        with self._lock:
            try:
                return self._pending.pop(uid)
            except KeyError:
                waiting = ", ".join(self._pending) or "none"
                raise QueueSteeringError(
                    f"no pending queue action for decision {uid!r}; pending: {waiting}") from None

    def _finish(self, action: QueueAction) -> QueueAction:
        action.finished = action.finished or time.time()
        with self._lock:
            self._done.append(action)
        return action

    def _execute(self, action: QueueAction) -> QueueAction:
        try:
            with self._api_lock:
                action.response = self._call(action)
            action.status = "done"
        except Exception as err:  # noqa: BLE001 - the worker records the failure and goes on
            action.status = "failed"
            action.detail = f"{type(err).__name__}: {err}"
            log.warning("queue action for decision %s failed: %s", action.uid, action.detail)
        return self._finish(action)

    def _call(self, action: QueueAction) -> dict:
        api = self.api
        if action.kind == "add_plan":
            pos = "front" if self.add_position == "front" else "back"
            response = dict(api.item_add(action.item, pos=pos))
            action.detail = f"added {action.item['name']} as {response['item']['item_uid']}"
            if self.start_queue and api.status(reload=True)["manager_state"] == "idle":
                api.queue_start()
                action.detail += "; queue started"
            return response
        if action.kind == "pause":
            return self._pause(action)
        if action.kind == "stop":
            state = api.status(reload=True)["manager_state"]
            if state not in _RUNNING_STATES:
                action.detail = f"queue not running (manager {state})"
                return {"manager_state": state}
            response = dict(api.queue_stop())
            action.detail = "the queue stops after the running plan"
            return response
        raise AssertionError(f"unknown action kind {action.kind!r}")  # pragma: no cover

    def _pause(self, action: QueueAction) -> dict:
        """Pause the running plan; between items (a plan not yet running) wait up to ``pause_wait``.

        The RE Manager refuses ``re_pause`` unless its RunEngine is ``running``;
        while the queue is executing that holds for all but the moments between
        plans, so the request is retried until then.
        """
        api = self.api
        deadline = time.monotonic() + self.pause_wait
        while True:
            status = api.status(reload=True)
            state = status["manager_state"]
            if state not in _RUNNING_STATES:
                action.detail = f"nothing to pause (manager {state})"
                return {"manager_state": state}
            if status.get("re_state") == "running":
                try:
                    response = dict(api.re_pause(self.pause_option))
                except Exception as err:
                    if "running" not in str(err) or time.monotonic() > deadline:
                        raise
                else:
                    action.detail = f"paused the running plan ({self.pause_option})"
                    return response
            if time.monotonic() > deadline:
                action.detail = (f"nothing to pause: the RunEngine stayed "
                                 f"{status.get('re_state')!r} for {self.pause_wait:g} s")
                return {"manager_state": state, "re_state": status.get("re_state")}
            time.sleep(0.05)
