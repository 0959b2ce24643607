"""The CPU table of benchmarks/bench_callback.py measures what it says.

docs/benchmarks.md quotes its per-frame CPU of the RunEngine's process (the
RunEngine's thread, the callback in it, the rest of the process during the
scan and after it, the feeder's ring copy, and ``own``); these check the
arithmetic on made-up clock readings, the table's ``own`` column, and that a
real untagged scan finds bluesky's event-loop thread and times it.
"""

from __future__ import annotations

import math

import pytest

from .conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_callback.py")


def test_per_frame_splits_the_runengine_thread_and_the_rest(bench):
    marks = bench._CpuMarks()
    # (wall, process CPU, (RE thread on CPU, RE thread waiting for a CPU), threads' CPU)
    marks.marks = [
        (10.0, 1.0, (5.0, 1.0), {"xsml-tagger-feed": 0.0}),
        (13.0, 4.0, (7.0, 1.5), {"xsml-tagger-feed": 0.3}),
        (14.0, 4.4, (7.0, 1.5), {"xsml-tagger-feed": 0.5}),
    ]
    got = marks.per_frame(1000, callback_s=0.1)
    want = {"re_ms": 2.0,            # 2 s of the RE thread over 1000 frames
            "re_wait_ms": 0.5,
            "re_blocked_ms": 0.5,    # 3 s wall - 2 s on a CPU - 0.5 s waiting for one
            "callback_ms": 0.1,
            "rest_ms": 1.0,          # 3 s of the process - 2 s of its RE thread
            "tail_ms": 0.4,          # the process after the scan
            "feed_ms": 0.5}          # the feeder, scan and tail
    assert got == pytest.approx(want)


def test_table_own_is_callback_plus_rest_and_tail_over_untagged(bench, capsys):
    def run(callback, rest, tail, feed=0.0):
        return {"cpu": {"re_ms": 2.5, "re_wait_ms": 0.1, "re_blocked_ms": 0.2,
                        "callback_ms": callback, "rest_ms": rest, "tail_ms": tail,
                        "feed_ms": feed}}

    results = {("stress", "untagged", 0.0): [run(0.0, 0.10, 0.0), run(0.0, 0.08, 0.0),
                                              run(0.0, 0.12, 0.0)],
               ("stress", "process", 0.0): [run(0.06, 0.50, 0.40, 0.70)]}
    bench._print_cpu(results, ("thread", "process"))
    rows = {line.split("RE thread")[0].split()[-1]: line
            for line in capsys.readouterr().out.splitlines()[1:] if "RE thread " in line}
    process = rows["process"]
    # 0.06 + 0.50 + 0.40 - 0.10 (the untagged median)
    assert process.split("own")[1].split() == ["0.86"]
    assert "feeder 0.70" in process
    assert "own" not in rows["untagged"]
    assert set(rows) == {"untagged", "process"}  # no row for a mode that did not run


def test_untagged_scan_times_the_runengine_thread(bench):
    from bluesky import RunEngine

    # an earlier RunEngine's loop thread, alive in this process (as in a test worker), has the
    # same name: the scan's own thread must be the one timed
    earlier = RunEngine({}, call_returns_result=False)
    assert earlier._th.is_alive()
    r = bench.run_one("stress", "untagged", 5, 64)
    cpu = r["cpu"]
    assert r["accounted"] == 5
    assert cpu["re_ms"] > 0 and not math.isnan(cpu["re_ms"])  # the thread was found
    assert cpu["callback_ms"] == 0.0 and cpu["feed_ms"] == 0.0
    assert cpu["tail_ms"] >= 0.0
