"""``xsml export-xml RUN``: write a run's tags as CFN XML files (one per frame).

::

    xsml export-xml 1a2b3c4d --catalog tiled_data/ --out results/
"""

from __future__ import annotations

import argparse
import os
import sys

from .query_cli import DEFAULT_CATALOG_ENV, open_cli_catalog


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``xsml export-xml``."""
    parser.add_argument("run", help="run uid (a unique prefix works) or scan_id (negative "
                                    "counts from the latest: -1 is the last run)")
    parser.add_argument("--catalog", default=os.environ.get(DEFAULT_CATALOG_ENV),
                        help="catalog directory (embedded Tiled) or http(s):// Tiled URI "
                             f"(default: ${DEFAULT_CATALOG_ENV})")
    parser.add_argument("--api-key", default=None, help="API key of a remote Tiled server")
    parser.add_argument("--container", default="raw", help="runs container (default raw)")
    parser.add_argument("--stream", default=None,
                        help="tag stream (default: the run's current one)")
    parser.add_argument("--out", default=".", help="output directory (default .)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")


def _by_uid_prefix(catalog, prefix: str) -> str:
    from tiled.queries import Like

    matches = list(catalog.search(Like("start.uid", f"{prefix}%")).keys().head(2))
    if len(matches) != 1:
        raise KeyError(f"uid prefix {prefix!r} matches {len(matches) or 'no'} runs"
                       if matches else "no uid starts with it")
    return matches[0]


def find_run(catalog, ref: str):
    """The run named by a uid, a uid prefix (5+ characters), a scan_id, or -N (N-th latest).

    A number is a scan_id first; an all-digit string of 5+ characters that is no
    scan_id is then tried as a uid prefix (uids can start with digits only).
    """
    try:
        key: int | str = int(ref)
    except ValueError:
        key = ref
    if key == 0:
        raise KeyError("run 0 does not exist: give a uid, a scan_id or -1 for the latest run")
    try:
        if isinstance(key, str) and len(key) != 36:  # a uid prefix: one Like query
            key = _by_uid_prefix(catalog, key)
        try:
            return catalog[key]
        except KeyError:
            if isinstance(key, int) and key > 0 and len(ref) >= 5:
                return catalog[_by_uid_prefix(catalog, ref)]
            raise
    except (KeyError, ValueError, IndexError) as err:
        raise KeyError(f"no run {ref!r} in the catalog ({err}); give a uid, a unique uid "
                       "prefix of 5+ characters, a scan_id, or -1 for the latest run") from err


def main(args: argparse.Namespace) -> int:
    """Run ``xsml export-xml``; returns the exit code."""
    from .xml_export import export_run_xml

    opened = open_cli_catalog(args, "xsml export-xml")
    if opened is None:
        return 2
    catalog, close = opened
    try:
        run = find_run(catalog, args.run)
        paths = export_run_xml(run, args.out, stream=args.stream, overwrite=args.overwrite)
    except KeyError as err:
        print(f"xsml export-xml: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    except FileExistsError as err:
        print(f"xsml export-xml: {err}", file=sys.stderr)
        return 2
    finally:
        close()
    print(f"wrote {len(paths)} XML files to {args.out}")
    return 0
