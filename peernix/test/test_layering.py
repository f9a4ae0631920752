"""
Tests of the import graph: data flows one way (web -> peers -> store;
discovery -> registry), the contracts and the record types depend on no
implementation, and no modules import each other.

Every ``import`` counts, also those under ``if TYPE_CHECKING:``: a type
named across a layer is a dependency all the same.
"""

from __future__ import annotations

import ast
import os

from twisted.trial.unittest import SynchronousTestCase

import peernix

PACKAGE_DIR = os.path.dirname(os.path.abspath(peernix.__file__))


def _modules() -> dict[str, str]:
    """:returns: every non-test peernix module name -> its file."""
    found: dict[str, str] = {}
    root = os.path.dirname(PACKAGE_DIR)
    for directory, dirs, files in os.walk(PACKAGE_DIR):
        dirs[:] = [d for d in dirs if d not in ("test", "__pycache__")]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                found[module.removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """:returns: module -> the peernix modules it imports (not itself)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[module] = {d for d in deps if d in modules and d != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """:returns: the strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


class LayeringTests(SynchronousTestCase):
    """The arrows between modules."""

    def setUp(self) -> None:
        self.graph = import_graph()

    def imports_of(self, prefix: str) -> dict[str, set[str]]:
        return {m: deps for m, deps in self.graph.items() if m == prefix or m.startswith(prefix + ".")}

    def test_graph_is_read(self) -> None:
        """The graph sees the arrows this module checks (so the tests below can fail)."""
        self.assertIn("peernix.nix.signing", self.graph["peernix.nix.narinfo"])
        self.assertIn("peernix.interfaces", self.graph["peernix.peers.registry"])

    def test_no_cycles(self) -> None:
        """No modules import each other, directly or through others (narinfo and signing did)."""
        self.assertEqual(cycles(self.graph), [])
        self.assertEqual(cycles({"a": {"b"}, "b": {"a"}, "c": set()}), [["a", "b"]])

    def test_store_knows_no_command_line(self) -> None:
        """The store imports neither the options nor anything above it; the options take the share modes from the store."""
        above = ("peernix.options", "peernix.tap", "peernix.service", "peernix.web", "peernix.peers", "peernix.discovery")
        for module, deps in self.imports_of("peernix.store").items():
            self.assertEqual([d for d in deps if d.startswith(above)], [], module)
        self.assertIn("peernix.store.share", self.graph["peernix.options"])

    def test_contracts_name_records_only(self) -> None:
        """peernix.interfaces names record types (nix records, the peer record, answer sources, store scans), never an implementation such as the registry."""
        deps = self.graph["peernix.interfaces"]
        self.assertNotIn("peernix.peers.registry", deps)
        self.assertIn("peernix.peers.peer", deps)
        for dep in deps:
            self.assertTrue(dep.startswith("peernix.nix.") or dep in ("peernix.peers.peer", "peernix.sources", "peernix.store.scan"), dep)
        self.assertEqual(self.graph["peernix.peers.peer"], set())
        self.assertTrue(all(dep.startswith("peernix.nix.") for dep in self.graph["peernix.sources"]))

    def test_nix_formats_are_the_bottom(self) -> None:
        """peernix.nix.* (formats, hashes, keys) imports no other layer."""
        for module, deps in self.imports_of("peernix.nix").items():
            self.assertEqual([d for d in deps if not d.startswith("peernix.nix")], [], module)

    def test_registry_reexports_peer(self) -> None:
        """The peer record is still importable from the registry, as it always was."""
        from peernix.peers import peer, registry

        self.assertIs(registry.Peer, peer.Peer)
        self.assertEqual(registry.STATIC, peer.STATIC)
