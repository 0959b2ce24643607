"""Every script in examples/ runs (as a subprocess, at small sizes) and says what it did.

Real parts throughout: the simulated beamline, a RunEngine, the packaged model,
embedded Tiled catalogs; the queue-server example starts redis-server and an
RE Manager (skipped where they are not installed). The three heavier ones
(fine-tuning, re-tagging on Dask, the queue server) are marked ``slow``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

CASES = {
    "tag_a_scan.py": (["--points", "2", "--size", "128"],
                      ["4 frames tagged, skipped: none", "beam_off"]),
    "external_hdf5_detectors.py": (["--points", "2", "--size", "128"],
                                   ["waxs: 2 frames tagged from HDF5, skipped none",
                                    "saxs: 2 frames tagged from HDF5, skipped none"]),
    "query_the_catalog.py": (["--size", "128", "--tag", "halo_isotropic"],
                             ["find_runs: 1 run(s) with frames tagged halo_isotropic",
                              "sample_x"]),
    "teach_with_a_calibrant.py": (["--frames", "4", "--steps", "5", "--size", "128",
                                   "--replay", "32"],
                                  ["true tags here: ['ring_isotropic'", "'rounds': 1",
                                   "'labels': 4"]),
    "retag_stored_runs.py": (["--size", "128"],
                             ["re-tagged 1 run(s), 4 frames, skipped 0, errors 0",
                              "streams: ['xsml_tags', "]),
    "steer_through_queue_server.py": (["--points", "4", "--size", "128"],
                                      ["decision: refine", "queue action: add_plan done",
                                       "'refine')"]),
}
SLOW = {"teach_with_a_calibrant.py", "retag_stored_runs.py", "steer_through_queue_server.py"}


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(CASES)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in CASES])
def test_example_runs(name, tmp_path):
    if name == "steer_through_queue_server.py":
        for exe in ("redis-server", "start-re-manager"):
            if shutil.which(exe) is None:
                pytest.skip(f"{exe} is not installed (Debian redis-server; bluesky-queueserver)")
    args, expected = CASES[name]
    res = subprocess.run([sys.executable, str(EXAMPLES / name), *args], check=False,
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    for text in expected:
        assert text in res.stdout, (text, res.stdout[-3000:])
