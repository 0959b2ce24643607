"""Check (or rewrite) the demo's figures in README.md and docs/tutorial.md against a demo run.

The figures (frames tagged and skipped, how often the phase map agrees with the
simulated truth, where each structure was found) sit between two HTML comments in
each file, ``<!-- demo-figures: begin ... -->`` and ``<!-- demo-figures: end -->``,
and are rendered here from the ``summary.json`` that ``xsml demo`` writes::

    python docs/tools/demo_figures.py                        # run `xsml demo` (minutes), check
    python docs/tools/demo_figures.py --summary OUT/summary.json   # check against an existing run
    python docs/tools/demo_figures.py --write                # run it and rewrite the figures

``--write`` also stores the run's summary (without its paths and timings) as
``tests/demo_summary.json``, which ``tests/test_demo_figures.py`` checks the docs
against: rerun this after changing the model, the demo or the simulated sample.
Timings are not checked: they depend on the machine. The figures were measured on
the reference machine (2 cores, no GPU); inference precision follows the CPU, so
another CPU may tag a frame or two differently.

Exit status 0 when every figure matches, 1 when one is stale (each is listed).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = "tests/demo_summary.json"
BEGIN = "<!-- demo-figures: begin (python docs/tools/demo_figures.py --write) -->"
END = "<!-- demo-figures: end -->"
_BLOCK = re.compile(re.escape(BEGIN) + r"\n(.*?)" + re.escape(END), re.S)
#: Summary keys kept in the fixture (the rest are paths and timings of one run).
KEPT = ("frames", "skipped", "phases", "agreement", "queries")


def _mm(lo_hi) -> str:
    lo, hi = lo_hi
    return f"{lo:.1f} - {hi:.1f}"


def readme_figures(summary: dict) -> str:
    """The README's sentence about the demo's result."""
    return textwrap.fill(
        f"With the defaults it tags {summary['frames']} frames, skips "
        f"{summary['skipped'] or 'none'}, and its phase map agrees with the simulated truth "
        f"at {100 * summary['agreement']:.0f}% of the positions.", width=98) + "\n"


def tutorial_figures(summary: dict) -> str:
    """The tutorial's paragraph and table of the demo's result."""
    lines = [
        textwrap.fill(
            f"With the defaults the demo tags {summary['frames']} frames and skips "
            f"{summary['skipped'] or 'none'}; the phase map agrees with the simulated truth at "
            f"{100 * summary['agreement']:.0f}% of the positions. Where it finds each structure "
            "tag (step 5):", width=78),
        "",
        "| tag | runs | frames | sample_x (mm) | sample_y (mm) |",
        "|---|---|---|---|---|",
    ]
    for q in summary["queries"]:
        lines.append(f"| `{q['tag']}` | {q['runs']} | {q['frames']} | "
                     f"{_mm(q['sample_x'])} | {_mm(q['sample_y'])} |")
    return "\n".join(lines) + "\n"


#: File (relative to the repository) -> what its block holds.
FIGURES: dict[str, Callable[[dict], str]] = {
    "README.md": readme_figures,
    "docs/tutorial.md": tutorial_figures,
}


def check(summary: dict, root: Path = ROOT, *, write: bool = False) -> list[str]:
    """Compare (or with ``write``, replace) each file's block with the figures of ``summary``.

    Parameters
    ----------
    summary : dict
        A demo's ``summary.json`` (at least the keys in ``KEPT``).
    root : Path
        Repository root holding the files in ``FIGURES``.
    write : bool
        Rewrite stale blocks instead of only reporting them.

    Returns
    -------
    list of str
        One line per stale (or, with ``write``, rewritten) file; a file without its
        block is always reported.
    """
    problems = []
    for rel, render in FIGURES.items():
        path = root / rel
        text = path.read_text()
        found = _BLOCK.findall(text)
        if len(found) != 1:
            problems.append(f"{rel}: expected one demo-figures block, found {len(found)}")
            continue
        want = render(summary)
        if found[0] == want:
            continue
        if write:
            path.write_text(_BLOCK.sub(lambda _, want=want: f"{BEGIN}\n{want}{END}", text))
            problems.append(f"{rel}: rewritten")
        else:
            problems.append(f"{rel}: stale demo figures\n  docs:  {found[0]!r}\n  run:   {want!r}")
    return problems


def run_demo(out: Path) -> dict:
    """Run ``xsml demo`` with its defaults into ``out`` and return its summary."""
    subprocess.run([sys.executable, "-m", "bluesky_xsml.cli", "demo", "--out", str(out),
                    "--no-live"], check=True)
    return json.loads((out / "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary", type=Path, default=None,
                        help="a demo's summary.json (default: run `xsml demo` now)")
    parser.add_argument("--write", action="store_true",
                        help=f"rewrite stale figures and store the summary as {FIXTURE}")
    args = parser.parse_args(argv)
    if args.summary is not None:
        summary = json.loads(args.summary.read_text())
    else:
        with tempfile.TemporaryDirectory(prefix="xsml-demo-figures-") as tmp:
            summary = run_demo(Path(tmp) / "demo")
    problems = check(summary, write=args.write)
    if args.write:
        kept = {k: summary[k] for k in KEPT}
        (ROOT / FIXTURE).write_text(json.dumps(kept, indent=2) + "\n")
        print("\n".join(problems) or "figures were current", f"\nwrote {FIXTURE}", sep="")
        return 0
    print("\n".join(problems) or "demo figures are current")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
