"""The replay store and the checkpoint registry: persistence, atomicity, crash safety.

The SIGKILL tests run a real child process (fine-tuning, writing checkpoints,
acknowledging labels) and kill it mid-work; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest

from bluesky_xsml import Tagger
from bluesky_xsml.errors import CheckpointError, ConfigurationError
from bluesky_xsml.model import TaggerNetConfig
from bluesky_xsml.training.checkpoints import CheckpointRegistry
from bluesky_xsml.training.replay import ReplayStore

TINY = TaggerNetConfig(stem_width=8, widths=(8,), depths=(1,))
REPO = Path(__file__).resolve().parent.parent


def tiny(seed=0):
    return Tagger.untrained(seed=seed, config=TINY)


# ------------------------------------------------------------------ replay store
def test_replay_roundtrip_reopen_and_new_tags(tmp_path):
    path = tmp_path / "replay.zarr"
    store = ReplayStore(path, input_shape=(6, 16, 16), tags=("a", "b"))
    x = np.random.default_rng(0).random((3, 6, 16, 16)).astype(np.float32)
    y = np.array([[1, 0], [np.nan, 1], [0, np.nan]], np.float32)
    rows = store.append(x, y, [{"run_uid": "r", "seq_num": i} for i in range(3)])
    assert rows == [0, 1, 2]
    assert store.add_tags(["c"]) == ("a", "b", "c")
    store.append(x[:1], np.array([[1.0]]), [{"run_uid": "r", "seq_num": 0}], tags=["c"])

    again = ReplayStore(path, input_shape=(6, 16, 16))
    assert len(again) == 4 and again.tags == ("a", "b", "c")
    np.testing.assert_array_equal(again.inputs(), np.concatenate([x, x[:1]]).astype(np.float16))
    np.testing.assert_array_equal(again.labels()[:3, :2], y)
    assert np.isnan(again.labels()[:3, 2]).all()  # rows before the new tag: unknown
    assert [p["seq_num"] for p in again.provenance()] == [0, 1, 2, 0]
    assert again.label_counts()["c"] == {"positive": 1, "negative": 0}
    # repeated labels of one frame merge, later known values winning
    rows, labels, _prov = again.merged()
    assert rows.tolist() == [3, 1, 2]
    np.testing.assert_array_equal(labels[0], [1, 0, 1])


def test_replay_rejects_bad_input_with_clear_messages(tmp_path):
    store = ReplayStore(tmp_path / "r.zarr", input_shape=(6, 16, 16), tags=("a",))
    with pytest.raises(ValueError, match=r"replay inputs must be \(n, 6, 16, 16\)"):
        store.append(np.zeros((1, 6, 8, 8)), np.zeros((1, 1)))
    with pytest.raises(ValueError, match="labels must be 0, 1 or NaN"):
        store.append(np.zeros((1, 6, 16, 16)), np.array([[0.5]]))
    with pytest.raises(ValueError, match="one provenance record per row"):
        store.append(np.zeros((2, 6, 16, 16)), np.zeros((2, 1)), [{}])
    with pytest.raises(ConfigurationError, match="holds inputs of shape"):
        ReplayStore(tmp_path / "r.zarr", input_shape=(6, 32, 32))
    assert len(store) == 0


# ----------------------------------------------------------- checkpoint registry
def test_registry_versions_activate_rollback_and_persist(tmp_path):
    reg = CheckpointRegistry(tmp_path)
    base, a, b = tiny(0), tiny(1), tiny(2)
    seen = []
    reg.add_listener(lambda rec: seen.append(rec["checkpoint_id"]))
    reg.add(base, promote=True, reason="starting checkpoint")
    reg.add(a, parent_id=base.checkpoint_id, step=10, label_counts={"ring_oriented": 3},
            metrics={"new_domain_after": 0.9, "nan_metric": float("nan")}, promote=True,
            reason="gate passed")
    kept = reg.add(b, parent_id=a.checkpoint_id, step=20, promote=False,
                   reason="original-domain mAP fell 2.00 points")
    assert kept["status"] == "kept" and "fell 2.00" in kept["reason"]
    assert reg.active_id == a.checkpoint_id
    listed = reg.list()
    json.dumps(listed, allow_nan=False)  # strict JSON for the API
    assert [r["checkpoint_id"] for r in listed] == [base.checkpoint_id, a.checkpoint_id,
                                                    b.checkpoint_id]
    assert [r["status"] for r in listed] == ["promoted", "active", "kept"]
    assert listed[1]["parent_id"] == base.checkpoint_id and listed[1]["step"] == 10
    assert listed[1]["metrics"]["nan_metric"] is None

    reg.activate(b.checkpoint_id)
    assert reg.active_id == b.checkpoint_id
    assert reg.rollback()["checkpoint_id"] == a.checkpoint_id
    assert seen == [base.checkpoint_id, a.checkpoint_id, b.checkpoint_id, a.checkpoint_id]

    again = CheckpointRegistry(tmp_path)  # persisted
    assert again.active_id == a.checkpoint_id
    loaded = again.load()
    assert loaded.checkpoint_id == a.checkpoint_id
    assert again.rollback()["checkpoint_id"] == base.checkpoint_id
    with pytest.raises(CheckpointError, match="nothing to roll back to"):
        again.rollback()
    with pytest.raises(KeyError, match="no checkpoint 'nope'"):
        again.activate("nope")


def test_registry_refuses_tampered_checkpoint(tmp_path):
    import torch

    reg = CheckpointRegistry(tmp_path)
    t = tiny(3)
    reg.add(t, promote=True)
    path = reg.path_of(t.checkpoint_id)
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"]["head.bias"] += 1.0
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="content id mismatch"):
        reg.load()


# ------------------------------------------------------------------ SIGKILL tests
def _child(code: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=str(REPO))


def _read_until(proc, predicate, timeout: float) -> list[str]:
    """Read the child's stdout lines until ``predicate(lines)`` or timeout."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate(lines):
        if sel.select(timeout=0.2):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.strip())
    return lines


_WRITER = """
import sys
from bluesky_xsml import Tagger
from bluesky_xsml.model import TaggerNetConfig
from bluesky_xsml.training.checkpoints import CheckpointRegistry
cfg = TaggerNetConfig(stem_width=8, widths=(8, 16), depths=(1, 1))
reg = CheckpointRegistry(sys.argv[1])
seed = 100 * int(sys.argv[2])
while True:
    t = Tagger.untrained(seed=seed, config=cfg)
    reg.add(t, parent_id=reg.active_id, step=seed, promote=True, reason="test")
    print("wrote", t.checkpoint_id, flush=True)
    seed += 1
"""


@pytest.mark.reliability
def test_sigkill_during_checkpoint_writes_leaves_active_checkpoint_intact(tmp_path):
    """Kill a process that writes and promotes checkpoints back to back, at several moments."""
    written: list[str] = []
    for attempt, delay in enumerate((0.0, 0.05, 0.13)):
        proc = _child(_WRITER, str(tmp_path), str(attempt))
        lines = _read_until(proc, lambda ls: len(ls) >= 2, timeout=120)
        assert len(lines) >= 2, proc.stderr.read() if proc.poll() is not None else lines
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        written += [ln.split()[1] for ln in lines]
        reg = CheckpointRegistry(tmp_path)
        active = reg.load()  # weights_only load, content id verified
        assert active.checkpoint_id == reg.active_id
        for rec in reg.list():  # every registered checkpoint is complete
            assert reg.load(rec["checkpoint_id"]).checkpoint_id == rec["checkpoint_id"]
        ids = {r["checkpoint_id"] for r in reg.list()}
        assert set(written) <= ids  # every acknowledged write is registered
    assert not list(Path(tmp_path).glob("*.tmp"))


_FINETUNER = """
import sys, time
import numpy as np
from bluesky_xsml import Tagger
from bluesky_xsml.model import TaggerNetConfig
from bluesky_xsml.training.live import LiveFineTuner
cfg = TaggerNetConfig(stem_width=8, widths=(8,), depths=(1,))
tagger = Tagger.untrained(seed=0, config=cfg)
ft = LiveFineTuner(tagger, sys.argv[1], min_labels=4, steps=100000, batch_size=4,
                   synthetic=None, synthetic_val=None, nice=0)
print("active", ft.registry.active_id, flush=True)
n = int(sys.argv[2])
rng = np.random.default_rng(n)
while True:
    x = rng.random((6, 128, 128), dtype=np.float32)
    y = np.full(len(tagger.tags), np.nan, np.float32)
    y[n % len(y)] = n % 2
    receipt = ft.add_labels(x[None], y[None], [{"source": "test", "n": n}])
    print("ack", n, receipt["rows"][0], ft.status()["state"], flush=True)
    n += 1
    time.sleep(0.01)
"""


@pytest.mark.reliability
def test_sigkill_during_finetuning_loses_no_acknowledged_label(tmp_path):
    """Kill a live fine-tuner while it trains and takes labels; restart and check everything."""
    first_n = 0
    acked: dict[int, int] = {}
    for _attempt in range(2):
        proc = _child(_FINETUNER, str(tmp_path), str(first_n))
        lines = _read_until(
            proc, lambda ls: sum("training" in ln for ln in ls) >= 3, timeout=180)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        acks = [ln.split() for ln in lines if ln.startswith("ack")]
        assert any(a[3] == "training" for a in acks), (lines[-5:], proc.stderr.read()[-2000:])
        for _, n, row, _state in acks:
            acked[int(n)] = int(row)
        first_n = max(acked) + 1

        store = ReplayStore(tmp_path / "replay.zarr", input_shape=(6, 128, 128))
        prov = store.provenance()
        assert len(store) >= len(acked)
        labels = store.labels()
        for n, row in acked.items():
            assert prov[row]["n"] == n
            assert labels[row, n % labels.shape[1]] == n % 2
        reg = CheckpointRegistry(tmp_path / "checkpoints")
        assert reg.load().checkpoint_id == reg.active_id


# ------------------------------------------------------------ the registry, rule by rule
def test_registry_records_exactly_what_add_was_given(tmp_path):
    import numpy as np

    reg = CheckpointRegistry(tmp_path)
    assert len(reg) == 0 and reg.active_id is None and reg.list() == []
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint registry {str(tmp_path)!r} "
                                                        "is empty")):
        reg.load()
    with pytest.raises(KeyError, match="known: none"):
        reg.get("abc")
    t = Tagger.untrained(seed=5, config=TINY, metadata={"parent_id": "from-metadata"})
    rec = reg.add(t, step=7.0, label_counts={"ring_oriented": np.int64(3)},
                  metrics={"auc": np.float32(0.5), "inf": float("inf"), "nested": [float("nan"),
                                                                                   {1: 2.5}]},
                  extra={"array": np.arange(2), "obj": Path("p")}, reason=42)
    assert t.checkpoint_id in reg and "nope" not in reg and len(reg) == 1
    assert rec == reg.get(t.checkpoint_id)
    created = rec.pop("created")
    assert abs(created - time.time()) < 60
    assert rec == {"checkpoint_id": t.checkpoint_id, "parent_id": "from-metadata", "step": 7,
                   "label_counts": {"ring_oriented": 3},
                   "metrics": {"auc": 0.5, "inf": None, "nested": [None, {"1": 2.5}]},
                   "tags": list(t.tags), "promoted": False, "reason": "42",
                   "extra": {"array": [0, 1], "obj": "p"}, "active": False, "status": "kept"}
    assert type(rec["step"]) is int
    assert reg.active_id is None  # not promoted: nothing active
    assert reg.path_of(t.checkpoint_id) == tmp_path / f"{t.checkpoint_id}.pt"
    assert reg.path_of(t.checkpoint_id).exists()
    with pytest.raises(KeyError, match=f"known: {t.checkpoint_id}.$"):  # str(KeyError) quotes
        reg.get("abc")
    plain = reg.add(tiny(6))  # the defaults: step 0, no reason, no parent
    assert (plain["step"], plain["reason"], plain["parent_id"]) == (0, "", None)
    with pytest.raises(KeyError) as info:
        reg.get("abc")
    assert info.value.args[0] == (f"no checkpoint 'abc' in {str(tmp_path)!r}; known: "
                                  f"{t.checkpoint_id}, {plain['checkpoint_id']}")
    state = json.loads((tmp_path / "registry.json").read_text())
    assert state["format"] == "bluesky-xsml-registry" and state["history"] == []
    assert repr(reg) == f"<CheckpointRegistry {str(tmp_path)!r}: 2, active None>"


def test_registry_add_again_only_activates_and_listeners_hear_only_activations(tmp_path,
                                                                              caplog):
    reg = CheckpointRegistry(tmp_path)
    a, b = tiny(0), tiny(1)
    heard = []

    def broken(rec):
        raise RuntimeError("listener failed")

    reg.add_listener(broken)  # a failing listener neither stops the change nor the others
    reg.add_listener(lambda rec: heard.append((rec["checkpoint_id"], rec["status"])))
    first = reg.add(a, parent_id="p0", step=1, reason="first")
    assert heard == [] and first["status"] == "kept"
    again = reg.add(a, parent_id="other", step=99, promote=True, reason="changed")
    assert heard == [(a.checkpoint_id, "active")]
    failed = [r for r in caplog.records if r.name == "bluesky_xsml.training.checkpoints"]
    assert [r.getMessage() for r in failed] == [f"checkpoint listener failed for {a.checkpoint_id}"]
    assert failed[0].exc_info[1].args == ("listener failed",)
    assert (again["parent_id"], again["step"], again["reason"], again["promoted"]) == (
        "p0", 1, "first", False)   # the record is kept; only the activation changed
    assert again["status"] == "active" and abs(again["activated"] - time.time()) < 60
    reg.add(b, promote=True)
    reg.activate(b.checkpoint_id)  # the active one again: no second history entry
    state = json.loads((tmp_path / "registry.json").read_text())
    assert state["history"] == [a.checkpoint_id, b.checkpoint_id]
    assert [r["status"] for r in reg.list()] == ["kept", "active"]  # a: activated, not promoted
    assert reg.rollback()["checkpoint_id"] == a.checkpoint_id
    assert heard[-1] == (a.checkpoint_id, "active")
    assert [r["status"] for r in reg.list()] == ["active", "promoted"]
    with pytest.raises(CheckpointError, match=r"^nothing to roll back to: only one checkpoint "
                                              "was ever active$"):
        reg.rollback()


def test_registry_list_is_oldest_first_and_files_are_checked(tmp_path, monkeypatch):
    reg = CheckpointRegistry(tmp_path)
    from bluesky_xsml.training import checkpoints

    clock = iter([300.0, 100.0, 200.0])  # the records' "created", in the order of adding
    monkeypatch.setattr(checkpoints, "time", types.SimpleNamespace(time=lambda: next(clock)))
    ts = [tiny(s) for s in (0, 1, 2)]
    for t in ts:
        reg.add(t)
    assert [r["checkpoint_id"] for r in reg.list()] == [ts[1].checkpoint_id,
                                                        ts[2].checkpoint_id,
                                                        ts[0].checkpoint_id]
    monkeypatch.undo()
    reg.path_of(ts[1].checkpoint_id).unlink()
    missing = str(reg.path_of(ts[1].checkpoint_id))
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint file {missing!r} is "
                                                        "missing")):
        reg.activate(ts[1].checkpoint_id)
    assert reg.active_id is None
    loaded = reg.load(ts[2].checkpoint_id, precision="fp32", num_threads=1)
    assert loaded.checkpoint_id == ts[2].checkpoint_id and loaded.precision == "fp32"
    # a file that holds another checkpoint than its name says is refused
    import shutil

    shutil.copyfile(reg.path_of(ts[0].checkpoint_id), reg.path_of(ts[2].checkpoint_id))
    wrong = f"{reg.path_of(ts[2].checkpoint_id)} holds {ts[0].checkpoint_id}, not " \
            f"{ts[2].checkpoint_id}"
    with pytest.raises(CheckpointError, match=f"^{re.escape(wrong)}$"):
        reg.load(ts[2].checkpoint_id)


def test_registry_cleans_leftovers_and_refuses_an_unreadable_file(tmp_path):
    nested = CheckpointRegistry(tmp_path / "new" / "checkpoints")  # folders made as needed
    assert nested.directory.is_dir() and len(nested) == 0
    reg = CheckpointRegistry(tmp_path)
    t = tiny(0)
    reg.add(t, promote=True)
    (tmp_path / "registry.json.x1.tmp").write_text("{")
    (tmp_path / "model.pt.tmp").write_bytes(b"half")
    (tmp_path / "notes.txt").write_text("kept")
    again = CheckpointRegistry(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["registry.json", f"{t.checkpoint_id}.pt", "notes.txt", "new"])
    assert again.active_id == t.checkpoint_id and len(again) == 1
    (tmp_path / "registry.json").write_text("{not json")
    path = str(tmp_path / "registry.json")
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint registry {path!r} is "
                                                        "unreadable: ")):
        CheckpointRegistry(tmp_path)
