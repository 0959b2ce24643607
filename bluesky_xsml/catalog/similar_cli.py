"""``xsml similar RUN SEQ``: the stored frames most like one frame, across runs.

Examples
--------
::

    xsml similar 3f2a9c1e 12 --catalog tiled_data/              # 10 nearest frames
    xsml similar 3f2a9c1e 12 -k 25 --save-index sim.npz          # and keep the side index
    xsml similar 3f2a9c1e 12 --index sim.npz                     # reuse it (no catalog reads)
"""

from __future__ import annotations

import argparse
import sys
import time

from .query_cli import DEFAULT_CATALOG_ENV, open_cli_catalog


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``xsml similar``."""
    import os

    parser.add_argument("run", help="uid of the query frame's run (8+ leading characters do)")
    parser.add_argument("seq", type=int, help="seq_num of the query frame's event")
    parser.add_argument("-k", type=int, default=10, help="neighbours (default 10)")
    parser.add_argument("--stream", default=None, help="source stream of the query frame")
    parser.add_argument("--key", default=None, help="data key of the query frame")
    parser.add_argument("--frame-index", type=int, default=0, help="frame within the event")
    parser.add_argument("--catalog", default=os.environ.get(DEFAULT_CATALOG_ENV),
                        help=f"catalog directory or Tiled URI (default: ${DEFAULT_CATALOG_ENV})")
    parser.add_argument("--api-key", default=None, help="API key of a remote Tiled server")
    parser.add_argument("--container", default="raw", help="runs container (default raw)")
    parser.add_argument("--index", default=None, help="read this side index instead of the "
                        "catalog's tag streams")
    parser.add_argument("--save-index", default=None, help="write the side index built here")


def main(args: argparse.Namespace) -> int:
    """Run ``xsml similar``; 0 found, 1 query frame not found, 2 bad input."""
    import pandas as pd

    from .similar import SimilarityIndex, find_similar

    close = None
    try:
        t0 = time.perf_counter()
        if args.index:
            try:
                index = SimilarityIndex.load(args.index)
            except (OSError, ValueError, KeyError) as err:
                print(f"xsml similar: cannot read index {args.index!r}: {err}", file=sys.stderr)
                return 2
        else:
            opened = open_cli_catalog(args, "xsml similar")
            if opened is None:
                return 2
            catalog, close = opened
            index = SimilarityIndex.from_catalog(catalog)
        built = time.perf_counter() - t0
        if args.save_index:
            index.save(args.save_index)
        try:
            table = find_similar(None, args.run, args.seq, args.k, stream=args.stream,
                                 key=args.key, frame_index=args.frame_index, index=index)
        except KeyError as err:
            print(f"xsml similar: {err.args[0] if err.args else err}", file=sys.stderr)
            return 1
        except ValueError as err:
            print(f"xsml similar: {err}", file=sys.stderr)
            return 2
        with pd.option_context("display.max_columns", None, "display.width", 200,
                               "display.max_colwidth", 40):
            print(table.to_string(index=False))
        print(f"{len(table)} frames like run {args.run} seq_num {args.seq} (index of "
              f"{len(index)} frames, {built:.2f} s to load)", file=sys.stderr)
        return 0
    finally:
        if close is not None:
            close()
