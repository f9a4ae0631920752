"""Tests of the packaging: the twistd plugin is found, setup.cfg ships what it must."""

from __future__ import annotations

import configparser
import os

from twisted import plugins
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

import peernix

#: The directory holding ``peernix/``, ``twisted/plugins/`` and ``setup.cfg``.
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(peernix.__file__)))
SETUP_CFG = os.path.join(SOURCE_ROOT, "setup.cfg")


class PluginTests(SynchronousTestCase):
    """The ``peernix`` twistd plugin."""

    def plugin(self) -> IServiceMaker:
        """:returns: the ``IServiceMaker`` called ``peernix``."""
        found = [p for p in getPlugins(IServiceMaker, plugins) if p.tapname == "peernix"]
        self.assertTrue(found, "no 'peernix' IServiceMaker in twisted.plugins")
        maker: IServiceMaker = found[0]
        return maker

    def test_found(self) -> None:
        """twisted.plugin finds an IServiceMaker named 'peernix' that provides the interface."""
        maker = self.plugin()
        self.assertTrue(verifyObject(IServiceMaker, maker))
        self.assertTrue(maker.description)

    def test_points_at_tap(self) -> None:
        """The plugin's options and makeService are those of peernix.tap."""
        from peernix import tap

        maker = self.plugin()
        self.assertIs(maker.options, tap.Options)
        # ServiceMaker imports its module by name, only when asked for it.
        self.assertEqual(getattr(maker, "module", None), tap.__name__)

    def test_plugin_module_is_lazy(self) -> None:
        """The plugin file imports nothing of peernix: loading it stays cheap."""
        path = os.path.join(SOURCE_ROOT, "twisted", "plugins", "peernix_plugin.py")
        if not os.path.exists(path):
            raise self.skipTest("not running from a source tree")
        with open(path, encoding="utf-8") as f:
            source = f.read()
        self.assertNotIn("import peernix", source)
        self.assertNotIn("from peernix", source)


class SetupCfgTests(SynchronousTestCase):
    """setup.cfg's package list, checked against the source tree."""

    def setUp(self) -> None:
        if not os.path.exists(SETUP_CFG):
            raise self.skipTest("not running from a source tree")
        parser = configparser.ConfigParser()
        parser.read(SETUP_CFG, encoding="utf-8")
        self.packages = set(parser["options"]["packages"].split())
        self.parser = parser

    def test_lists_twisted_plugins(self) -> None:
        """``twisted.plugins`` is listed explicitly (``find:`` would miss it)."""
        self.assertIn("twisted.plugins", self.packages)

    def test_no_twisted_init(self) -> None:
        """There is no ``__init__.py`` in twisted/ or twisted/plugins/, which would shadow Twisted."""
        for directory in ("twisted", os.path.join("twisted", "plugins")):
            self.assertFalse(os.path.exists(os.path.join(SOURCE_ROOT, directory, "__init__.py")),
                             directory)

    def test_every_package_listed(self) -> None:
        """Every peernix package in the source tree is listed, so installs are complete."""
        found = set()
        for directory, _dirs, files in os.walk(os.path.join(SOURCE_ROOT, "peernix")):
            if "__init__.py" in files:
                relative = os.path.relpath(directory, SOURCE_ROOT)
                found.add(relative.replace(os.sep, "."))
        self.assertEqual(found - self.packages, set())

    def test_test_extras(self) -> None:
        """The test extra brings the type checker, its zope plugin and Sphinx, which CI runs."""
        extras = self.parser["options.extras_require"]["test"]
        for name in ("hypothesis", "mypy", "mypy-zope", "sphinx"):
            self.assertIn(name, extras)

    def test_docs_extra(self) -> None:
        """The docs have their own extra (Sphinx only), and the test extra asks for the same Sphinx."""
        extras = self.parser["options.extras_require"]
        docs = [r.strip() for r in extras["docs"].splitlines() if r.strip()]
        test = [r.strip() for r in extras["test"].splitlines() if r.strip()]
        self.assertEqual([r.split()[0] for r in docs], ["sphinx"])
        for requirement in docs:
            self.assertIn(requirement, test)

    def test_python_version(self) -> None:
        """Python 3.11 or newer is required (tomllib, zeroconf)."""
        self.assertEqual(self.parser["options"]["python_requires"].strip(), ">=3.11")


class ConsoleScriptTests(SynchronousTestCase):
    """The ``peernix`` console script (``peernix doctor``)."""

    def test_entry_point(self) -> None:
        """setup.cfg installs ``peernix`` pointing at peernix.cli:main, which exists."""
        if not os.path.exists(SETUP_CFG):
            raise self.skipTest("not running from a source tree")
        parser = configparser.ConfigParser()
        parser.read(SETUP_CFG, encoding="utf-8")
        scripts = [line.split("=", 1) for line in parser["options.entry_points"]["console_scripts"].split("\n")
                   if line.strip()]
        self.assertIn(["peernix ", " peernix.cli:main"], scripts)
        from peernix import cli

        self.assertTrue(callable(cli.main))
