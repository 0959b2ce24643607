"""`xsml demo` and the CLI entry point."""

from __future__ import annotations

import json
import subprocess
import sys

from bluesky_xsml.cli import main


def test_demo_writes_a_tagged_run(tmp_path, capsys):
    assert main(["demo", "--points", "3", "--size", "128", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "3 frames tagged" in out and str(tmp_path) in out
    docs = [json.loads(line) for line in (tmp_path / "documents.jsonl").read_text().splitlines()]
    names = [d["name"] for d in docs]
    assert names[0] == "start" and names[-1] == "stop"
    tag_desc = [d["doc"] for d in docs if d["name"] == "descriptor"
                and d["doc"]["name"] == "xsml_tags"]
    assert len(tag_desc) == 1
    stop = docs[-1]["doc"]
    assert stop["xsml_frames"] == 3 and stop["num_events"]["xsml_tags"] == 3


def test_cli_rejects_bad_arguments():
    res = subprocess.run([sys.executable, "-m", "bluesky_xsml.cli", "demo", "--points", "x"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "invalid int value" in res.stderr
    res = subprocess.run([sys.executable, "-m", "bluesky_xsml.cli", "nonsense"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "invalid choice" in res.stderr
