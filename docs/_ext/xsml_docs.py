"""Sphinx directives that write reference material from the code itself.

``xsml-cli``       every ``xsml`` subcommand with its ``--help`` text
``xsml-settings``  the service settings with their ``XSML_*`` environment variables

Generated at build time, so the reference cannot drift from the code. The
directives build docutils nodes directly, so they work the same in Markdown
(MyST) and reStructuredText pages.
"""

from __future__ import annotations

import argparse
import importlib

from docutils import nodes
from docutils.parsers.rst import Directive


def _table(header: list[str], rows: list[list[str]], widths: list[int]) -> nodes.table:
    table = nodes.table()
    group = nodes.tgroup(cols=len(header))
    table += group
    for w in widths:
        group += nodes.colspec(colwidth=w)

    def row(cells, literal=()):
        r = nodes.row()
        for i, text in enumerate(cells):
            entry = nodes.entry()
            para = nodes.paragraph()
            para += nodes.literal(text, text) if i in literal else nodes.Text(text)
            entry += para
            r += entry
        return r

    head = nodes.thead()
    head += row(header)
    group += head
    body = nodes.tbody()
    for cells in rows:
        body += row(cells, literal=(0, 1, 2))
    group += body
    return table


class CliDirective(Directive):
    """Help text of every ``xsml`` subcommand."""

    def run(self):
        from bluesky_xsml.cli import SUBCOMMANDS

        out = []
        for name, (module_name, help_text) in SUBCOMMANDS.items():
            parser = argparse.ArgumentParser(prog=f"xsml {name}", description=help_text)
            importlib.import_module(module_name).add_arguments(parser)
            usage = parser.format_help().replace("\t", "    ").rstrip()
            out.append(nodes.rubric(text=f"xsml {name}"))
            out.append(nodes.paragraph(text=f"{help_text[0].upper()}{help_text[1:]}."))
            block = nodes.literal_block(usage, usage)
            block["language"] = "text"
            out.append(block)
        return out


class SettingsDirective(Directive):
    """The service settings (pydantic-settings) and their environment variables."""

    def run(self):
        from bluesky_xsml.api.settings import ServiceSettings

        prefix = ServiceSettings.model_config.get("env_prefix", "")
        rows = []
        for name, field in ServiceSettings.model_fields.items():
            default = field.get_default(call_default_factory=True)
            shown = "(generated at start)" if name == "api_key" else repr(default)
            rows.append([name, f"{prefix}{name.upper()}", shown])
        return [_table(["setting", "environment variable", "default"], rows, [30, 40, 30])]


def setup(app):
    app.add_directive("xsml-cli", CliDirective)
    app.add_directive("xsml-settings", SettingsDirective)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
