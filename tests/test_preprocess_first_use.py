"""The first preprocessing calls of a fresh process, made from several threads at once.

numba loads its extensions (``entrypoints.init_all``, which registers new
``typeof`` implementations) and compiles the ``numba.typed.List`` internals on
the first kernel call of every process, outside any lock of its own. Another
thread typing its arguments meanwhile iterated the registry being changed:
``RuntimeError: dictionary changed size during iteration`` on a fresh machine
(intermittent). Each test runs in fresh subprocesses, because the first use
can only happen once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[1]

# Makes the race observable every time instead of now and then: each typeof
# registration takes 20 ms longer, and every typeof call made by one thread while
# another is registering is recorded (that is the window in which the registry
# iteration fails). It needs numba extensions that register types, as the
# installed test environment has (sparse, awkward).
WATCH = r"""
import json, sys, threading, time
import numba
from numba.core.typing import typeof as tmod

registering, guard, overlaps = set(), threading.Lock(), []
orig_register, orig_typeof = tmod.typeof_impl.register, tmod.typeof


def slow_register(cls, func=None):
    me = threading.get_ident()
    with guard:
        registering.add(me)
    try:
        time.sleep(0.02)
        return orig_register(cls, func) if func is not None else orig_register(cls)
    finally:
        with guard:
            registering.discard(me)


def watched_typeof(val, purpose=tmod.Purpose.argument):
    with guard:
        if registering - {threading.get_ident()}:
            overlaps.append(type(val).__name__)
    return orig_typeof(val, purpose)


tmod.typeof_impl.register = slow_register
tmod.typeof = numba.typeof = watched_typeof
import numba.core.dispatcher  # noqa: E402
numba.core.dispatcher.typeof = watched_typeof
"""

FIRST_USE = r"""
import concurrent.futures, json, sys, threading, time
import numpy as np
from bluesky_xsml.preprocess import PreprocessConfig, preprocess_batch, preprocess_frame

n_threads, stagger = int(sys.argv[1]), float(sys.argv[2])
config = PreprocessConfig(size=16)
pool = concurrent.futures.ThreadPoolExecutor(4)
dtypes = [np.uint32, np.uint32, np.uint16, np.float32, np.int32]
barrier = threading.Barrier(n_threads)
errors = []


def first_call(i):
    barrier.wait()
    time.sleep(stagger * i)
    dtype = dtypes[i % len(dtypes)]
    try:
        if i % 2:
            x = preprocess_frame(np.full((40, 48), 7, dtype), config)
            assert x.shape == (6, 16, 16)
        else:
            frames = [np.full((40, 48), 7, dtype) for _ in range(4)]
            inputs, ok, errs = preprocess_batch(frames, config, pool=pool)
            assert ok == [0, 1, 2, 3] and not errs, errs
    except BaseException as err:
        errors.append(f"{type(err).__name__}: {err}")


threads = [threading.Thread(target=first_call, args=(i,)) for i in range(n_threads)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"errors": errors, "overlaps": globals().get("overlaps", [])}))
"""


def _spawn(code: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.timeout(300)
def test_no_thread_types_arguments_while_numba_registers_its_extensions():
    """Deterministic: with numba's first-use window widened, no thread enters it."""
    # numba's extension loading (third-party numba extensions such as sparse's and
    # awkward's) takes seconds here; threads starting every 0.25 s cover that window
    result = _result(_spawn(WATCH + FIRST_USE, "12", "0.25"))
    assert result["errors"] == []
    assert result["overlaps"] == []


@pytest.mark.timeout(300)
def test_concurrent_first_calls_in_fresh_processes():
    """Several fresh processes at once, each making its first calls from several threads."""
    procs = [_spawn(FIRST_USE, "8", "0.0") for _ in range(4)]
    results = [_result(p) for p in procs]
    assert [r["errors"] for r in results] == [[], [], [], []]
