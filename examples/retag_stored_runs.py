"""Re-tag runs that are already stored, e.g. with a newer model.

    python examples/retag_stored_runs.py [--size 256] [--workers 1]

Stores a scan tagged live, then re-tags every run of the catalog on a local
Dask cluster with ``retag_catalog`` (what ``xsml retag`` runs). Here the
"new" model is the default with slightly shifted output biases; any
checkpoint works. The run then has two tag streams; the stop summary names
the current one.
"""

import argparse
import tempfile
from pathlib import Path

import torch
from bluesky import RunEngine
from bluesky.plans import scan

from bluesky_xsml import Tagger, TaggingCallback
from bluesky_xsml.catalog.embedded import EmbeddedCatalog
from bluesky_xsml.scaleout.retag import retag_catalog
from bluesky_xsml.sim.sample import make_beamline


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp())
    with EmbeddedCatalog(work / "catalog") as catalog:
        bl = make_beamline(size=args.size)
        xsml = TaggingCallback(Tagger.load(), downstream=[catalog.writer()])
        RE = RunEngine()
        RE.subscribe(xsml)
        (uid,) = RE(scan([bl.det], bl.sample_x, 1, 9.6, 4))
        xsml.close()

        new = Tagger.load()            # stand-in for a newer model: nudge the output biases
        with torch.no_grad():
            list(new.net.parameters())[-1].add_(0.05)
        new.save(work / "new.pt")      # a new content hash, so a new checkpoint id

        report = retag_catalog(catalog.uri, model=str(work / "new.pt"), n_workers=args.workers)
        print(f"re-tagged {report.tagged} run(s), {report.frames} frames, skipped "
              f"{report.skipped}, errors {report.errors}")
        run = catalog.catalog[uid]
        streams = sorted(s for s in run if s != "primary")
        print(f"run {uid[:8]} streams: {streams}; current: {run.metadata['stop']['xsml_stream']}")


if __name__ == "__main__":   # Dask starts worker processes that import this file
    main()
