"""`xsml demo`, `xsml plot` and the CLI entry point.

The demo runs for real (simulated beamline, RunEngine, packaged model, embedded
Tiled catalog, steering plan, HTTP service) at a small size: a 3 x 3 map and
one steered line of 128-pixel frames.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from bluesky_xsml.cli import main

pytest.importorskip("tiled.server", reason="the demo needs the catalog extra")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run `xsml demo --serve` in a subprocess; probe the service while it serves."""
    out = tmp_path_factory.mktemp("demo") / "out"
    box: dict = {}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bluesky_xsml.cli", "demo", "--out", str(out), "--grid", "3",
         "--lines", "1", "--size", "128", "--serve", "--port", "0", "--serve-for", "6"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 280
    while proc.poll() is None and time.monotonic() < deadline:
        summary = out / "summary.json"
        if "health" not in box and summary.exists():
            url = json.loads(summary.read_text()).get("service_url")
            if url:
                box["health"] = httpx.get(f"{url}/healthz", timeout=5).status_code
                box["page"] = httpx.get(f"{url}/page/", timeout=5,
                                        follow_redirects=True).status_code
        time.sleep(0.1)
    try:
        box["stdout"], box["stderr"] = proc.communicate(timeout=60)
    finally:
        proc.kill()
    box["rc"] = proc.returncode
    assert box["rc"] == 0, box["stderr"][-3000:]
    box["out"] = out
    box["summary"] = json.loads((out / "summary.json").read_text())
    return box


def test_demo_maps_the_sample_and_says_where_its_output_went(demo):
    out, summary = demo["out"], demo["summary"]
    printed = demo["stdout"]
    assert f"Output: {out}" in printed and "frames tagged, 0 skipped" in printed
    assert "latest frames" in printed           # the live view's table
    for name in ("phase-map.png", "montage.png", "steered-line.png", "summary.json"):
        assert (out / name).stat().st_size > 1000, name
    assert sorted(summary["files"]) == sorted(str(out / n) for n in
                                              ("phase-map.png", "montage.png",
                                               "steered-line.png"))
    assert [r["plan"] for r in summary["runs"]] == ["grid_scan", "tag_steered_scan"]
    assert summary["skipped"] == 0 and summary["frames"] >= 9 + 9
    # the default model reads the simulated sample: most positions agree with the truth
    assert summary["agreement"] >= 0.6, summary["phases"]
    # the query found where structures are
    tags_found = {q["tag"] for q in summary["queries"]}
    assert {"halo_isotropic", "beam_off"} <= tags_found
    halo = next(q for q in summary["queries"] if q["tag"] == "halo_isotropic")
    assert halo["sample_x"][1] < 4.5          # the amorphous region is on the left


def test_demo_stored_every_frame_and_the_steering_refined(demo):
    from bluesky_xsml.catalog.embedded import EmbeddedCatalog

    with EmbeddedCatalog(demo["out"] / "catalog") as cat:
        assert len(cat.catalog) == 2
        steered_uid = demo["summary"]["runs"][1]["uid"]
        run = cat.catalog[steered_uid]
        stop = run.metadata["stop"]
        assert stop["exit_status"] == "success"
        n = stop["num_events"]["primary"]
        assert stop["xsml_frames"] == n == stop["num_events"]["xsml_tags"]
        assert n > 9, "no refinement: the steered line took only its coarse points"
        actions = [str(a) for a in run["xsml_decisions"].read()["xsml_action"].values]
        assert "refine" in actions
        total = sum(cat.catalog[r["uid"]].metadata["stop"]["xsml_frames"]
                    for r in demo["summary"]["runs"])
        assert total == demo["summary"]["frames"]


def test_demo_serve_keeps_the_service_up(demo):
    assert demo["summary"]["service_url"].startswith("http://127.0.0.1:")
    assert demo.get("health") == 200 and demo.get("page") == 200


def test_xsml_plot_draws_a_stored_run(demo, tmp_path, capsys):
    cat = str(demo["out"] / "catalog")
    assert main(["plot", "1", "--catalog", cat, "--out", str(tmp_path), "--frames", "4"]) == 0
    printed = capsys.readouterr().out
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 3 and all(n.startswith("scan1-") for n in files)
    assert {n.rsplit("-", 1)[1] for n in files} == {"tags.png", "frames.png", "map.png"}
    assert all(str(tmp_path / n) in printed for n in files)
    # errors: a run that is not there, a catalog that is not there
    assert main(["plot", "99", "--catalog", cat, "--out", str(tmp_path)]) == 2
    assert "no run '99'" in capsys.readouterr().err
    assert main(["plot", "-1", "--catalog", str(tmp_path / "nope")]) == 2
    assert "no catalog directory" in capsys.readouterr().err


def test_cli_rejects_bad_arguments():
    res = subprocess.run([sys.executable, "-m", "bluesky_xsml.cli", "demo", "--grid", "x"],
                         check=False, capture_output=True, text=True)
    assert res.returncode == 2 and "invalid int value" in res.stderr
    res = subprocess.run([sys.executable, "-m", "bluesky_xsml.cli", "demo", "--grid", "1",
                          "--size", "32"], check=False, capture_output=True, text=True)
    assert res.returncode == 2
    assert "--size must be >= 64" in res.stderr and "--grid must be 0 or >= 2" in res.stderr
    res = subprocess.run([sys.executable, "-m", "bluesky_xsml.cli", "nonsense"],
                         check=False, capture_output=True, text=True)
    assert res.returncode == 2 and "invalid choice" in res.stderr
