"""Smoke test of an installed bluesky-xsml (a wheel in a fresh environment), as users run it.

    cd /somewhere/outside/the/source && /path/to/venv/bin/python /path/to/tools/smoke_installed.py

``.ci/run`` runs it after installing the wheel that ``python -m build`` made (with the
``demo`` extra) into a new virtual environment. It checks that the package is imported from
that environment, not from a source tree; that its data files are there; that the steering
service starts and serves its page while a RunEngine scan is tagged live; that the ``xsml``
console script serves the page too; and that a small ``xsml demo`` runs end to end.
Exit status 0 when all of it works.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import httpx

PAGE_FILES = ("index.html", "app.js", "style.css")


def step(message: str) -> None:
    print(f"smoke: {message}", flush=True)


def check_installed() -> Path:
    import bluesky_xsml

    where = Path(bluesky_xsml.__file__).resolve().parent
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    if site not in where.parents:
        sys.exit(f"bluesky_xsml imported from {where}, not from this environment's {site}: "
                 "run from outside the source tree")
    for rel in [*(f"api/page/{f}" for f in PAGE_FILES), "models/default.pt",
                "models/default.json", "py.typed"]:
        if not (where / rel).is_file():
            sys.exit(f"missing from the installed package: {where / rel}")
    step(f"bluesky_xsml {bluesky_xsml.__version__} from {where}")
    return where


def check_page(url: str) -> None:
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    for name in PAGE_FILES:
        r = httpx.get(f"{url}/page/{'' if name == 'index.html' else name}", timeout=10)
        assert r.status_code == 200 and r.content, (name, r.status_code)


def tag_a_scan_with_the_service() -> None:
    from bluesky import RunEngine
    from bluesky.plans import scan

    from bluesky_xsml import Tagger, TaggingCallback
    from bluesky_xsml.api.serve import serve
    from bluesky_xsml.sim.sample import make_beamline

    bl = make_beamline(size=128)
    xsml = TaggingCallback(Tagger.load())
    with serve(xsml, port=0, announce=False) as handle:
        RE = RunEngine()
        RE.subscribe(xsml)
        RE(scan([bl.det], bl.sample_x, 1.0, 9.6, 5))
        assert xsml.flush(120), "tagging did not finish"
        stop = xsml.finished_runs[-1]
        assert stop["xsml_frames"] == 5 and not stop["xsml_skipped"], stop
        check_page(handle.url)
        status = httpx.get(f"{handle.url}/api/status", timeout=10).json()
        assert status["frames_tagged"] >= 5, status
    xsml.close()
    step(f"5 frames tagged live, tags {stop['xsml_tags']}; service page served")


def console_script_serves(bindir: Path) -> None:
    proc = subprocess.Popen([str(bindir / "xsml"), "serve", "--port", "0",
                             "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        url = None
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                sys.exit(f"xsml serve exited with {proc.returncode}")
            if line.startswith("xsml service: "):
                url = line.split()[2].split("/page/")[0]
        assert url, "xsml serve did not announce its address"
        check_page(url)
    finally:
        proc.terminate()
        proc.wait(30)
    step(f"`xsml serve` served the page at {url}")


def small_demo(bindir: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="xsml-smoke-") as tmp:
        subprocess.run([str(bindir / "xsml"), "demo", "--out", f"{tmp}/demo", "--grid", "3",
                        "--lines", "1", "--size", "128", "--no-live"], check=True,
                       stdout=subprocess.DEVNULL)
        pictures = sorted(p.name for p in Path(tmp, "demo").glob("*.png"))
        assert pictures == ["montage.png", "phase-map.png", "steered-line.png"], pictures
    step("a small `xsml demo` ran end to end")


def main() -> int:
    check_installed()
    bindir = Path(sys.executable).parent
    subprocess.run([str(bindir / "xsml"), "--help"], check=True, stdout=subprocess.DEVNULL)
    tag_a_scan_with_the_service()
    console_script_serves(bindir)
    small_demo(bindir)
    step("all good")
    return 0


if __name__ == "__main__":
    sys.exit(main())
