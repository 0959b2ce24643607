"""The steering policy: recent tag results in, one decision out.

A :class:`Policy` is an ordered list of :class:`Rule` objects. :func:`decide`
is a pure function of a policy and the recent frames of one run: the first
rule (in list order) whose condition holds on the newest frame gives the
decision; when none holds the decision is ``continue``. :class:`PolicyEngine`
keeps the recent frames of each run, calls :func:`decide` as results arrive
from :class:`~bluesky_xsml.documents.callback.TaggingCallback`, and holds the
current decision and a bounded history. Policies load from JSON or YAML and
can be replaced while running (:meth:`PolicyEngine.set_policy`).

Rule kinds (the condition each tests; ``tags`` is the rule's tag list):

``consecutive``
    The newest ``count`` tagged frames each carry one of ``tags``.
``latest``
    The newest frame carries one of ``tags``.
``appears``
    The newest frame carries one of ``tags`` that none of the ``window``
    tagged frames before it carried (and at least ``min_history`` frames
    came before it).
``changes``
    The newest frame's tags, restricted to ``tags``, differ from those of
    the tagged frame before it.
``only``
    The newest frame carries at least one tag and all of its tags are in
    ``tags``.
``skipped``
    The newest ``count`` frames were all skipped (could not be tagged).
``novel``
    The newest ``count`` tagged frames were each flagged novel by the
    tagger's novelty score (docs/novelty.md); ``tags`` is not used. See
    :func:`novelty_rule` for a rule that pauses and asks for a label.

Only ``skipped`` looks at skipped frames; the other kinds look at tagged
frames and hold only when the newest frame is tagged, so a skipped frame never
repeats an earlier decision.

Examples
--------
>>> from bluesky_xsml.steering.policy import FrameRef, Policy, decide
>>> policy = Policy()  # the default rules
>>> [rule.name for rule in policy.rules]
['beam_off', 'saturation', 'new_feature', 'weak_only']
>>> frames = [FrameRef(seq_num=i, tags=["beam_off"]) for i in (1, 2, 3)]
>>> d = decide(policy, frames)
>>> d.action, d.rule, [f.seq_num for f in d.evidence]
('pause', 'beam_off', [1, 2, 3])
>>> decide(policy, frames[:2]).action
'continue'
"""

from __future__ import annotations

import json
import math
import re
import threading
import time as _time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import ConfigurationError
from ..tags import TAG_NAMES, TAGS

__all__ = [
    "ACTIONS",
    "Action",
    "RuleKind",
    "novelty_rule",
    "FrameRef",
    "Rule",
    "Policy",
    "Decision",
    "PolicyEngine",
    "decide",
    "default_rules",
    "STRUCTURE_TAGS",
    "PARAM_BOUNDS",
    "check_param",
]

Action = Literal["continue", "pause", "remeasure", "refine", "count_longer", "stop"]
#: Every action a decision can carry.
ACTIONS: tuple[str, ...] = ("continue", "pause", "remeasure", "refine", "count_longer", "stop")

RuleKind = Literal["consecutive", "latest", "appears", "changes", "only", "skipped", "novel"]

#: Closed ranges of the rule parameters the plans act on (a factor of 1e300 is refused).
PARAM_BOUNDS: dict[str, tuple[float, float]] = {
    "exposure_factor": (0.01, 100.0),   # multiplies the exposure (remeasure, count_longer)
    "step_factor": (0.01, 1.0),         # fraction of the step for refine
}
_PARAM_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_MAX_PARAMS = 16
_MAX_ABS = 1e9
_MAX_TEXT = 256


def check_param(name: str, value: Any, bounds: tuple[float, float] | None = None) -> Any:
    """``value`` if it is an acceptable value of rule/plan parameter ``name``, else ValueError.

    Values are ``None``, booleans, short strings or finite numbers with
    ``|x| <= 1e9``; a name in :data:`PARAM_BOUNDS` (or given ``bounds``) must
    be a number within its range.

    >>> check_param("exposure_factor", 0.5)
    0.5
    >>> check_param("exposure_factor", 1e300)
    Traceback (most recent call last):
    ...
    ValueError: exposure_factor must be a number from 0.01 to 100, got 1e+300
    """
    if not isinstance(name, str) or _PARAM_NAME.fullmatch(name) is None:
        raise ValueError(f"parameter name {name!r} must be 1-64 letters, digits or _, "
                         "not starting with a digit")
    bounds = bounds if bounds is not None else PARAM_BOUNDS.get(name)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if bounds is not None:
        lo, hi = bounds
        if not (is_number and math.isfinite(value) and lo <= value <= hi):
            raise ValueError(f"{name} must be a number from {lo:g} to {hi:g}, got {value!r}")
        return value
    if value is None or isinstance(value, bool):
        return value
    if is_number:
        if not (math.isfinite(value) and abs(value) <= _MAX_ABS):
            raise ValueError(f"{name} must be finite and at most {_MAX_ABS:g} in size, "
                             f"got {value!r}")
        return value
    if isinstance(value, str):
        if len(value) > _MAX_TEXT:
            raise ValueError(f"{name} must be at most {_MAX_TEXT} characters long")
        return value
    raise ValueError(f"{name} must be a number, a boolean, a string or null, "
                     f"not {type(value).__name__}")


#: Tags whose appearance means the sample's structure changed (default ``new_feature`` rule).
STRUCTURE_TAGS: tuple[str, ...] = tuple(t.name for t in TAGS if t.group == "scattering")


class FrameRef(BaseModel):
    """A reference to one tagged (or skipped) source frame: the evidence of a decision.

    Parameters
    ----------
    run_uid, stream, seq_num, key, frame_index
        Where the frame is: run, event stream, event sequence number, data key and
        index within the event's value.
    tags : list of str
        Tags at or above threshold (empty when skipped).
    skip_reason : str
        Why the frame could not be tagged; ``""`` when it was tagged.
    novel : bool
        The tagger flagged the frame novel (its novelty score is above the
        threshold); False when skipped or when novelty is unavailable.
    """

    model_config = ConfigDict(extra="forbid")

    run_uid: str = ""
    stream: str = "primary"
    seq_num: int = 0
    key: str = ""
    frame_index: int = 0
    tags: list[str] = Field(default_factory=list)
    skip_reason: str = ""
    novel: bool = False

    @property
    def skipped(self) -> bool:
        """True when the frame was not tagged."""
        return bool(self.skip_reason)

    @classmethod
    def from_result(cls, run_uid: str, result: Any) -> FrameRef:
        """Build from a :class:`~bluesky_xsml.documents.compose.FrameResult`.

        A result with ``probs`` None is a skipped frame; when it carries no skip
        reason, ``"skipped"`` is recorded so it still counts as skipped.
        """
        skipped = getattr(result, "probs", None) is None
        reason = str(getattr(result, "skip_reason", "") or "")
        if skipped and not reason:
            reason = "skipped"
        return cls(run_uid=run_uid, stream=str(result.stream), seq_num=int(result.seq_num),
                   key=str(result.key), frame_index=int(result.frame_index),
                   tags=[] if skipped else [str(t) for t in result.tags],
                   skip_reason=reason if skipped else "",
                   novel=not skipped and bool(getattr(result, "novel", False)))


def _check_tags(names: Iterable[str], what: str) -> list[str]:
    names = list(names)
    bad = [n for n in names if n not in TAG_NAMES]
    if bad:
        raise ValueError(f"{what}: unknown tag(s) {bad}; valid tags are: {', '.join(TAG_NAMES)}")
    return names


class Rule(BaseModel):
    """One steering rule: a condition on recent frames and the action it asks for.

    Parameters
    ----------
    name : str
        Identifier, unique within a policy; recorded in decisions.
    kind : str
        The condition (see the module docstring): ``consecutive``, ``latest``,
        ``appears``, ``changes``, ``only`` or ``skipped``.
    tags : list of str
        Tags the condition looks at (names from :data:`~bluesky_xsml.tags.TAG_NAMES`);
        unused by ``skipped``.
    action : str
        One of :data:`ACTIONS`.
    count : int
        Frames in a row for ``consecutive`` and ``skipped``.
    window : int
        Frames looked back on by ``appears``.
    min_history : int
        Tagged frames that must precede the newest for ``appears``/``changes``
        to hold (a run's first frame is not a change).
    params : dict
        Copied into the decision (e.g. ``{"exposure_factor": 0.5}``) for whoever acts on it:
        at most 16, each a number, boolean, string or null; those in
        :data:`PARAM_BOUNDS` within their range (see :func:`check_param`).
    enabled : bool
        Disabled rules are kept but never hold.
    description : str
        Free text shown with the rule.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    kind: RuleKind
    tags: list[str] = Field(default_factory=list)
    action: Action
    count: int = Field(default=1, ge=1, le=1000)
    window: int = Field(default=5, ge=1, le=1000)
    min_history: int = Field(default=1, ge=0, le=1000)
    params: dict[str, Any] = Field(default_factory=dict)
    enabled: bool = True
    description: str = ""

    @field_validator("tags")
    @classmethod
    def _known_tags(cls, v: list[str]) -> list[str]:
        return _check_tags(v, "rule tags")

    @field_validator("params")
    @classmethod
    def _bounded_params(cls, v: dict[str, Any]) -> dict[str, Any]:
        if len(v) > _MAX_PARAMS:
            raise ValueError(f"at most {_MAX_PARAMS} params, got {len(v)}")
        return {name: check_param(name, value) for name, value in v.items()}

    @model_validator(mode="after")
    def _tags_needed(self) -> Rule:
        if self.kind not in ("skipped", "novel") and not self.tags:
            raise ValueError(f"rule {self.name!r} of kind {self.kind!r} needs at least one tag")
        return self

    @property
    def lookback(self) -> int:
        """How many recent frames this rule can look at."""
        if self.kind in ("consecutive", "skipped", "novel"):
            return self.count
        if self.kind == "appears":
            return max(self.window, self.min_history) + 1
        if self.kind == "changes":
            return max(2, self.min_history + 1)
        return 1


def default_rules() -> list[Rule]:
    """The default rules, in priority order.

    ``beam_off`` on 3 frames in a row pauses; ``saturation`` re-measures with half
    the exposure; a scattering feature not seen in the last 5 frames refines around
    the position; a frame showing nothing but ``weak_scattering`` counts twice as long.
    """
    return [
        Rule(name="beam_off", kind="consecutive", tags=["beam_off"], count=3, action="pause",
             description="no beam on three frames in a row"),
        Rule(name="saturation", kind="latest", tags=["saturation"], action="remeasure",
             params={"exposure_factor": 0.5}, description="clipped pixels: shorter exposure"),
        Rule(name="new_feature", kind="appears", tags=list(STRUCTURE_TAGS), window=5,
             min_history=1, action="refine", params={"step_factor": 0.25},
             description="a scattering feature appeared: refine around this position"),
        Rule(name="weak_only", kind="only", tags=["weak_scattering"], action="count_longer",
             params={"exposure_factor": 2.0}, description="only weak scattering: count longer"),
    ]


def novelty_rule(count: int = 3) -> Rule:
    """A rule that pauses and asks for a label when ``count`` frames in a row are novel.

    Not among the default rules (a tagger without novelty statistics never
    flags a frame); add it in front of them to use it::

        Policy(rules=[novelty_rule(), *default_rules()])

    >>> novelty_rule().kind, novelty_rule().action, novelty_rule().params
    ('novel', 'pause', {'ask_label': True})
    """
    return Rule(name="novel_frames", kind="novel", count=count, action="pause",
                params={"ask_label": True},
                description=f"{count} frames in a row unlike anything the tagger was trained "
                            "on: pause and ask for a label")


class Policy(BaseModel):
    """An ordered list of rules; the first that holds decides.

    ``Policy()`` (or ``Policy.model_validate({})``) has the default rules
    (:func:`default_rules`); ``Policy(rules=[])`` always continues.

    Examples
    --------
    >>> p = Policy.model_validate({"rules": [
    ...     {"name": "gone", "kind": "consecutive", "tags": ["beam_off"], "count": 2,
    ...      "action": "stop"}]})
    >>> p.rules[0].action, p.lookback
    ('stop', 2)
    >>> Policy.loads("rules: []", format="yaml").rules
    []
    """

    model_config = ConfigDict(extra="forbid")

    name: str = "default"
    rules: list[Rule] = Field(default_factory=default_rules, max_length=100)

    @field_validator("rules")
    @classmethod
    def _unique_names(cls, v: list[Rule]) -> list[Rule]:
        names = [r.name for r in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"rule names must be unique; repeated: {dup}")
        return v

    @property
    def lookback(self) -> int:
        """Frames per run a :class:`PolicyEngine` must keep for this policy."""
        return max([r.lookback for r in self.rules if r.enabled] + [1])

    @classmethod
    def loads(cls, text: str, *, format: Literal["json", "yaml"] = "json") -> Policy:
        """Parse a policy from JSON or YAML text.

        Raises
        ------
        ConfigurationError
            If the text cannot be parsed or does not describe a valid policy.
        """
        try:
            if format == "json":
                data = json.loads(text)
            elif format == "yaml":
                import yaml

                data = yaml.safe_load(text)
            else:
                raise ConfigurationError(f"unknown policy format {format!r}; use 'json' or 'yaml'")
        except ConfigurationError:
            raise
        except Exception as err:
            raise ConfigurationError(f"cannot parse policy {format}: {err}") from err
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigurationError(
                f"a policy must be a mapping with a 'rules' list, got {type(data).__name__}")
        from pydantic import ValidationError

        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigurationError(f"invalid policy: {err}") from err

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        """Load a policy from a ``.json``, ``.yaml`` or ``.yml`` file.

        Raises
        ------
        ConfigurationError
            For an unknown suffix, an unreadable file or an invalid policy
            (the message names the file).
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".json", ".yaml", ".yml"):
            raise ConfigurationError(
                f"policy file {path} must end in .json, .yaml or .yml, not {suffix or 'nothing'!r}")
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigurationError(f"cannot read policy file {path}: {err}") from err
        try:
            return cls.loads(text, format="json" if suffix == ".json" else "yaml")
        except ConfigurationError as err:
            raise ConfigurationError(f"{path}: {err}") from err

    def dumps(self, *, format: Literal["json", "yaml"] = "json") -> str:
        """The policy as JSON or YAML text (round-trips through :meth:`loads`)."""
        data = self.model_dump(mode="json")
        if format == "yaml":
            import yaml

            return yaml.safe_dump(data, sort_keys=False)
        return json.dumps(data, indent=2)


class Decision(BaseModel):
    """What the policy asks for, why, and on which frames.

    Parameters
    ----------
    action : str
        One of :data:`ACTIONS`.
    reason : str
        A sentence a person can read.
    evidence : list of FrameRef
        The frames the rule's condition held on (newest last).
    params : dict
        The rule's params plus what matched (``tags``: the tags that triggered it).
    rule : str
        Name of the rule that decided; ``""`` for the default ``continue``.
    run_uid : str
        The run the frames belong to.
    time : float
        When the decision was made (Unix seconds).
    uid : str
        Unique id (used to approve queued decisions).
    """

    model_config = ConfigDict(extra="forbid")

    action: Action = "continue"
    reason: str = "no rule applies"
    evidence: list[FrameRef] = Field(default_factory=list)
    params: dict[str, Any] = Field(default_factory=dict)
    rule: str = ""
    run_uid: str = ""
    time: float = Field(default_factory=_time.time)
    uid: str = Field(default_factory=lambda: uuid.uuid4().hex)


def _where(frames: Sequence[FrameRef]) -> str:
    if not frames:
        return "no frames"
    stream = frames[-1].stream
    seqs = [f.seq_num for f in frames]
    if len(seqs) == 1:
        return f"{stream} seq_num {seqs[0]}"
    return f"{stream} seq_num {seqs[0]}..{seqs[-1]}"


def _evaluate(rule: Rule, recent: Sequence[FrameRef]
              ) -> tuple[list[FrameRef], list[str], str] | None:
    """``(evidence, matched tags, reason)`` when ``rule`` holds on ``recent``, else None."""
    if not recent:
        return None
    wanted = set(rule.tags)
    if rule.kind == "skipped":
        last = list(recent[-rule.count:])
        if len(last) == rule.count and all(f.skipped for f in last):
            reasons = sorted({f.skip_reason for f in last})
            return last, [], (f"{rule.count} frame(s) in a row could not be tagged "
                              f"({', '.join(reasons)}) at {_where(last)}")
        return None
    newest = recent[-1]
    if newest.skipped:
        return None
    tagged = [f for f in recent if not f.skipped]
    if rule.kind == "consecutive":
        last = tagged[-rule.count:]
        if len(last) < rule.count:
            return None
        hits = [wanted.intersection(f.tags) for f in last]
        if all(hits):
            matched = sorted(set().union(*hits))
            return last, matched, (f"{', '.join(matched)} on {rule.count} frame(s) in a row "
                                   f"at {_where(last)}")
        return None
    if rule.kind == "novel":
        last = tagged[-rule.count:]
        if len(last) == rule.count and all(f.novel for f in last):
            return last, [], (f"{rule.count} frame(s) in a row unlike the training frames "
                              f"(novel) at {_where(last)}")
        return None
    if rule.kind == "latest":
        matched = sorted(wanted.intersection(newest.tags))
        if matched:
            return [newest], matched, f"{', '.join(matched)} at {_where([newest])}"
        return None
    if rule.kind == "only":
        if newest.tags and set(newest.tags) <= wanted:
            matched = sorted(set(newest.tags))
            return [newest], matched, (f"nothing but {', '.join(matched)} at "
                                       f"{_where([newest])}")
        return None
    before = tagged[:-1]
    if len(before) < rule.min_history:
        return None
    if rule.kind == "appears":
        window = before[-rule.window:]
        seen = set().union(*(set(f.tags) for f in window)) if window else set()
        matched = sorted(wanted.intersection(newest.tags) - seen)
        if matched:
            evidence = ([window[-1]] if window else []) + [newest]
            return evidence, matched, (f"{', '.join(matched)} appeared at {_where([newest])}, "
                                       f"absent from the {len(window)} frame(s) before")
        return None
    if rule.kind == "changes":
        if not before:
            return None
        prev = before[-1]
        was, now = wanted.intersection(prev.tags), wanted.intersection(newest.tags)
        if was != now:
            gained, lost = sorted(now - was), sorted(was - now)
            parts = ([f"gained {', '.join(gained)}"] if gained else []) + (
                [f"lost {', '.join(lost)}"] if lost else [])
            return [prev, newest], sorted(now ^ was), (
                f"tags changed between {_where([prev])} and {_where([newest])}: "
                + "; ".join(parts))
        return None
    raise AssertionError(f"unhandled rule kind {rule.kind!r}")  # pragma: no cover


def decide(policy: Policy, recent: Sequence[Any], *, run_uid: str | None = None,
           now: float | None = None) -> Decision:
    """Decide from the recent frames of one run (oldest first).

    Pure: the result depends only on ``policy`` and ``recent`` (and ``now``,
    recorded as the decision time). The first enabled rule that holds on the
    newest frame decides; if none holds the action is ``continue``.

    Parameters
    ----------
    policy : Policy
    recent : sequence of FrameRef or FrameResult
        Frames of one run, oldest first. ``FrameResult`` objects are converted
        with :meth:`FrameRef.from_result` (with ``run_uid``).
    run_uid : str, optional
        Recorded in the decision; defaults to the newest frame's ``run_uid``.
    now : float, optional
        Decision time; defaults to the current time.

    Returns
    -------
    Decision
    """
    frames = [f if isinstance(f, FrameRef) else FrameRef.from_result(run_uid or "", f)
              for f in recent]
    if run_uid is None:
        run_uid = frames[-1].run_uid if frames else ""
    stamp = _time.time() if now is None else float(now)
    for rule in policy.rules:
        if not rule.enabled:
            continue
        hit = _evaluate(rule, frames)
        if hit is None:
            continue
        evidence, matched, why = hit
        params = dict(rule.params)
        params["tags"] = matched
        return Decision(action=rule.action, reason=f"{rule.name}: {why}", evidence=evidence,
                        params=params, rule=rule.name, run_uid=run_uid, time=stamp)
    if frames:
        reason = f"no rule applies at {_where(frames[-1:])}"
        evidence = frames[-1:]
    else:
        reason, evidence = "no frames yet", []
    return Decision(action="continue", reason=reason, evidence=evidence, run_uid=run_uid,
                    time=stamp)


class _RunWindow:
    """The last ``size`` frames of a run and its last ``size`` tagged frames, in arrival order.

    Rules count tagged frames (``consecutive``, ``appears``) or all frames
    (``skipped``); keeping both tails bounds memory at ``2 * size`` frames while
    giving :func:`decide` exactly what it would see with the full run.
    """

    def __init__(self, size: int):
        self._n = 0
        self._all: deque[tuple[int, FrameRef]] = deque(maxlen=max(size, 1))
        self._tagged: deque[tuple[int, FrameRef]] = deque(maxlen=max(size, 1))

    def resize(self, size: int) -> None:
        self._all = deque(self._all, maxlen=max(size, 1))
        self._tagged = deque(self._tagged, maxlen=max(size, 1))

    @staticmethod
    def _key(ref: FrameRef) -> tuple:
        return ref.stream, ref.seq_num, ref.key, ref.frame_index

    def append(self, ref: FrameRef) -> bool:
        """Add ``ref``; False (and nothing added) if the same frame is already held."""
        key = self._key(ref)
        if any(self._key(r) == key for _, r in self._all) or any(
                self._key(r) == key for _, r in self._tagged):
            return False
        item = (self._n, ref)
        self._n += 1
        self._all.append(item)
        if not ref.skipped:
            self._tagged.append(item)
        return True

    def frames(self) -> list[FrameRef]:
        merged = dict(self._tagged)
        merged.update(self._all)
        return [merged[i] for i in sorted(merged)]


class PolicyEngine:
    """Keeps recent frames per run and the current decision; thread-safe.

    Register :meth:`update` as a result listener of a
    :class:`~bluesky_xsml.documents.callback.TaggingCallback`
    (``callback.add_result_listener(engine.update)``) or call it directly.

    Parameters
    ----------
    policy : Policy, optional
        Defaults to ``Policy()`` (the default rules).
    history_size : int
        Most decisions kept in :attr:`history`.
    max_runs : int
        Runs whose recent frames are kept (oldest forgotten first).
    keep : int
        Frames (and tagged frames) kept per run at least, beyond what the policy
        needs, so a policy loaded later can look further back.

    Examples
    --------
    >>> from bluesky_xsml.documents.compose import FrameResult
    >>> engine = PolicyEngine()
    >>> r = [FrameResult("primary", i, "", "img", 0, [0.0], tags=("beam_off",))
    ...      for i in (1, 2, 3)]
    >>> engine.update("run1", r).action
    'pause'
    >>> engine.current.rule, len(engine.history)
    ('beam_off', 1)
    """

    def __init__(self, policy: Policy | None = None, *, history_size: int = 1000,
                 max_runs: int = 16, keep: int = 32):
        if history_size < 1 or max_runs < 1 or keep < 1:
            raise ConfigurationError("history_size, max_runs and keep must be at least 1, got "
                                     f"{history_size}, {max_runs}, {keep}")
        self._keep = keep
        self._lock = threading.RLock()
        self._policy = policy if policy is not None else Policy()
        self._recent: OrderedDict[str, _RunWindow] = OrderedDict()
        self._max_runs = max_runs
        self._history: deque[Decision] = deque(maxlen=history_size)
        self._current = decide(self._policy, [])
        self._listeners: list[Callable[[Decision], None]] = []
        self._last: dict[str, Decision] = {}
        self._updates = 0

    @property
    def policy(self) -> Policy:
        """The policy in force."""
        with self._lock:
            return self._policy

    def set_policy(self, policy: Policy) -> None:
        """Replace the policy (takes effect from the next :meth:`update`).

        Recent frames are kept, so a new rule can hold on frames seen before the change.
        """
        if not isinstance(policy, Policy):
            raise TypeError(f"set_policy needs a Policy, got {type(policy).__name__}")
        with self._lock:
            self._policy = policy
            for window in self._recent.values():
                window.resize(max(policy.lookback, self._keep))

    @property
    def current(self) -> Decision:
        """The latest decision (``continue`` with reason ``no frames yet`` at first)."""
        with self._lock:
            return self._current

    @property
    def history(self) -> list[Decision]:
        """Decisions other than ``continue``, and each ``continue`` that ended one, oldest first."""
        with self._lock:
            return list(self._history)

    @property
    def updates(self) -> int:
        """How many times :meth:`update` has run."""
        with self._lock:
            return self._updates

    def add_listener(self, listener: Callable[[Decision], None]) -> None:
        """Call ``listener(decision)`` after every update (exceptions are logged, not raised)."""
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[Decision], None]) -> None:
        """Stop calling ``listener``."""
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def recent(self, run_uid: str) -> list[FrameRef]:
        """The frames of ``run_uid`` the policy currently looks at (oldest first)."""
        with self._lock:
            window = self._recent.get(run_uid)
            return window.frames() if window is not None else []

    def update(self, run_uid: str, results: Sequence[Any]) -> Decision:
        """Take a batch of results of one run and return the decision.

        Each frame is added in order and the policy is asked after each; the
        batch's decision is the one from the highest-priority rule that held on
        any of its frames (the ``continue`` after its last frame when none held),
        so a condition met in the middle of a batch is not lost.

        Frames already held for the run (same stream, seq_num, key and
        frame_index) are ignored, so delivering a batch twice changes nothing:
        a batch with no new frame returns the run's latest decision and records
        nothing.

        Parameters
        ----------
        run_uid : str
        results : sequence of FrameResult or FrameRef

        Returns
        -------
        Decision
        """
        with self._lock:
            policy = self._policy
            window = self._recent.get(run_uid)
            if window is None:
                window = _RunWindow(max(policy.lookback, self._keep))
                self._recent[run_uid] = window
                while len(self._recent) > self._max_runs:
                    self._recent.popitem(last=False)
            else:
                self._recent.move_to_end(run_uid)
            order = {r.name: i for i, r in enumerate(policy.rules)}
            best: Decision | None = None
            last: Decision | None = None
            for item in results:
                ref = item if isinstance(item, FrameRef) else FrameRef.from_result(run_uid, item)
                if ref.run_uid != run_uid:
                    ref = ref.model_copy(update={"run_uid": run_uid})
                if not window.append(ref):
                    continue  # delivered twice (e.g. the engine is registered twice)
                last = decide(policy, window.frames(), run_uid=run_uid)
                if last.action != "continue" and (best is None
                                                  or order[last.rule] < order[best.rule]):
                    best = last
            if last is None:  # nothing new: the run's latest decision stands, nothing recorded
                known = self._last.get(run_uid)
                return known if known is not None else decide(policy, window.frames(),
                                                                run_uid=run_uid)
            decision = best or last
            self._last[run_uid] = decision
            while len(self._last) > self._max_runs:
                self._last.pop(next(iter(self._last)))
            previous = self._current
            self._current = decision
            self._updates += 1
            if decision.action != "continue" or previous.action != "continue":
                self._history.append(decision)
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(decision)
            except Exception:  # a listener must never break tagging
                import logging

                logging.getLogger(__name__).exception("decision listener failed")
        return decision
