"""Plans that ask the steering policy between points and adapt the scan.

The pattern is the per-event recommender of bluesky-adaptive 0.4: after each
point the plan waits for a verdict on the data it just took and lets that
verdict choose the next move. Here the verdict is a
:class:`~bluesky_xsml.steering.policy.Decision` made from the point's tags, and
the wait never blocks the RunEngine's event loop: the plan yields a bounded
``wait_for`` message on an awaitable that the tagging worker completes, and
gives up after ``tag_timeout`` seconds (the point then counts as ``continue``,
and the reason says so).

:func:`tag_steered_scan` is a coarse step scan of one motor that

- inserts finer points between a point and its neighbour when a decision says
  ``refine`` (a feature appeared: the boundary lies between them),
- takes a point again, with a shorter or longer exposure when an exposure
  signal is given, for ``remeasure`` and ``count_longer``,
- pauses the RunEngine (``RE.resume()`` goes on with the next point) for ``pause``,
- ends the run for ``stop``,

and records every decision it acts on in a ``xsml_decisions`` event stream of
the same run (action, rule, reason, the point's ``seq_num`` and position).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import bluesky.plan_stubs as bps
import bluesky.preprocessors as bpp

from ..errors import ConfigurationError
from .policy import Decision, PolicyEngine

__all__ = ["tag_steered_scan", "TagWaiter", "DECISION_KEYS"]

#: Data keys of the decision stream (each prefixed with ``xsml_``).
DECISION_KEYS = ("action", "rule", "reason", "point_seq_num", "position", "params")


class TagWaiter:
    """Result listener that feeds one run's frames to a policy engine and wakes the plan.

    Register on a :class:`~bluesky_xsml.documents.callback.TaggingCallback`
    with ``callback.add_result_listener(waiter)``; set :attr:`run_uid` when the
    run opens. Frames of other runs are ignored. The engine ignores frames it
    already holds, so it may also be registered on the callback directly.

    Parameters
    ----------
    engine : PolicyEngine
    stream : str
        The stream whose events the plan waits for.
    frames_per_point : int
        Tag results that make one point complete (detectors x frames per event).
    """

    def __init__(self, engine: PolicyEngine, *, stream: str = "primary",
                 frames_per_point: int = 1):
        self.engine = engine
        self.stream = stream
        self.frames_per_point = int(frames_per_point)
        self.run_uid: str | None = None
        self._lock = threading.Lock()
        self._seen: dict[int, int] = {}
        self._decision: dict[int, Decision] = {}
        self._futures: dict[int, concurrent.futures.Future] = {}

    def __call__(self, run_uid: str, results: Sequence[Any]) -> None:
        if run_uid != self.run_uid:
            return
        decision = self.engine.update(run_uid, results)
        order = {r.name: i for i, r in enumerate(self.engine.policy.rules)}
        wake = []
        with self._lock:
            for seq in sorted({int(r.seq_num) for r in results if r.stream == self.stream}):
                self._seen[seq] = self._seen.get(seq, 0) + sum(
                    1 for r in results if r.stream == self.stream and int(r.seq_num) == seq)
                old = self._decision.get(seq)
                if old is None or _more_urgent(decision, old, order):
                    self._decision[seq] = decision
                if self._seen[seq] >= self.frames_per_point and seq in self._futures:
                    wake.append(self._futures.pop(seq))
        for fut in wake:
            if not fut.done():
                fut.set_result(True)

    def expect(self, seq_num: int) -> None:
        """Announce that the plan will wait for ``seq_num`` (call before taking it)."""
        with self._lock:
            self._futures[seq_num] = concurrent.futures.Future()

    def awaitable(self, seq_num: int, timeout: float):
        """An awaitable factory for ``bps.wait_for``: done when tagged or after ``timeout`` s."""
        with self._lock:
            fut = self._futures.get(seq_num)
            if fut is None or self._seen.get(seq_num, 0) >= self.frames_per_point:
                fut = concurrent.futures.Future()
                fut.set_result(True)

        def factory():
            async def wait():
                await asyncio.wait([asyncio.wrap_future(fut)], timeout=timeout)
            return wait()

        return factory

    def decision(self, seq_num: int) -> Decision | None:
        """The decision for point ``seq_num``, or None if it was not tagged (yet)."""
        with self._lock:
            if self._seen.get(seq_num, 0) < self.frames_per_point:
                return None
            return self._decision.get(seq_num)


def _more_urgent(new: Decision, old: Decision, order: dict[str, int]) -> bool:
    if new.action == "continue":
        return False
    if old.action == "continue":
        return True
    return order.get(new.rule, math.inf) < order.get(old.rule, math.inf)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigurationError(message)


def tag_steered_scan(detectors: Iterable[Any], motor: Any, start: float, stop: float,
                     num: int, *, callback: Any, engine: PolicyEngine, refine: int = 3,
                     min_step: float | None = None, max_points: int | None = None,
                     max_retakes: int = 2, exposure: Any = None, tag_timeout: float = 10.0,
                     frames_per_point: int = 1, decision_stream: str = "xsml_decisions",
                     md: dict | None = None):
    """A step scan of ``motor`` that adapts to the tags of each point.

    Parameters
    ----------
    detectors : list of readable devices
        Must include an image detector the ``callback`` tags.
    motor : settable device
    start, stop : float
        Coarse scan range (either direction).
    num : int
        Coarse points (>= 2), ``numpy.linspace(start, stop, num)``.
    callback : TaggingCallback
        The live tagger, already subscribed to the RunEngine
        (``RE.subscribe(callback)``); the plan adds a result listener for the
        duration of the run.
    engine : PolicyEngine
        Decides from the tags; it may be shared with a service that shows the
        current decision.
    refine : int
        Points inserted between a point and its neighbour (the last measured
        position before it in scan direction) when a decision says ``refine``.
    min_step : float, optional
        No refinement closer than this; default a quarter of the coarse step
        divided by ``refine + 1`` (so two levels at most).
    max_points : int, optional
        Most measurements in all (coarse, refined and retaken); default ``4 * num``.
    max_retakes : int
        Most retakes of one position for ``remeasure`` / ``count_longer``.
    exposure : settable signal, optional
        Exposure time (or count time) of the detectors; a retake multiplies it by
        the decision's ``exposure_factor`` (0.5 for ``remeasure``, 2 for
        ``count_longer`` unless the rule says otherwise) and the point's end
        restores it. It is read with every point. Without it a retake takes the
        point again unchanged.
    tag_timeout : float
        Longest wait for the tags of a point; after it the point counts as
        ``continue`` and the recorded reason says the tags did not arrive.
    frames_per_point : int
        Tag results per point (image detectors x frames per event).
    decision_stream : str
        Stream that records each decision (one event per point taken).
    md : dict, optional
        Extra start-document metadata.

    Returns
    -------
    generator
        The plan; its return value is the run uid.

    Raises
    ------
    ConfigurationError
        For options that cannot work (checked when called, before the plan runs).
    """
    import numpy as np
    from ophyd import Signal

    detectors = list(detectors)
    _check(len(detectors) > 0, "tag_steered_scan needs at least one detector")
    _check(isinstance(num, (int, np.integer)) and num >= 2,
           f"num must be an integer >= 2 (coarse points), got {num!r}")
    _check(all(math.isfinite(float(v)) for v in (start, stop)) and start != stop,
           f"start and stop must be finite and different, got {start!r}, {stop!r}")
    _check(isinstance(refine, (int, np.integer)) and refine >= 0,
           f"refine must be an integer >= 0, got {refine!r}")
    _check(max_retakes >= 0, f"max_retakes must be >= 0, got {max_retakes!r}")
    _check(tag_timeout > 0, f"tag_timeout must be > 0 seconds, got {tag_timeout!r}")
    _check(frames_per_point >= 1, f"frames_per_point must be >= 1, got {frames_per_point!r}")
    _check(isinstance(engine, PolicyEngine),
           f"engine must be a PolicyEngine, got {type(engine).__name__}")
    _check(hasattr(callback, "add_result_listener"),
           "callback must be a TaggingCallback (it needs add_result_listener)")
    max_points = 4 * int(num) if max_points is None else int(max_points)
    _check(max_points >= 1, f"max_points must be >= 1, got {max_points!r}")
    step = (float(stop) - float(start)) / (int(num) - 1)
    direction = 1.0 if step > 0 else -1.0
    if min_step is None:
        min_step = abs(step) / (4 * (refine + 1)) if refine else abs(step)
    _check(min_step > 0, f"min_step must be > 0, got {min_step!r}")
    coarse = [float(v) for v in np.linspace(float(start), float(stop), int(num))]

    waiter = TagWaiter(engine, frames_per_point=frames_per_point)
    sig = {k: Signal(name=f"xsml_{k}", value=v) for k, v in (
        ("action", ""), ("rule", ""), ("reason", ""), ("point_seq_num", 0),
        ("position", 0.0), ("params", ""))}
    readables = detectors + [motor] + ([exposure] if exposure is not None else [])
    _md = {
        "plan_name": "tag_steered_scan",
        "detectors": [d.name for d in detectors],
        "motors": [motor.name],
        "num_points": int(num),
        "plan_args": {"start": float(start), "stop": float(stop), "num": int(num),
                      "refine": int(refine), "min_step": float(min_step),
                      "max_points": max_points, "max_retakes": int(max_retakes),
                      "tag_timeout": float(tag_timeout)},
        "xsml_policy": engine.policy.model_dump(mode="json"),
        "hints": {"dimensions": [[list(getattr(motor, "hints", {}).get("fields", [motor.name])),
                                  "primary"]]},
    }
    _md.update(md or {})
    state: dict[str, Any] = {"reason": None}

    def record(decision: Decision, seq: int, position: float):
        import json

        values = {"action": decision.action, "rule": decision.rule, "reason": decision.reason,
                  "point_seq_num": seq, "position": position,
                  "params": json.dumps(decision.params, sort_keys=True, default=str)}
        for key, value in values.items():
            sig[key].put(value)
        yield from bps.trigger_and_read(list(sig.values()), name=decision_stream)

    def points():
        todo = deque(coarse)
        measured: list[float] = []
        seq = 0
        while todo and seq < max_points:
            x = todo.popleft()
            yield from bps.checkpoint()
            yield from bps.mv(motor, x)
            original = None if exposure is None else exposure.get()
            retakes = 0
            while True:
                seq += 1
                waiter.expect(seq)
                yield from bps.trigger_and_read(readables, name="primary")
                yield from bps.wait_for([waiter.awaitable(seq, tag_timeout)])
                decision = waiter.decision(seq)
                if decision is None:
                    decision = Decision(
                        action="continue", run_uid=waiter.run_uid or "",
                        reason=(f"no tags for primary seq_num {seq} within {tag_timeout:g} s; "
                                "going on without a decision"),
                        params={"tag_timeout": True})
                yield from record(decision, seq, x)
                action = decision.action
                if action in ("remeasure", "count_longer") and retakes < max_retakes \
                        and seq < max_points:
                    retakes += 1
                    if exposure is not None:
                        factor = float(decision.params.get(
                            "exposure_factor", 0.5 if action == "remeasure" else 2.0))
                        yield from bps.mv(exposure, exposure.get() * factor)
                    continue
                break
            if exposure is not None and exposure.get() != original:
                yield from bps.mv(exposure, original)
            if action == "refine" and refine:
                before = [p for p in measured if (p - x) * direction < 0]
                if before:
                    near = max(before, key=lambda p: p * direction)
                    gap = abs(x - near) / (refine + 1)
                    if gap >= min_step * (1 - 1e-9):
                        new = [float(v) for v in np.linspace(near, x, refine + 2)[1:-1]]
                        todo.extendleft(reversed(new))
            measured.append(x)
            if action == "pause":
                yield from bps.checkpoint()
                yield from bps.pause()
            elif action == "stop":
                state["reason"] = f"stopped by policy: {decision.reason}"
                return
        if todo:
            state["reason"] = (f"max_points={max_points} reached with {len(todo)} "
                               "planned point(s) left")

    def run():
        from bluesky.utils import RunEngineControlException

        uid = yield from bps.open_run(_md)
        waiter.run_uid = uid

        def except_plan(e):
            if isinstance(e, RunEngineControlException):
                yield from bps.close_run(exit_status=e.exit_status)
            else:
                yield from bps.close_run(exit_status="fail", reason=str(e))

        def else_plan():
            yield from bps.close_run(reason=state["reason"])

        yield from bpp.contingency_wrapper(points(), except_plan=except_plan,
                                           else_plan=else_plan)
        return uid

    def plan():
        callback.add_result_listener(waiter)

        def cleanup():
            callback.remove_result_listener(waiter)
            yield from bps.null()

        return (yield from bpp.finalize_wrapper(run(), cleanup()))

    return plan()
