"""The IPython profile (profiles/profile_xsml) starts, runs a scan, tags and stores it.

IPython runs for real, non-interactively (``ipython --profile-dir=... -c``), on
a copy of the profile in tmp_path (IPython writes its history and pid files
into the profile folder), against the simulated beamline and an embedded
catalog in tmp_path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROFILE = Path(__file__).resolve().parents[1] / "profiles" / "profile_xsml"

pytest.importorskip("IPython", reason="the profile runs in IPython")
pytest.importorskip("tiled.server", reason="the profile stores runs in a Tiled catalog")

COMMAND = """
import json, sys
uid, = RE(scan([det], sample_x, 1.0, 9.6, 3))
assert xsml.flush(120)
stop = catalog[uid].metadata["stop"]
start = catalog[uid].metadata["start"]
print("XSML-RESULT", json.dumps({"uid": uid, "stop": stop,
                                 "time_is_module": hasattr(ttime, "monotonic"),
                                 "beam": start.get("xsml_beam_center"),
                                 "errors": xsml.status()["document_errors"],
                                 "torch": "torch" in sys.modules}))
"""


@pytest.mark.parametrize("isolation", ["thread", "process"])
def test_profile_starts_and_tags_a_scan_into_the_catalog(tmp_path, isolation):
    profile = tmp_path / "profile_xsml"
    shutil.copytree(PROFILE, profile, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "IPYTHONDIR": str(tmp_path / "ipython"),
           "XSML_CATALOG_DIR": str(tmp_path / "catalog"), "XSML_SIM_SIZE": "128",
           "XSML_TILED_URI": "", "XSML_ISOLATION": isolation}
    res = subprocess.run(
        [sys.executable, "-m", "IPython", f"--profile-dir={profile}", "--no-banner",
         "--colors=NoColor", "-c", COMMAND],
        check=False, capture_output=True, text=True, env=env, timeout=280, cwd=tmp_path)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("XSML-RESULT ")]
    assert res.returncode == 0 and lines, res.stdout[-2000:] + res.stderr[-3000:]
    out = json.loads(lines[0].split(" ", 1)[1])
    stop = out["stop"]
    assert out["time_is_module"]                      # ttime survives the star imports
    # the simulated detector's beam centre goes into every run, and the callback takes it
    from bluesky_xsml.sim.sample import make_beamline

    expected = list(make_beamline(size=128).sample.beam_center)
    assert out["beam"] == {"saxs_image": pytest.approx(expected)}, out["beam"]
    assert out["errors"] == {}
    # with a tagging process, the IPython session (the RunEngine's process) never loads torch
    assert out["torch"] is (isolation == "thread")
    assert stop["exit_status"] == "success"
    assert stop["num_events"] == {"primary": 3, "xsml_tags": 3}
    assert stop["xsml_frames"] == 3 and stop["xsml_skipped"] == {}
    # the beam went from the amorphous film (x = 1) to the blank edge (x = 9.6)
    assert stop["xsml_tag_counts"].get("beam_off") == 1
    assert stop["xsml_tag_counts"].get("halo_isotropic", 0) >= 1
    assert "Transient Scan ID: 1" in res.stdout           # the BestEffortCallback table

    # the session ended cleanly and the run is on disk: reopen the catalog
    from bluesky_xsml.catalog.embedded import EmbeddedCatalog

    with EmbeddedCatalog(tmp_path / "catalog") as cat:
        run = cat.catalog[out["uid"]]
        tags = run["xsml_tags"].read()
        assert tags.sizes["time"] == 3
        assert sorted(int(s) for s in tags["source_seq_num"].values) == [1, 2, 3]


def test_profile_startup_files_are_clean():
    """Only the startup scripts: no swap files, backups or caches; each one compiles."""
    startup = sorted(p.name for p in (PROFILE / "startup").iterdir()
                     if p.name != "__pycache__")
    assert startup == ["00-base.py", "10-xsml.py", "20-beamline.py"], startup
    junk = [p for p in PROFILE.rglob("*") if p.name.endswith(("~", ".swp", ".swo", ".bak",
                                                              ".orig", ".pyc"))]
    assert junk == []
    for name in startup:
        path = PROFILE / "startup" / name
        compile(path.read_text(), str(path), "exec")
    assert "import time as ttime" in (PROFILE / "startup" / "00-base.py").read_text()
