"""The ``xsml`` command line.

Each subcommand lives in its own module, which provides ``add_arguments(parser)``
and ``main(args) -> int``; modules are imported only when their subcommand runs,
so ``xsml --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("bluesky_xsml.demo", "map a simulated sample with live tagging (embedded defaults)"),
    "plot": ("bluesky_xsml.plots", "save a stored run's tag heatmap, frame montage and map"),
    "synth": ("bluesky_xsml.sim.dataset", "write a synthetic labeled dataset (zarr)"),
    "train": ("bluesky_xsml.training.train", "train the tagger on a synthetic dataset"),
    "evaluate": ("bluesky_xsml.training.evaluate", "per-tag AP/ROC-AUC, mAP and thresholds"),
    "calibrate": ("bluesky_xsml.training.calibrate",
                  "fit per-tag probability calibration on validation frames"),
    "polar-head": ("bluesky_xsml.training.polar_head",
                   "add a head that reads the beam centre to a trained tagger"),
    "worker": ("bluesky_xsml.scaleout.worker", "tag the runs of one partition from a 0MQ bus"),
    "retag": ("bluesky_xsml.scaleout.retag", "re-tag stored runs with a model on a Dask cluster"),
    "serve": ("bluesky_xsml.api.serve", "serve the steering API and live page (uvicorn)"),
    "query": ("bluesky_xsml.catalog.query_cli", "list runs or frames carrying a tag"),
    "novelty-fit": ("bluesky_xsml.training.novelty_fit",
                    "fit a tagger's novelty statistics and 'novel' threshold"),
    "similar": ("bluesky_xsml.catalog.similar_cli", "list the stored frames most like one frame"),
    "export-xml": ("bluesky_xsml.catalog.xml_cli", "write a run's tags as CFN XML files"),
}


DESCRIPTION = "bluesky-xsml: tag x-ray scattering frames live, train and query the tagger."


def build_parser(commands: Iterable[str] = ()) -> argparse.ArgumentParser:
    """The ``xsml`` parser, with the options of the subcommands in ``commands``.

    Parameters
    ----------
    commands : iterable of str
        Subcommands whose modules are imported to add their options; the others
        get only their name and one-line help (enough for ``xsml --help``).

    Returns
    -------
    argparse.ArgumentParser
    """
    commands = set(commands)
    parser = argparse.ArgumentParser(prog="xsml", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        if name in commands:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[:1])
    args = parser.parse_args(argv)
    module = importlib.import_module(args._module)
    return int(module.main(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
