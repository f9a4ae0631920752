"""Sphinx configuration of peernix's documentation (``sphinx-build -W -b html docs docs/_build``)."""

from __future__ import annotations

import os
import sys

from docutils import nodes
from docutils.parsers.rst import Directive
from docutils.statemachine import StringList
from sphinx.util.nodes import nested_parse_with_titles

# The docs describe the checkout they live in, installed or not.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import peernix  # noqa: E402

project = "peernix"
author = "the peernix authors"
copyright = "the peernix authors"
version = release = peernix.__version__

extensions: list[str] = []
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []
# Keep "--port" as typed instead of turning "--" into a dash.
smartquotes = False


class SettingsDirective(Directive):
    """
    ``.. peernix-settings::`` renders every setting of
    :data:`peernix.options.SETTINGS`, so the reference can never drift from
    the code.
    """

    has_content = False

    def run(self) -> list[nodes.Node]:
        from peernix.options import render_settings_rst

        container = nodes.section()
        container.document = self.state.document
        lines = StringList(render_settings_rst().splitlines(), source="peernix.options.SETTINGS")
        nested_parse_with_titles(self.state, lines, container)
        return list(container.children)


def setup(app: object) -> dict[str, object]:
    app.add_directive("peernix-settings", SettingsDirective)  # type: ignore[attr-defined]
    return {"parallel_read_safe": True}
