"""
The import rule of docs/architecture.md, checked on the source: the lower
floors (C{framing}, C{core}, C{backends}, C{state}) import only the small
top-level modules and their own package, and no module of the repository
takes part in an import circle (C{bench/} and C{tests/} included).
"""

from __future__ import annotations

import ast
import os

from twisted.trial.unittest import SynchronousTestCase

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: What every floor may import.
BASE = {"xcauth", "xcauth.interfaces", "xcauth.identity", "xcauth.text", "xcauth.deadlines",
        "xcauth.twistedprivate"}
#: The one module allowed to use Twisted's private names.
PRIVATE_NAMES_MODULE = os.path.join("xcauth", "twistedprivate.py")
LOWER = ("framing", "core", "backends", "state")


def modules() -> dict[str, str]:
    """
    Every module of xcauth/, bench/ and tests/ by dotted name -> its path.
    """
    found = {}
    for top in ("xcauth", "bench", "tests"):
        for directory, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(directory, name)
                    dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                    found[dotted.removesuffix(".__init__")] = path
    return found


def imports(path: str, known: dict[str, str]) -> set[str]:
    """
    The modules of C{known} that the module at C{path} imports (at any
    depth of the file, type-checking imports included).
    """
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n in known}


class LayerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.known = modules()
        self.graph = {m: imports(p, self.known) - {m} for m, p in self.known.items()}

    def test_lowerFloorsImportDownOnly(self) -> None:
        wrong = []
        for module, targets in sorted(self.graph.items()):
            parts = module.split(".")
            if parts[0] != "xcauth" or len(parts) < 3 or parts[1] not in LOWER:
                continue
            own = f"xcauth.{parts[1]}"
            for target in sorted(targets):
                if target in BASE or target == own or target.startswith(own + "."):
                    continue
                wrong.append(f"{module} -> {target}")
        self.assertEqual(wrong, [])

    def test_noCircle(self) -> None:
        # Tarjan's strongly connected components over the import graph.
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        onStack: set[str] = set()
        circles: list[list[str]] = []

        def visit(v: str) -> None:
            index[v] = low[v] = len(index)
            stack.append(v)
            onStack.add(v)
            for w in self.graph[v]:
                # A package importing its own submodules is no circle.
                if w.startswith(v + "."):
                    continue
                if w not in index:
                    visit(w)
                    low[v] = min(low[v], low[w])
                elif w in onStack:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    onStack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    circles.append(sorted(component))

        for v in sorted(self.graph):
            if v not in index:
                visit(v)
        self.assertEqual(circles, [])

    def test_ruleSeesImports(self) -> None:
        """
        The checks above read real imports (they cannot pass on an empty graph).
        """
        self.assertIn("xcauth.interfaces", self.graph["xcauth.core.authenticator"])
        self.assertIn("xcauth.core.penalty", self.graph["xcauth.core.sharedbudget"])


class PrivateTwistedNamesTests(SynchronousTestCase):
    """
    Twisted's private modules and names are used in L{xcauth.twistedprivate}
    only, where each is listed with the releases it was checked on.
    """

    def test_onlyInOneModule(self) -> None:
        wrong = []
        for top in ("xcauth", "twisted", "bench"):
            for directory, _, files in os.walk(os.path.join(REPO, top)):
                for name in files:
                    path = os.path.join(directory, name)
                    relative = os.path.relpath(path, REPO)
                    if not name.endswith(".py") or relative == PRIVATE_NAMES_MODULE:
                        continue
                    wrong.extend(f"{relative}: {what}" for what in privateTwistedNames(path))
        self.assertEqual(wrong, [])

    def test_found(self) -> None:
        """
        The check sees the forms of private use (so that it can fail).
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("from twisted.web._newclient import RequestNotSent\n"
                    "from twisted.application import app\n"
                    "import twisted.scripts._twistd_unix\n"
                    "from twisted.web.client import _HTTP11ClientFactory\n"
                    "app._exitWithSignal(2)\n"
                    "getattr(service, '_waitingForPort', None)\n")
        self.assertEqual(len(privateTwistedNames(path)), 5)


def privateTwistedNames(path: str) -> list[str]:
    """
    Private names of Twisted the module at C{path} uses: imports from private
    modules, private names imported, and private attributes of a Twisted
    module it imported.
    """
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found = []
    twistedModules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "twisted":
                    if any(part.startswith("_") for part in alias.name.split(".")):
                        found.append(alias.name)
                    twistedModules.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] != "twisted":
                continue
            if any(part.startswith("_") for part in node.module.split(".")):
                found.append(node.module)
                continue
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"{node.module}.{alias.name}")
                else:
                    twistedModules.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        # getattr(obj, "_private"), on anything but the module's own objects.
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("getattr", "setattr", "hasattr") and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
                and node.args[1].value.startswith("_") and not node.args[1].value.startswith("__")
                and not (isinstance(node.args[0], ast.Name) and node.args[0].id == "self")):
            found.append(f"{node.func.id}(..., {node.args[1].value!r})")
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in twistedModules):
            found.append(f"{node.value.id}.{node.attr}")
    return found
