"""``xsml demo``: live tagging of a simulated scattering scan, on embedded defaults.

A simulated beamline (an ophyd motor and an inline-array detector whose frames
come from the synthetic scattering generator, changing along the scan), a
RunEngine, the packaged default tagger and :class:`TaggingCallback` in front of
a JSON-lines document writer. It prints a line per tagged frame and the run's
tag summary, and says where the documents were written.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["add_arguments", "main", "JsonlWriter"]


class JsonlWriter:
    """A minimal serializer: one JSON line per document (arrays summarised)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "w")

    def __call__(self, name: str, doc: dict) -> None:
        self._f.write(json.dumps({"name": name, "doc": doc}, default=_jsonable) + "\n")
        if name == "stop":
            self._f.flush()

    def close(self) -> None:
        self._f.close()


def _jsonable(obj):
    shape = getattr(obj, "shape", None)
    if shape is not None and len(shape) >= 2:
        return {"array_shape": list(shape), "dtype": str(obj.dtype)}
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--points", type=int, default=12, help="scan points (default 12)")
    parser.add_argument("--size", type=int, default=512, help="detector side in pixels")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the documents (default: a new xsml-demo-* folder)")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    from bluesky import RunEngine
    from bluesky.plans import scan
    from ophyd.sim import SynAxis

    from . import Tagger, TaggingCallback
    from .sim.detectors import InlineImageDetector
    from .sim.generator import SceneGenerator

    if args.points < 1 or args.size < 64:
        print("xsml demo: --points must be >= 1 and --size >= 64", file=sys.stderr)
        return 2
    out = args.out or Path.cwd() / time.strftime("xsml-demo-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)

    motor = SynAxis(name="sample_x")
    gen = SceneGenerator(seed=args.seed, size=args.size)
    det = InlineImageDetector("saxs", lambda: gen.one()[0])
    tagger = Tagger.load()
    writer = JsonlWriter(out / "documents.jsonl")

    def show(name, doc):
        if name == "event_page" and "skip_reason" in doc["data"]:
            for seq, tags, skip in zip(doc["data"]["source_seq_num"], doc["data"]["tags"],
                                       doc["data"]["skip_reason"]):
                print(f"  frame {seq:3d}: {skip or tags or '(no tag above threshold)'}")

    xsml = TaggingCallback(tagger, downstream=[writer, show])
    RE = RunEngine({}, call_returns_result=False)
    RE.subscribe(xsml)
    print(f"tagger {tagger!r}; scanning {args.points} points of a simulated sample")
    t0 = time.perf_counter()
    RE(scan([det], motor, 0, 10, args.points), sample="simulated combinatorial film")
    xsml.flush(300)
    stop = xsml.finished_runs[-1]
    writer.close()
    xsml.close()
    dt = time.perf_counter() - t0
    print(f"run {stop['uid'][:8]}: {stop['xsml_frames']} frames tagged in {dt:.1f} s; "
          f"skipped {stop['xsml_skipped'] or 'none'}")
    print("frames per tag: " + ", ".join(f"{t} {n}" for t, n in stop["xsml_tag_counts"].items()))
    print(f"documents written to {out / 'documents.jsonl'}")
    return 0
