"""``xsml query TAG``: list runs, or frames, carrying a tag.

Examples
--------
::

    xsml query ring_oriented --catalog tiled_data/                  # runs, embedded catalog
    xsml query ring_oriented --since 2026-11-01 --min-prob 0.8      # frames, as a table
    xsml query ring_isotropic --novel                               # frames flagged novel
    xsml query beam_off --catalog http://tiled:8000 --api-key KEY --sample PS-b-PMMA
"""

from __future__ import annotations

import argparse
import os
import sys

#: Where the catalog is when ``--catalog`` is not given.
DEFAULT_CATALOG_ENV = "XSML_CATALOG"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``xsml query``."""
    parser.add_argument("tag", help="tag name, e.g. ring_oriented (see docs/tags.md)")
    parser.add_argument("--catalog", default=os.environ.get(DEFAULT_CATALOG_ENV),
                        help="catalog directory (embedded Tiled) or http(s):// Tiled URI "
                             f"(default: ${DEFAULT_CATALOG_ENV})")
    parser.add_argument("--api-key", default=None, help="API key of a remote Tiled server")
    parser.add_argument("--container", default="raw", help="runs container (default raw)")
    parser.add_argument("--since", default=None, help="runs started at or after (ISO date/time)")
    parser.add_argument("--until", default=None, help="runs started before (ISO date/time)")
    parser.add_argument("--min-frames", type=int, default=1,
                        help="least frames with the tag per run (default 1)")
    parser.add_argument("--min-prob", type=float, default=None,
                        help="list frames with at least this probability instead of runs")
    parser.add_argument("--model", default=None, help="only taggings by this checkpoint id")
    parser.add_argument("--sample", default=None, help="only runs whose start.sample equals this")
    parser.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                        help="start metadata filter (repeatable); VALUE is parsed as a number "
                             "when it looks like one")
    parser.add_argument("--novel", action="store_true",
                        help="list only frames flagged novel (frames; --min-prob defaults to 0.5)")
    parser.add_argument("--limit", type=int, default=50, help="rows printed (default 50; 0: all)")
    parser.add_argument("--csv", default=None, help="also write the full table to this CSV file")


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _filters(args) -> dict:
    filters = {}
    for item in args.where:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--where takes KEY=VALUE, got {item!r}")
        filters[key] = _value(value)
    if args.sample is not None:
        filters["sample"] = args.sample
    return filters


def open_cli_catalog(args: argparse.Namespace, prog: str):
    """``(catalog, close)`` for a command's ``--catalog/--api-key/--container``, or ``None``
    after saying on standard error why it cannot be opened (the caller exits with 2)."""
    from .embedded import open_catalog

    if not args.catalog:
        print(f"{prog}: give --catalog DIR|URI or set ${DEFAULT_CATALOG_ENV}", file=sys.stderr)
        return None
    try:
        return open_catalog(args.catalog, api_key=args.api_key, container=args.container)
    except (FileNotFoundError, KeyError) as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return None


def main(args: argparse.Namespace) -> int:
    """Run ``xsml query``; returns the exit code (0 found, 1 nothing found, 2 bad input)."""
    import pandas as pd

    from .query import find_frames, find_runs, run_summaries

    opened = open_cli_catalog(args, "xsml query")
    if opened is None:
        return 2
    catalog, close = opened
    try:
        try:
            filters = _filters(args)
            runs = find_runs(catalog, args.tag, min_frames=args.min_frames, since=args.since,
                             until=args.until, model=args.model, **filters)
            if args.min_prob is None and not args.novel:
                table = run_summaries(runs, args.tag)
                what = "runs"
            else:
                min_prob = 0.5 if args.min_prob is None else args.min_prob
                table = find_frames(runs, args.tag, min_prob=min_prob, model=args.model,
                                    novel=True if args.novel else None)
                what = "frames"
        except (ValueError, TypeError) as err:
            print(f"xsml query: {err}", file=sys.stderr)
            return 2
        if args.csv:
            table.to_csv(args.csv, index=False)
        shown = table if not args.limit else table.head(args.limit)
        with pd.option_context("display.max_columns", None, "display.width", 200,
                               "display.max_colwidth", 40):
            print(shown.to_string(index=False) if len(shown) else f"no {what} found")
        if args.limit and len(table) > args.limit:
            print(f"... {len(table) - args.limit} more (use --limit 0 or --csv)")
        print(f"{len(table)} {what} with {args.tag}", file=sys.stderr)
        return 0 if len(table) else 1
    finally:
        close()
