"""The steering policy: default rules, rule kinds, loading, the engine and hot reload."""

from __future__ import annotations

import json
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bluesky_xsml.documents.compose import FrameResult
from bluesky_xsml.errors import ConfigurationError
from bluesky_xsml.steering.policy import (
    ACTIONS,
    Decision,
    FrameRef,
    Policy,
    PolicyEngine,
    Rule,
    decide,
)
from bluesky_xsml.tags import TAG_NAMES


def ref(seq, *tags, skip=""):
    return FrameRef(run_uid="r", seq_num=seq, key="img", tags=list(tags), skip_reason=skip)


def result(seq, *tags, skip=""):
    probs = None if skip else [0.0] * len(TAG_NAMES)
    return FrameResult("primary", seq, f"ev{seq}", "img", 0, probs, skip_reason=skip,
                       tags=tuple(tags))


# ---------------------------------------------------------------- default rules

def test_beam_off_three_in_a_row_pauses():
    frames = [ref(1, "ring_isotropic"), ref(2, "beam_off"), ref(3, "beam_off"), ref(4, "beam_off")]
    d = decide(Policy(), frames)
    assert d.action == "pause"
    assert d.rule == "beam_off"
    assert [f.seq_num for f in d.evidence] == [2, 3, 4]
    assert "beam_off on 3 frame(s) in a row" in d.reason
    assert "seq_num 2..4" in d.reason


def test_beam_off_interrupted_does_not_pause():
    frames = [ref(1, "beam_off"), ref(2, "beam_off"), ref(3, "halo_isotropic"), ref(4, "beam_off")]
    assert decide(Policy(), frames).action != "pause"
    assert decide(Policy(), frames[:2]).action == "continue"


def test_skipped_frames_neither_count_nor_break_a_streak():
    frames = [ref(1, "beam_off"), ref(2, skip="bad_shape"), ref(3, "beam_off"), ref(4, "beam_off")]
    d = decide(Policy(), frames)
    assert d.action == "pause"
    assert [f.seq_num for f in d.evidence] == [1, 3, 4]
    # A skipped newest frame never repeats an earlier decision.
    assert decide(Policy(), [*frames, ref(5, skip="missing_file")]).action == "continue"


def test_saturation_remeasures_with_shorter_exposure():
    d = decide(Policy(), [ref(1, "ring_isotropic"), ref(2, "ring_isotropic", "saturation")])
    assert d.action == "remeasure"
    assert d.params["exposure_factor"] == 0.5
    assert d.params["tags"] == ["saturation"]
    assert [f.seq_num for f in d.evidence] == [2]


def test_new_feature_refines_only_when_new():
    base = [ref(1, "halo_isotropic"), ref(2, "halo_isotropic")]
    d = decide(Policy(), [*base, ref(3, "ring_oriented", "halo_isotropic")])
    assert d.action == "refine"
    assert d.params["tags"] == ["ring_oriented"]
    assert d.params["step_factor"] == 0.25
    assert [f.seq_num for f in d.evidence] == [2, 3]
    assert "ring_oriented appeared" in d.reason
    # Already present in the window: not new.
    seen = [*base, ref(3, "ring_oriented"), ref(4, "ring_oriented")]
    assert decide(Policy(), seen).action == "continue"
    # A run's first frame is not a change (min_history=1).
    assert decide(Policy(), [ref(1, "ring_oriented")]).action == "continue"


def test_new_feature_returns_after_leaving_the_window():
    window = Policy().rules[2].window
    frames = [ref(0, "ring_oriented")] + [ref(i, "halo_isotropic") for i in range(1, window + 1)]
    assert decide(Policy(), [*frames, ref(99, "ring_oriented")]).action == "refine"
    assert decide(Policy(), [*frames[1:-1], ref(0, "ring_oriented"), *frames[-1:],
                             ref(99, "ring_oriented")]).action == "continue"


def test_weak_only_counts_longer_but_not_with_other_tags():
    d = decide(Policy(), [ref(1, "weak_scattering")])
    assert (d.action, d.params["exposure_factor"]) == ("count_longer", 2.0)
    assert decide(Policy(), [ref(1, "weak_scattering", "detector_gaps")]).action == "continue"
    assert decide(Policy(), [ref(1)]).action == "continue"


def test_priority_is_rule_order():
    frames = [ref(1, "beam_off", "saturation"), ref(2, "beam_off", "saturation"),
              ref(3, "beam_off", "saturation")]
    assert decide(Policy(), frames).action == "pause"
    reordered = Policy(rules=[Policy().rules[1], Policy().rules[0]])
    assert decide(reordered, frames).action == "remeasure"


def test_no_frames_and_empty_policy_continue():
    d = decide(Policy(), [])
    assert (d.action, d.reason, d.evidence) == ("continue", "no frames yet", [])
    frames = [ref(i, "beam_off", "saturation") for i in range(5)]
    d = decide(Policy(rules=[]), frames)
    assert d.action == "continue" and d.rule == ""
    assert d.evidence == frames[-1:]


def test_disabled_rule_never_holds():
    p = Policy()
    p.rules[1].enabled = False
    assert decide(p, [ref(1, "saturation")]).action == "continue"


# ---------------------------------------------------------------- other rule kinds

def test_changes_and_skipped_kinds():
    p = Policy(rules=[
        Rule(name="lost", kind="skipped", count=2, action="stop"),
        Rule(name="changed", kind="changes", tags=["ring_oriented", "ring_isotropic"],
             action="refine"),
    ])
    d = decide(p, [ref(1, "ring_oriented"), ref(2, "ring_isotropic", "horizon")])
    assert d.action == "refine"
    assert d.params["tags"] == ["ring_isotropic", "ring_oriented"]
    assert "gained ring_isotropic; lost ring_oriented" in d.reason
    assert decide(p, [ref(1, "ring_oriented"), ref(2, "ring_oriented", "horizon")]).action \
        == "continue"
    d = decide(p, [ref(1, "ring_oriented"), ref(2, skip="missing_file"),
                   ref(3, skip="bad_shape")])
    assert d.action == "stop"
    assert "(bad_shape, missing_file)" in d.reason
    assert [f.seq_num for f in d.evidence] == [2, 3]


def test_frame_results_are_accepted_and_skips_recorded():
    d = decide(Policy(), [result(1, "beam_off"), result(2, "beam_off"), result(3, "beam_off")],
               run_uid="abc")
    assert d.action == "pause" and d.run_uid == "abc"
    assert all(f.run_uid == "abc" and f.key == "img" for f in d.evidence)
    skipped = FrameRef.from_result("abc", result(4, "beam_off", skip="bad_dtype"))
    assert skipped.skipped and skipped.tags == [] and skipped.skip_reason == "bad_dtype"
    # A result with no probabilities is skipped even without a reason.
    unnamed = FrameResult("primary", 5, "", "img", 0, None)
    assert FrameRef.from_result("abc", unnamed).skip_reason == "skipped"


# ---------------------------------------------------------------- exhaustive checks

tag_sets = st.lists(st.sampled_from(["beam_off", "saturation", "weak_scattering",
                                     "ring_oriented", "halo_isotropic", "detector_gaps"]),
                    max_size=3, unique=True)
frames_st = st.lists(st.tuples(tag_sets, st.booleans()), max_size=12).map(
    lambda items: [ref(i, *(() if skip else tags), skip="bad_shape" if skip else "")
                   for i, (tags, skip) in enumerate(items)])


def oracle(frames):
    """The default rules, written independently and plainly."""
    if not frames or frames[-1].skipped:
        return "continue"
    tagged = [f for f in frames if not f.skipped]
    newest = set(tagged[-1].tags)
    if len(tagged) >= 3 and all("beam_off" in f.tags for f in tagged[-3:]):
        return "pause"
    if "saturation" in newest:
        return "remeasure"
    structure = {"ring_oriented", "halo_isotropic"}
    before = tagged[:-1][-5:]
    if before and (newest & structure) - set().union(*(set(f.tags) for f in before)):
        return "refine"
    if newest and newest <= {"weak_scattering"}:
        return "count_longer"
    return "continue"


@settings(max_examples=400, deadline=None)
@given(frames_st)
def test_default_policy_matches_an_independent_oracle(frames):
    d = decide(Policy(), frames)
    assert d.action == oracle(frames)
    assert all(e in frames for e in d.evidence)
    if d.action != "continue":
        assert d.evidence[-1] == frames[-1]
        assert d.reason.startswith(d.rule + ": ")


@settings(max_examples=200, deadline=None)
@given(frames_st)
def test_first_holding_rule_decides(frames):
    policy = Policy()
    alone = [decide(Policy(rules=[r]), frames) for r in policy.rules]
    expected = next((d for d in alone if d.action != "continue"), None)
    d = decide(policy, frames, now=1.0)
    again = decide(policy, frames, now=1.0)
    assert d.model_dump(exclude={"uid"}) == again.model_dump(exclude={"uid"})  # pure
    if expected is None:
        assert d.action == "continue"
    else:
        assert (d.action, d.rule, d.reason, d.evidence) == (
            expected.action, expected.rule, expected.reason, expected.evidence)


@settings(max_examples=150, deadline=None)
@given(frames_st, st.integers(1, 5), st.sampled_from([1, 32]))
def test_engine_batch_equals_most_urgent_prefix(frames, batch, keep):
    # keep=1: the engine holds only what the policy needs (2 x lookback frames at most).
    engine = PolicyEngine(keep=keep)
    order = {r.name: i for i, r in enumerate(engine.policy.rules)}
    for start in range(0, len(frames), batch):
        chunk = frames[start:start + batch]
        got = engine.update("r", chunk)
        prefixes = [decide(engine.policy, frames[:start + k + 1]) for k in range(len(chunk))]
        held = [p for p in prefixes if p.action != "continue"]
        if held:
            want = min(held, key=lambda p: order[p.rule])
            assert (got.action, got.rule, got.evidence) == (want.action, want.rule, want.evidence)
        else:
            assert got.action == "continue"
            assert got.evidence == frames[start + len(chunk) - 1:start + len(chunk)]
        assert engine.current is got
        assert len(engine.recent("r")) <= 2 * max(engine.policy.lookback, keep)
    assert all(d.action in ACTIONS for d in engine.history)


# ---------------------------------------------------------------- engine

def test_engine_keeps_runs_apart_and_records_history():
    engine = PolicyEngine()
    seen = []
    engine.add_listener(seen.append)
    engine.update("a", [result(1, "beam_off"), result(2, "beam_off")])
    assert engine.update("b", [result(1, "beam_off")]).action == "continue"
    d = engine.update("a", [result(3, "beam_off")])
    assert d.action == "pause" and d.run_uid == "a"
    assert [f.seq_num for f in engine.recent("a")] == [1, 2, 3]
    assert engine.update("a", [result(4, "detector_gaps")]).action == "continue"
    assert [h.action for h in engine.history] == ["pause", "continue"]
    assert [s.action for s in seen] == ["continue", "continue", "pause", "continue"]
    assert engine.updates == 4


def test_engine_forgets_oldest_runs():
    engine = PolicyEngine(max_runs=2)
    for uid in "abc":
        engine.update(uid, [result(1, "beam_off")])
    assert engine.recent("a") == []
    assert len(engine.recent("c")) == 1
    with pytest.raises(ConfigurationError, match="at least 1"):
        PolicyEngine(max_runs=0)
    with pytest.raises(ConfigurationError, match="got 1000, 16, 0"):
        PolicyEngine(keep=0)


def test_failing_listener_does_not_break_updates(caplog):
    engine = PolicyEngine()

    def boom(decision):
        raise RuntimeError("listener bug")

    engine.add_listener(boom)
    assert engine.update("r", [result(1, "saturation")]).action == "remeasure"
    assert "decision listener failed" in caplog.text
    engine.remove_listener(boom)


def test_set_policy_applies_to_the_next_update_using_kept_frames():
    engine = PolicyEngine()
    engine.update("r", [result(1, "beam_off")])
    assert engine.update("r", [result(2, "beam_off")]).action == "continue"
    engine.set_policy(Policy(rules=[Rule(name="quick", kind="consecutive", tags=["beam_off"],
                                         count=2, action="stop")]))
    d = engine.update("r", [result(3, "beam_off")])
    assert (d.action, d.rule) == ("stop", "quick")
    with pytest.raises(TypeError, match="needs a Policy"):
        engine.set_policy({"rules": []})


def test_hot_reload_is_thread_safe():
    engine = PolicyEngine()
    pause = Policy()
    never = Policy(rules=[])
    errors = []
    stop = threading.Event()

    def feed(uid):
        try:
            for i in range(300):
                d = engine.update(uid, [result(i, "beam_off")])
                assert d.action in ("continue", "pause")
        except Exception as err:  # noqa: BLE001 - reported below  # pragma: no cover
            errors.append(err)

    def swap():
        while not stop.is_set():
            engine.set_policy(never)
            engine.set_policy(pause)

    swapper = threading.Thread(target=swap)
    feeders = [threading.Thread(target=feed, args=(f"run{k}",)) for k in range(3)]
    swapper.start()
    for t in feeders:
        t.start()
    for t in feeders:
        t.join()
    stop.set()
    swapper.join()
    assert errors == []
    assert engine.updates == 900
    engine.set_policy(pause)
    assert engine.update("run0", [result(300, "beam_off")]).action == "pause"


# ---------------------------------------------------------------- loading and errors

def test_policy_round_trips_through_json_and_yaml_files(tmp_path):
    policy = Policy(name="mine", rules=[
        Rule(name="sat", kind="latest", tags=["saturation"], action="remeasure",
             params={"exposure_factor": 0.25}),
        Rule(name="halo", kind="appears", tags=["halo_isotropic"], window=3, action="refine"),
    ])
    for suffix, fmt in ((".json", "json"), (".yaml", "yaml"), (".yml", "yaml")):
        path = tmp_path / f"policy{suffix}"
        path.write_text(policy.dumps(format=fmt))
        assert Policy.from_file(path) == policy
    (tmp_path / "empty.yaml").write_text("")
    assert [r.name for r in Policy.from_file(tmp_path / "empty.yaml").rules] == \
        [r.name for r in Policy().rules]


def test_yaml_written_by_hand(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text(
        "name: beamline\n"
        "rules:\n"
        "  - name: beam_off\n"
        "    kind: consecutive\n"
        "    tags: [beam_off]\n"
        "    count: 5\n"
        "    action: pause\n")
    policy = Policy.from_file(path)
    frames = [ref(i, "beam_off") for i in range(4)]
    assert decide(policy, frames).action == "continue"
    assert decide(policy, [*frames, ref(4, "beam_off")]).action == "pause"


@pytest.mark.parametrize("data, message", [
    ({"rules": [{"name": "x", "kind": "latest", "tags": ["rings"], "action": "pause"}]},
     "unknown tag(s) ['rings']; valid tags are: ring_isotropic"),
    ({"rules": [{"name": "x", "kind": "sometimes", "tags": ["beam_off"], "action": "pause"}]},
     "Input should be 'consecutive', 'latest', 'appears', 'changes', 'only', 'skipped' or 'novel'"),
    ({"rules": [{"name": "x", "kind": "latest", "tags": ["beam_off"], "action": "panic"}]},
     "Input should be 'continue', 'pause', 'remeasure', 'refine', 'count_longer' or 'stop'"),
    ({"rules": [{"name": "x", "kind": "latest", "action": "pause"}]},
     "rule 'x' of kind 'latest' needs at least one tag"),
    ({"rules": [{"name": "x", "kind": "consecutive", "tags": ["beam_off"], "count": 0,
                 "action": "pause"}]}, "greater than or equal to 1"),
    ({"rules": [{"name": "x", "kind": "skipped", "action": "stop"},
                {"name": "x", "kind": "skipped", "action": "pause"}]},
     "rule names must be unique; repeated: ['x']"),
    ({"rules": [], "rulez": []}, "Extra inputs are not permitted"),
])
def test_invalid_policies_say_what_is_wrong(data, message):
    with pytest.raises(ConfigurationError) as info:
        Policy.loads(json.dumps(data))
    assert message in str(info.value)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigurationError,
                       match=r"must end in \.json, \.yaml or \.yml, not '.txt'"):
        Policy.from_file(tmp_path / "p.txt")
    with pytest.raises(ConfigurationError, match=r"cannot read policy file .*missing\.json"):
        Policy.from_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [\n")
    with pytest.raises(ConfigurationError, match=r"bad\.yaml: cannot parse policy yaml"):
        Policy.from_file(bad)
    listy = tmp_path / "list.json"
    listy.write_text("[1, 2]")
    with pytest.raises(ConfigurationError, match="must be a mapping with a 'rules' list, got list"):
        Policy.from_file(listy)
    with pytest.raises(ConfigurationError, match="unknown policy format 'toml'"):
        Policy.loads("", format="toml")


def test_decision_is_a_json_message():
    d = decide(Policy(), [ref(1, "saturation")], now=5.0)
    again = Decision.model_validate_json(d.model_dump_json())
    assert again == d
    assert again.time == 5.0 and again.evidence[0].tags == ["saturation"]


def test_duplicate_deliveries_are_ignored():
    engine = PolicyEngine()
    batch = [result(1, "beam_off"), result(2, "beam_off")]
    engine.update("r", batch)
    again = engine.update("r", batch)            # e.g. registered on the callback twice
    assert again.action == "continue"
    assert len(engine.recent("r")) == 2 and engine.updates == 1
    d = engine.update("r", [result(3, "beam_off")])
    assert d.action == "pause"
    assert engine.update("r", [result(3, "beam_off")]) is d
    assert [h.action for h in engine.history] == ["pause"]


def test_the_default_policy_in_the_docs_is_the_default():
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "docs" / "steering.md").read_text()
    block = re.search(r"```yaml\n(name: default\n.*?)```", text, re.S).group(1)
    documented = Policy.loads(block, format="yaml")
    strip = {"rules": {"__all__": {"description"}}}
    assert documented.model_dump(exclude=strip) == Policy().model_dump(exclude=strip)


# ------------------------------------------------- exact texts (what operators read)
def test_default_rules_and_their_reasons_read_exactly():
    assert [(r.name, r.description) for r in Policy().rules] == [
        ("beam_off", "no beam on three frames in a row"),
        ("saturation", "clipped pixels: shorter exposure"),
        ("new_feature", "a scattering feature appeared: refine around this position"),
        ("weak_only", "only weak scattering: count longer")]
    cases = [
        ([ref(1, "ring_isotropic"), ref(2, "beam_off"), ref(3, "beam_off"), ref(4, "beam_off")],
         "beam_off: beam_off on 3 frame(s) in a row at primary seq_num 2..4"),
        ([ref(1, "ring_isotropic"), ref(2, "ring_isotropic", "saturation")],
         "saturation: saturation at primary seq_num 2"),
        ([ref(1, "halo_isotropic"), ref(2, "halo_isotropic"),
          ref(3, "ring_oriented", "halo_isotropic", "ring_isotropic")],
         "new_feature: ring_isotropic, ring_oriented appeared at primary seq_num 3, absent from "
         "the 2 frame(s) before"),
        ([ref(1, "weak_scattering"), ref(2, "weak_scattering")],
         "weak_only: nothing but weak_scattering at primary seq_num 2"),
    ]
    for frames, reason in cases:
        assert decide(Policy(), frames).reason == reason


def test_dumps_keeps_field_order_and_round_trips():
    import yaml

    p = Policy()
    data = p.model_dump(mode="json")
    assert p.dumps() == json.dumps(data, indent=2)
    text = p.dumps(format="yaml")
    assert text.startswith("name: default\nrules:\n- name: beam_off\n  kind: consecutive\n")
    assert yaml.safe_load(text) == data
    assert Policy.loads(text, format="yaml") == p == Policy.loads(p.dumps())
