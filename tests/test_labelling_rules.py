"""The Labeller's rules on their own: declared labels, labels after the fact, the cache.

:class:`~bluesky_xsml.documents.labelling.Labeller` only talks to its callback (declared
labels, error counts, the tagger's tags and thresholds) and to the fine-tuner
(``add_labels``/``add_labels_async``/``close``). Here both are small stand-ins that record
what they are given, so each rule is checked in milliseconds; the same paths with a real
RunEngine, callback and live fine-tuner run in ``tests/test_finetune.py``
(``test_label_suggest_and_document_labels_through_a_run``), which trains and is too slow to
run for every mutant of ``labelling.py``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest

from bluesky_xsml.documents.labelling import Labeller, document_labels
from bluesky_xsml.errors import ConfigurationError


@dataclass
class Job:
    run_uid: str
    stream: str
    seq_num: int
    key: str


class Callback:
    """What a Labeller reads from its TaggingCallback."""

    def __init__(self, declared=None, isolation="thread"):
        self.declared = declared or {}
        self.errors: list[str] = []
        self.tagger = SimpleNamespace(tags=("a", "b"), thresholds=np.float32([0.5, 0.5]))
        self.isolation = isolation
        self.worker = object()

    def declared_labels(self, run_uid, stream, seq_num):
        return self.declared.get((run_uid, stream, seq_num))

    def count_error(self, what):
        self.errors.append(what)


class Tuner:
    """What a Labeller hands labels to."""

    def __init__(self):
        self.sync: list[tuple] = []
        self.queued: list[tuple] = []
        self.closed = None

    def add_labels(self, x, row, prov, tags):
        self.sync.append((x, row, prov, tags))
        return {"pending": 1, "accepted": len(prov)}

    def add_labels_async(self, x, row, prov, tags):
        self.queued.append((x, row, prov, tags))

    def close(self, timeout):
        self.closed = timeout


def items(n=3, run="r1", stream="primary", key="cam"):
    return [(Job(run, stream, s, key), 0, np.full((2, 4, 4), s, np.float32)) for s in range(n)]


# ------------------------------------------------------------------ document_labels
def test_document_labels_accepts_a_mapping_or_its_json():
    want = {"ring_oriented": True, "halo": False, "odd": None}
    assert document_labels(want, run_uid="r", stream="primary", seq_num=1) == want
    assert document_labels(json.dumps(want), run_uid="r", stream="s", seq_num=0) == want


@pytest.mark.parametrize("value", [["ring"], 3, "[1, 2]"])
def test_document_labels_must_be_a_mapping(value):
    kind = type(json.loads(value) if isinstance(value, str) else value).__name__
    with pytest.raises(ValueError, match=f"^xsml_labels must map tag names to True/False/None, "
                                         f"got {kind}$"):
        document_labels(value, run_uid="r", stream="primary", seq_num=1)


@pytest.mark.parametrize("value", [{"seq_num": True}, {"1ring": True}, {"a": 3}, {},
                                   {"a": True, "x" * 65: True}])
def test_document_labels_are_checked_as_the_api_checks_a_label(value):
    with pytest.raises(ValueError):
        document_labels(value, run_uid="r", stream="primary", seq_num=1)


def test_document_labels_checks_the_frame_it_names():
    with pytest.raises(ValueError):
        document_labels({"a": True}, run_uid="", stream="primary", seq_num=1)
    with pytest.raises(ValueError):
        document_labels({"a": True}, run_uid="r", stream="primary", seq_num=-1)
    with pytest.raises(ValueError):
        document_labels({"a": True}, run_uid="r", stream="", seq_num=1)


# ------------------------------------------------------------------ the cache and declared labels
def test_a_new_labeller_keeps_frames_and_has_no_fine_tuner():
    lab = Labeller(Callback())
    assert lab.frame_cache.max_frames == 2000 and lab.finetuner is None and lab.ignored == 0
    assert Labeller(Callback(), cache_size=5).frame_cache.max_frames == 5


def test_declared_labels_without_fine_tuning_are_counted_as_ignored():
    cb = Callback({("r1", "primary", 1): {"a": True}, ("r1", "primary", 2): {"b": False}})
    lab = Labeller(cb)
    lab.on_inputs(items(4))
    assert len(lab.frame_cache) == 4 and lab.ignored == 2 and cb.errors == []
    lab.on_inputs(items(1, run="r2"))                # nothing declared: nothing ignored
    assert lab.ignored == 2 and len(lab.frame_cache) == 5
    cb.declared[("r3", "primary", 0)] = {"a": False}
    lab.on_inputs(items(1, run="r3"))                # counted on top of the earlier ones
    assert lab.ignored == 3


def test_declared_labels_go_to_the_fine_tuner_with_their_provenance():
    cb = Callback({("r1", "primary", 1): {"a": True, "c": None},
                   ("r1", "primary", 2): {"b": 2},             # not a label: counted, skipped
                   ("r1", "primary", 3): {"b": False}})
    lab = Labeller(cb)
    lab.finetuner = tuner = Tuner()
    batch = items(4)
    lab.on_inputs(batch)
    assert cb.errors == ["bad xsml_labels: ValueError"] and lab.ignored == 0
    assert len(tuner.queued) == 2 and tuner.sync == []
    (x, row, prov, tags), (x3, row3, prov3, tags3) = tuner.queued
    np.testing.assert_array_equal(x, batch[1][2][None])
    assert tags == ("a", "c") and row.shape == (1, 2)
    assert row[0, 0] == 1.0 and np.isnan(row[0, 1])
    assert prov == [{"source": "document", "run_uid": "r1", "stream": "primary", "seq_num": 1,
                     "key": "cam", "frame_index": 0}]
    assert type(prov[0]["seq_num"]) is int and type(prov[0]["frame_index"]) is int
    assert tags3 == ("b",) and row3.tolist() == [[0.0]] and prov3[0]["seq_num"] == 3
    np.testing.assert_array_equal(x3, batch[3][2][None])


def test_nothing_declared_reaches_no_fine_tuner():
    lab = Labeller(Callback())
    lab.finetuner = tuner = Tuner()
    lab.on_inputs(items(3))
    assert tuner.queued == [] and len(lab.frame_cache) == 3


# ------------------------------------------------------------------ labels after the fact
def results(run_checkpoint="ck1"):
    return [SimpleNamespace(probs=np.float32([0.45, 0.9]), stream="primary", seq_num=s, key="cam",
                            frame_index=0, checkpoint=run_checkpoint) for s in range(3)]


def test_label_needs_fine_tuning():
    lab = Labeller(Callback())
    lab.on_inputs(items(1))
    with pytest.raises(ConfigurationError, match=r"^fine-tuning is not enabled; call "
                                                 r"enable_finetuning\(directory\) first$"):
        lab.label("r1", 0, a=True)


def test_label_hands_the_cached_input_to_the_fine_tuner_and_answers_what_it_did():
    cb = Callback()
    lab = Labeller(cb)
    lab.finetuner = tuner = Tuner()
    batch = items(3)
    lab.on_inputs(batch)
    lab.on_results("r1", results())
    assert len(lab.suggest_labels(10)) == 3
    answer = lab.label("r1", 1, stream="primary", key="cam", frame_index=0, a=True, c=None)
    assert answer == {"run_uid": "r1", "stream": "primary", "seq_num": 1, "key": "cam",
                      "frame_index": 0, "labels": {"a": True, "c": None}, "new_tags": ["c"],
                      "pending": 1, "accepted": 1}
    (x, row, prov, tags), = tuner.sync
    np.testing.assert_array_equal(x, batch[1][2][None].astype(np.float16))
    assert tags == ("a", "c") and row[0, 0] == 1.0 and np.isnan(row[0, 1])
    assert prov == [{"source": "label", "run_uid": "r1", "stream": "primary", "seq_num": 1,
                     "key": "cam", "frame_index": 0, "checkpoint": "ck1"}]
    # a labeled frame is not suggested again
    assert [s["seq_num"] for s in lab.suggest_labels(10)] == [0, 2]
    assert len(lab.suggest_labels(1)) == 1
    # the key may be left out when the event has one image key; False is a label too
    assert lab.label("r1", 2, b=False)["labels"] == {"b": False}
    assert lab.label("r1", 2, b=False)["new_tags"] == []


def test_a_frame_no_longer_cached_cannot_be_labeled():
    lab = Labeller(Callback(), cache_size=2)
    lab.finetuner = Tuner()
    lab.on_inputs(items(3))
    with pytest.raises(KeyError):
        lab.label("r1", 0, a=True)
    assert lab.finetuner.sync == []


def test_enable_finetuning_keeps_a_fine_tuner_it_has():
    for isolation in ("thread", "process"):
        lab = Labeller(Callback(isolation=isolation))
        lab.finetuner = tuner = Tuner()
        assert lab.enable_finetuning("/nonexistent/dir") is tuner


def test_close_closes_the_fine_tuner_with_the_timeout():
    lab = Labeller(Callback())
    lab.close()                                    # none: nothing to close
    lab.finetuner = tuner = Tuner()
    lab.close(7.5)
    assert tuner.closed == 7.5
    lab.close()
    assert tuner.closed == 30.0


def test_enable_finetuning_builds_the_fine_tuner_of_the_isolation(monkeypatch):
    import bluesky_xsml.inference.process as process
    import bluesky_xsml.training.live as live

    made = []
    monkeypatch.setattr(live, "LiveFineTuner",
                        lambda *args, **kwargs: made.append(("live", args, kwargs)) or "L")
    monkeypatch.setattr(process, "RemoteFineTuner",
                        lambda *args, **kwargs: made.append(("remote", args, kwargs)) or "R")
    cb = Callback(isolation="thread")
    lab = Labeller(cb)
    assert lab.enable_finetuning("/ft", steps=3) == "L" and lab.finetuner == "L"
    assert made == [("live", (cb.tagger, "/ft"), {"steps": 3})]
    made.clear()
    cb = Callback(isolation="process")           # trained in the tagging process
    lab = Labeller(cb)
    assert lab.enable_finetuning("/ft", steps=3) == "R" and lab.finetuner == "R"
    assert made == [("remote", (cb.worker, "/ft", {"steps": 3}), {})]


def test_label_takes_the_named_key_of_an_event_with_several():
    lab = Labeller(Callback())
    lab.finetuner = tuner = Tuner()
    batch = [*items(2, key="cam1"),
             (Job("r1", "primary", 1, "cam2"), 0, np.full((2, 4, 4), 7, np.float32))]
    lab.on_inputs(batch)
    with pytest.raises(KeyError, match="several image keys"):
        lab.label("r1", 1, a=True)
    assert lab.label("r1", 1, key="cam2", a=True)["key"] == "cam2"
    np.testing.assert_array_equal(tuner.sync[-1][0], np.full((1, 2, 4, 4), 7, np.float16))


def test_suggest_labels_gives_ten_by_default():
    lab = Labeller(Callback())
    lab.on_inputs(items(12))
    lab.on_results("r1", [SimpleNamespace(probs=np.float32([0.45, 0.9]), stream="primary",
                                          seq_num=s, key="cam", frame_index=0, checkpoint="c")
                          for s in range(12)])
    assert len(lab.suggest_labels()) == 10 and len(lab.suggest_labels(12)) == 12


def test_label_finds_the_frame_by_stream_and_index_and_an_untagged_one_has_no_checkpoint():
    lab = Labeller(Callback())
    lab.finetuner = tuner = Tuner()
    lab.on_inputs([(Job("r1", "baseline", 1, "cam"), 1, np.full((2, 4, 4), 3, np.float32)),
                   (Job("r1", "primary", 1, "cam"), 0, np.zeros((2, 4, 4), np.float32))])
    answer = lab.label("r1", 1, stream="baseline", frame_index=1, a=False)
    assert (answer["stream"], answer["frame_index"]) == ("baseline", 1)
    x, _, prov, _ = tuner.sync[-1]
    np.testing.assert_array_equal(x, np.full((1, 2, 4, 4), 3, np.float16))
    assert prov[0]["checkpoint"] == ""                # never tagged: no model to name
    with pytest.raises(KeyError):
        lab.label("r1", 1, stream="baseline", a=False)   # frame 0 of that event is not cached
