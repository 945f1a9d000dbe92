"""Architecture figures of a source tree: size, import graph, circles, imports up the layers, long code.

Prints, for a package folder (default: ``src/atpstar`` next to this script):

- lines and files;
- the import graph: every ``import``/``from ... import`` inside the package, at module level and inside
  functions (and under ``if TYPE_CHECKING``), relative or absolute, parsed with ``ast``. An arrow goes
  from the importing module to the module named; ``from pkg import name`` points at ``pkg.name`` when
  that is a module, else at ``pkg`` (so ``from . import __version__`` points at the package root);
- its strongly connected components of more than one module (the circles);
- the arrows that run up the layers of ``LAYERS`` below, and the modules the table does not place;
- modules over ``MAX_MODULE_LINES`` lines and functions over ``MAX_FUNCTION_LINES`` lines;
- every comparison with a node-type name (``"edge"``, ``"neuron"``, ``"query"``, ``"key"``, ``"value"``,
  ``"head"``, ``EDGE_TYPE``) outside the modules that own node spaces (``OWNERS``).

Usage:
    python benchmarks/architecture.py [PACKAGE_DIR] [--json]

``tests/test_architecture.py`` runs the same analysis on the installed package.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The intended layering, bottom to top: a module may import its own layer and the layers below.
# Names are relative to the package; "x" is the module x (or package x's __init__), "x.*" its submodules.
LAYERS: list[tuple[str, list[str]]] = [
    ("base", ["errors", "version", "cost", "devices", "progress", "ops", "persist", "lock", "validate",
              "batching"]),
    ("model and data", ["families", "runner", "model", "model_hooks", "origin", "backends", "backends.*", "loading",
                        "zoo", "pairs", "pairsets", "job", "jsonl", "tasks", "tasks.*", "dictionaries", "dictionaries.*"]),
    ("fingerprint", ["fingerprint"]),
    ("node rows", ["nodes", "edges.graph", "edges.sites"]),
    ("engine", ["engine", "engine.*", "gradients", "gradients.*", "edges.capture", "edges.patching",
                "edges.circuit_run", "dictionaries.patching", "dictionaries.estimate", "dictionaries.qkfix",
                "features.sites", "features.latent_edges"]),
    ("node spaces", ["spaces", "spaces.*"]),
    ("sweeps", ["sweeps", "sweeps.*", "checkpoint", "distributed.units", "edges.sweep", "dictionaries.sampling"]),
    ("distributed", ["distributed", "distributed.*"]),
    ("results", ["result", "verification", "sink", "memory"]),
    ("methods", ["methods", "methods.*", "edges.eap", "edges.atpstar", "edges.subsampling", "edges.estimate"]),
    ("verbs", ["verify", "bound", "bound.*", "find", "find.*", "find_state", "find_resume", "localization",
               "evaluate", "evaluate.*", "api", "edges.verify", "edges.circuits", "edges.circuit_select", "edges.mib", "edges", "features",
               "features.circuit", ""]),
    ("report", ["report", "plots", "testing", "testing.*", "edges.report", "mib", "mib.*", "viewer", "viewer.*",
                "features.draw"]),
    ("cli", ["cli", "cli.*"]),
]  # fmt: skip
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
NODE_TYPE_NAMES = frozenset({"edge", "neuron", "query", "key", "value", "head"})
NODE_TYPE_CONSTANTS = frozenset({"EDGE_TYPE"})
OWNERS = ("nodes", "spaces", "spaces.*", "edges", "edges.*")  # the modules that own node spaces


@dataclass
class Import:
    source: str
    target: str
    line: int
    where: str  # "module", "function" or "type" (under ``if TYPE_CHECKING``)


@dataclass
class Figures:
    package: str
    lines: int
    files: int
    modules: dict[str, int]  # module -> lines
    imports: list[Import]
    arrows: int
    circles: list[list[str]]
    upward: list[Import]
    unplaced: list[str]
    long_modules: dict[str, int]
    long_functions: list[tuple[str, int]]  # ("module:qualified.name", lines)
    node_type_conditions: list[str]  # "module:line: source"
    layers: dict[str, str] = field(default_factory=dict)  # module -> layer name


def module_name(path: Path, root: Path) -> str:
    """Dotted name relative to the package (``""`` for its ``__init__``)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _matches(name: str, pattern: str) -> bool:
    if pattern.endswith(".*"):
        return name.startswith(pattern[:-1])
    return name == pattern


def layer_of(name: str) -> int | None:
    """Index into ``LAYERS`` of a module, the most specific pattern winning; None if unplaced."""
    best: tuple[int, int] | None = None  # (specificity, layer)
    for index, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if _matches(name, pattern):
                specificity = len(pattern) + (0 if pattern.endswith(".*") else 1000)
                if best is None or specificity > best[0]:
                    best = (specificity, index)
    return None if best is None else best[1]


class _ImportVisitor(ast.NodeVisitor):
    """Collects imports of one module with where they sit (module level, function, TYPE_CHECKING)."""

    def __init__(self, name: str, is_package: bool, package: str, modules: set[str]) -> None:
        self.name, self.package, self.modules = name, package, modules
        self.base = name if is_package else name.rpartition(".")[0]
        self.depth = 0
        self.type_only = 0
        self.found: list[Import] = []

    def _where(self) -> str:
        return "type" if self.type_only else ("function" if self.depth else "module")

    def _add(self, target: str, line: int) -> None:
        seen = any((i.target, i.line) == (target, line) for i in self.found)  # one per statement and target
        if target != self.name and target in self.modules and not seen:
            self.found.append(Import(self.name, target, line, self._where()))

    def _local(self, dotted: str) -> str | None:
        """Package-relative name of an absolute module name, None outside the package."""
        if dotted == self.package:
            return ""
        prefix = self.package + "."
        return dotted[len(prefix) :] if dotted.startswith(prefix) else None

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        guarded = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        )
        self.type_only += guarded
        for child in node.body:
            self.visit(child)
        self.type_only -= guarded
        for child in node.orelse:
            self.visit(child)
        self.visit(node.test)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            local = self._local(alias.name)
            if local is not None:
                self._add(local, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            parts = self.base.split(".") if self.base else []
            parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
            origin: str | None = ".".join(p for p in [*parts, node.module or ""] if p)
        else:
            origin = self._local(node.module or "")
        if origin is None:
            return
        for alias in node.names:
            submodule = f"{origin}.{alias.name}" if origin else alias.name
            self._add(submodule if submodule in self.modules else origin, node.lineno)


def _circles(modules: list[str], imports: list[Import]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        graph[imp.source].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in modules:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return sorted(found, key=lambda c: (-len(c), c))


def _long_functions(tree: ast.Module, name: str) -> list[tuple[str, int]]:
    found = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qualified = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    length = (child.end_lineno or child.lineno) - child.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        found.append((f"{name or '__init__'}:{qualified}", length))
                walk(child, qualified + ".")
            else:
                walk(child, prefix)

    walk(tree, "")
    return found


def _is_node_type(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in NODE_TYPE_NAMES
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_node_type(e) for e in node.elts)
    if isinstance(node, ast.Name):
        return node.id in NODE_TYPE_CONSTANTS
    return isinstance(node, ast.Attribute) and node.attr in NODE_TYPE_CONSTANTS


def _node_type_conditions(tree: ast.Module, name: str, source: list[str]) -> list[str]:
    if any(_matches(name, owner) for owner in OWNERS):
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(_is_node_type(e) for e in [node.left, *node.comparators]):
            found.append(f"{name or '__init__'}:{node.lineno}: {source[node.lineno - 1].strip()}")
    return sorted(found, key=lambda entry: int(entry.split(":")[1]))


def analyse(package_dir: str | Path) -> Figures:
    """Every figure of the module docstring for the package in ``package_dir``."""
    root = Path(package_dir).resolve()
    files = sorted(root.rglob("*.py"))
    names = {path: module_name(path, root) for path in files}
    modules = set(names.values())
    lines: dict[str, int] = {}
    imports: list[Import] = []
    long_functions: list[tuple[str, int]] = []
    conditions: list[str] = []
    for path, name in names.items():
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, filename=str(path))
        lines[name] = len(text.splitlines())
        visitor = _ImportVisitor(name, path.name == "__init__.py", root.name, modules)
        visitor.visit(tree)
        imports += visitor.found
        long_functions += _long_functions(tree, name)
        conditions += _node_type_conditions(tree, name, text.splitlines())
    return _figures(root, lines, imports, long_functions, conditions)


def _figures(
    root: Path,
    lines: dict[str, int],
    imports: list[Import],
    long_functions: list[tuple[str, int]],
    conditions: list[str],
) -> Figures:
    """Circles, layers and long modules from the per-module facts; the package root is named ``__init__``."""
    ordered = sorted(lines)
    placed = {m: layer_of(m) for m in ordered}
    upward = [i for i in imports if _rank(placed[i.target]) > _rank(placed[i.source]) >= 0]
    labelled = [Import(_label(i.source), _label(i.target), i.line, i.where) for i in imports]
    return Figures(
        package=str(root),
        lines=sum(lines.values()),
        files=len(lines),
        modules={_label(m): lines[m] for m in ordered},
        imports=labelled,
        arrows=len({(i.source, i.target) for i in imports}),
        circles=[[_label(m) for m in c] for c in _circles(ordered, imports)],
        upward=[Import(_label(i.source), _label(i.target), i.line, i.where) for i in upward],
        unplaced=[_label(m) for m in ordered if placed[m] is None],
        long_modules={_label(m): n for m, n in sorted(lines.items(), key=lambda x: -x[1]) if n > MAX_MODULE_LINES},
        long_functions=sorted(long_functions, key=lambda x: -x[1]),
        node_type_conditions=conditions,
        layers={_label(m): LAYERS[i][0] for m, i in placed.items() if i is not None},
    )


def _rank(layer: int | None) -> int:
    return -1 if layer is None else layer


def _label(name: str) -> str:
    return name or "__init__"


def render(fig: Figures) -> str:
    """The figures as a markdown report: summary table, then one list per finding."""
    upward_pairs = sorted({(i.source, i.target) for i in fig.upward})
    kinds = {w: sum(i.where == w for i in fig.imports) for w in ("module", "function", "type")}
    rows = [
        ("lines / files", f"{fig.lines} / {fig.files}"),
        ("import statements (module / function / TYPE_CHECKING)", f"{kinds['module']} / {kinds['function']} / {kinds['type']}"),
        ("arrows (module pairs)", str(fig.arrows)),
        ("circles (modules in them)", f"{len(fig.circles)} ({sum(map(len, fig.circles))})"),
        ("arrows up the layers (statements)", f"{len(upward_pairs)} ({len(fig.upward)})"),
        ("modules not in the layer table", str(len(fig.unplaced))),
        (f"modules over {MAX_MODULE_LINES} lines", str(len(fig.long_modules))),
        (f"functions over {MAX_FUNCTION_LINES} lines", str(len(fig.long_functions))),
        ("node-type comparisons outside node spaces", str(len(fig.node_type_conditions))),
    ]  # fmt: skip
    out = [f"# Architecture of {fig.package}", "", "| measure | value |", "|---|---:|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    sections: list[tuple[str, list[str]]] = [
        ("Circles", [" <-> ".join(c) for c in fig.circles]),
        ("Arrows up the layers", [_upward_line(fig, s, t) for s, t in upward_pairs]),
        ("Modules not in the layer table", fig.unplaced),
        (f"Modules over {MAX_MODULE_LINES} lines", [f"{m}: {n}" for m, n in fig.long_modules.items()]),
        (f"Functions over {MAX_FUNCTION_LINES} lines", [f"{f}: {n}" for f, n in fig.long_functions]),
        ("Node-type comparisons outside node spaces", fig.node_type_conditions),
    ]
    for title, items in sections:
        out += ["", f"## {title} ({len(items)})", ""] + [f"- {item}" for item in items]
    return "\n".join(out)


def _upward_line(fig: Figures, source: str, target: str) -> str:
    lines = ", ".join(f"{i.line}{'' if i.where == 'module' else ' (' + i.where + ')'}"
                      for i in fig.upward if (i.source, i.target) == (source, target))  # fmt: skip
    return f"{_label(source)} ({fig.layers[source]}) -> {_label(target)} ({fig.layers[target]}), line {lines}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[1] / "src" / "atpstar"
    parser.add_argument(
        "package_dir", nargs="?", default=str(default), help="the package folder (default: %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    figures = analyse(args.package_dir)
    print(json.dumps(asdict(figures), indent=1) if args.json else render(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
