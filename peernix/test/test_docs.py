"""
Tests for the documentation: every Prometheus metric the code registers is
documented in ``docs/monitoring.rst`` and used by the Grafana dashboard
``docs/grafana-dashboard.json``, which is a well-formed dashboard.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

import peernix
from peernix.test.test_service import build, quiet

#: The repository root (this checkout) and its docs.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(peernix.__file__)))
DOCS = os.path.join(ROOT, "docs")

#: The docs are in a checkout, not in an installed package.
SKIP_NO_DOCS: str | None = None if os.path.isdir(DOCS) else "not running from a source tree (no docs/)"

#: A collector made in the code: ``Counter("peernix_x", ...`` (the name may
#: be on the next line).
_CONSTRUCTOR = re.compile(r"\b(Counter|Gauge|Histogram|Summary|Info|Enum)\(\s*\"(peernix_\w+)\"")


def exposed_name(kind: str, name: str) -> str:
    """
    :returns: the name Prometheus scrapes for a collector made as ``kind(name)``:
        prometheus_client adds ``_total`` to a counter's name (keeping one
        already there); histograms and summaries are named by their base
        name (their series add ``_bucket``, ``_sum``, ``_count``).
    """
    if kind.lower() == "counter":
        return name.removesuffix("_total") + "_total"
    return name


def registered_metrics(case: SynchronousTestCase) -> dict[str, str]:
    """:returns: ``{exposed name: type}`` of every collector of a fully built daemon (with fakes)."""
    # Fetching for the LAN on (its metrics exist only then), staging in a temporary directory.
    service, _ = build(case, quiet(upstream=("http://upstream.invalid",), staging_dir=case.mktemp()))
    return {exposed_name(m.type, m.name): m.type for m in service.metrics.registry.collect()}


def metrics_in_source() -> dict[str, str]:
    """:returns: ``{exposed name: constructor}`` of every metric constructed in non-test code."""
    package = os.path.dirname(os.path.abspath(peernix.__file__))
    found: dict[str, str] = {}
    for directory, dirs, files in os.walk(package):
        dirs[:] = [d for d in dirs if d not in ("test", "__pycache__")]
        for file in files:
            if file.endswith(".py"):
                with open(os.path.join(directory, file), encoding="utf-8") as f:
                    for kind, name in _CONSTRUCTOR.findall(f.read()):
                        found[exposed_name(kind, name)] = kind
    return found


def read_docs(name: str) -> str:
    """:returns: the text of ``docs/<name>``."""
    with open(os.path.join(DOCS, name), encoding="utf-8") as f:
        return f.read()


def dashboard() -> dict[str, Any]:
    """:returns: the parsed Grafana dashboard."""
    data: dict[str, Any] = json.loads(read_docs("grafana-dashboard.json"))
    return data


def dashboard_exprs() -> list[str]:
    """:returns: every PromQL expression of the dashboard (panel targets and template queries)."""
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard().get("templating", {}).get("list", []) if "definition" in v]
    return exprs


class MetricDocsTests(SynchronousTestCase):
    """Every metric is documented and on the dashboard."""

    skip = SKIP_NO_DOCS

    def test_source_and_registry_agree(self) -> None:
        """The metrics a built daemon registers are the ones the source constructs (so neither list misses one)."""
        self.assertEqual(set(registered_metrics(self)), set(metrics_in_source()))

    def test_names_follow_conventions(self) -> None:
        """Names start with peernix_; counters end in _total; histograms carry a unit (_seconds or _bytes)."""
        for name, kind in registered_metrics(self).items():
            self.assertTrue(name.startswith("peernix_"), name)
            self.assertRegex(name, r"^[a-z_]+$")
            if kind == "counter":
                self.assertTrue(name.endswith("_total"), name)
            if kind in ("histogram", "summary"):
                self.assertTrue(name.endswith(("_seconds", "_bytes")), name)

    def test_every_metric_documented(self) -> None:
        """docs/monitoring.rst names every metric, as a literal."""
        text = read_docs("monitoring.rst")
        missing = [n for n in sorted(metrics_in_source()) if not re.search(rf"``{n}(\{{[^`]*\}})?``", text)]
        self.assertEqual(missing, [])

    def test_documented_metrics_exist(self) -> None:
        """Every metric name docs/monitoring.rst mentions exists (no stale names)."""
        known = set(metrics_in_source())
        mentioned = set(re.findall(r"\bpeernix_[a-z_]+", read_docs("monitoring.rst")))
        suffixes = ("_bucket", "_sum", "_count", "_created")
        stale = {m for m in mentioned
                 if m not in known and not any(m.endswith(s) and m[: -len(s)] in known for s in suffixes)}
        self.assertEqual(stale, set())

    def test_every_metric_on_dashboard(self) -> None:
        """The Grafana dashboard queries every metric."""
        exprs = "\n".join(dashboard_exprs())
        missing = [n for n in sorted(metrics_in_source())
                   if not re.search(rf"\b{n}(_bucket|_sum|_count)?\b", exprs)]
        self.assertEqual(missing, [])

    def test_dashboard_metrics_exist(self) -> None:
        """Every metric the dashboard queries exists (a typo would show an empty panel)."""
        known = set(metrics_in_source())
        for expr in dashboard_exprs():
            for name in re.findall(r"\bpeernix_[a-z_]+", expr):
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                self.assertTrue(name in known or base in known, f"{name} in {expr}")


class DashboardTests(SynchronousTestCase):
    """docs/grafana-dashboard.json is a dashboard Grafana imports."""

    skip = SKIP_NO_DOCS

    def test_shape(self) -> None:
        """Title, uid, schema version, a Prometheus data-source input, and panels with targets."""
        data = dashboard()
        self.assertEqual(data["title"], "peernix")
        self.assertEqual(data["uid"], "peernix")
        self.assertIsInstance(data["schemaVersion"], int)
        self.assertEqual([i["pluginId"] for i in data["__inputs"]], ["prometheus"])
        ids = [p["id"] for p in data["panels"]]
        self.assertEqual(len(ids), len(set(ids)))
        for panel in data["panels"]:
            self.assertIn(panel["type"], ("timeseries", "stat"))
            self.assertTrue(panel["title"])
            self.assertEqual(panel["datasource"], {"type": "prometheus", "uid": "${DS_PROMETHEUS}"})
            self.assertTrue(set(panel["gridPos"]) >= {"h", "w", "x", "y"})
            self.assertTrue(panel["targets"])
            refs = [t["refId"] for t in panel["targets"]]
            self.assertEqual(len(refs), len(set(refs)))

    def test_panels_do_not_overlap(self) -> None:
        """No two panels share a grid cell, and every panel fits the 24-column grid."""
        cells: set[tuple[int, int]] = set()
        for panel in dashboard()["panels"]:
            g = panel["gridPos"]
            self.assertLessEqual(g["x"] + g["w"], 24)
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            self.assertFalse(cells & mine, panel["title"])
            cells |= mine

    def test_exprs_balanced(self) -> None:
        """Every PromQL expression has balanced brackets and braces."""
        for expr in dashboard_exprs():
            for opening, closing in ("()", "[]", "{}"):
                depth = 0
                for char in expr.replace("$__", ""):
                    depth += (char == opening) - (char == closing)
                    self.assertGreaterEqual(depth, 0, expr)
                self.assertEqual(depth, 0, expr)


class DocsTreeTests(SynchronousTestCase):
    """The documentation's structure."""

    skip = SKIP_NO_DOCS

    def test_every_page_in_toctree(self) -> None:
        """Every page of docs/ is in the index's table of contents."""
        index = read_docs("index.rst")
        for name in os.listdir(DOCS):
            if name.endswith(".rst") and name != "index.rst":
                self.assertRegex(index, rf"(?m)^\s+{re.escape(name[:-4])}$", name)

    def test_reference_is_generated(self) -> None:
        """The settings reference is the generated directive, not a second hand-kept list."""
        text = read_docs("configuration.rst")
        self.assertIn(".. peernix-settings::", text)
        self.assertNotIn("--announce-interval", text)

    def test_key_set_up_is_per_host(self) -> None:
        """The docs make keys with a host-specific name and never suggest ?trusted=1 except to warn."""
        for name in ("trust.rst", "migration.rst"):
            self.assertIn('"$(hostname)-peernix-1"', read_docs(name))
        for name in os.listdir(DOCS):
            if name.endswith(".rst"):
                for line in read_docs(name).splitlines():
                    if line.strip().startswith(("substituters", "extra-substituters")):
                        self.assertNotIn("trusted=1", line, name)
