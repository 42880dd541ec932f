"""The package's shape: module counts, the largest files, import cycles, upward imports
against the declared layers, and the command line's start-up import time.

    python benchmarks/layout.py

The module import graph is read with ``ast`` (nothing is imported): an edge A -> B for every
``import``/``from ... import`` in A naming chattune module B, at module level or inside a
function ("lazy"); imports under ``if TYPE_CHECKING:`` are left out. ``from pkg import name``
points at ``pkg.name`` where that is a module, else at ``pkg``. tests/test_layout.py asserts
on the same graph (it imports this file by path): no cycles, no upward imports.

A module may import from its own layer or a lower one (:data:`LAYERS`, low to high; a module
takes the layer of the longest name in the table that is it or a package above it).
"""

from __future__ import annotations

import argparse
import ast
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "chattune"

LAYERS: list[tuple[str, ...]] = [
    ("chattune", "chattune.errors"),
    ("chattune.config",),
    # pure: records and their file formats, text metrics (nothing of chattune but errors)
    ("chattune.data.records", "chattune.vision.images", "chattune.data.formats", "chattune.evaluation.metrics"),
    ("chattune.chatglm", "chattune.gguf_import", "chattune.pretrained"),  # model files into native folders
    ("chattune.special_text",),  # an exported tokenizer read back as its run's
    ("chattune.lora_init",),  # LoRA starts that change the base, and their adapters converted back
    ("chattune.model", "chattune.methods", "chattune.config_io"),
    ("chattune.vision",),  # a vision-language model's processor: image tokens and pixels
    ("chattune.vocab",),  # new tokens: learned into a tokenizer, given embedding rows
    ("chattune.templates",),
    ("chattune.data",),  # sources, encode, prepare: records through a template into tokens
    ("chattune.vocab.command",),  # chattune tokenizer extend: corpus files in, tokenizer and report out
    ("chattune.manifest",),
    ("chattune.inference",),
    ("chattune.training",),
    ("chattune.evaluation",),
    ("chattune.training.recipe",),  # the train pipeline: trains, then evaluates the run
    ("chattune.export",),
    ("chattune.kb",),
    ("chattune.serve",),
    ("chattune.workbench",),  # the page as a workbench: forms, jobs in processes, a model loaded on demand
    ("chattune.cli", "chattune.__main__", "chattune.demo", "chattune.demo_real", "chattune.chat", "chattune.predict",
     "chattune.tiny", "chattune.tiny_vlm"),
]
"""Low to high. A name covers its package's modules unless a longer name says otherwise."""


@dataclass(frozen=True)
class Edge:
    """``source`` imports ``target`` at ``path:line``; ``lazy``: inside a function."""

    source: str
    target: str
    path: Path
    line: int
    lazy: bool

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT).as_posix()}:{self.line}"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """(node, lazy) for every import statement, skipping ``if TYPE_CHECKING:`` blocks."""

    def walk(node, lazy):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for other in child.orelse:
                    yield from walk(other, lazy)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, lazy
            inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from walk(child, inner)

    yield from walk(tree, False)


def import_edges(package: Path = PACKAGE) -> list[Edge]:
    """Every import of one chattune module by another (see the module docstring)."""
    known = modules(package)
    top = package.name
    edges = []
    for name, path in known.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node, lazy in _imports(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join(parts + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.append(full if full in known else base)
            for target in dict.fromkeys(targets):
                while target and target not in known:  # import a.b.c of a non-module: its package
                    target = target.rpartition(".")[0]
                if target and target.split(".")[0] == top and target != name:
                    edges.append(Edge(name, target, path, node.lineno, lazy))
    return list(dict.fromkeys(edges))


def graph(edges: list[Edge], lazy: bool = True) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for e in edges:
        if lazy or not e.lazy:
            out.setdefault(e.source, set()).add(e.target)
    return out


def cycles(edges: list[Edge], lazy: bool = True) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), sorted."""
    adjacent = graph(edges, lazy)
    nodes = sorted(set(adjacent) | {t for ts in adjacent.values() for t in ts})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # recursive: the graph has well under 1000 nodes
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(adjacent.get(v, ())):
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

    for v in nodes:
        if v not in index:
            visit(v)
    return sorted(found)


def layer_of(module: str, layers: list[tuple[str, ...]] = LAYERS) -> int:
    """The layer of the longest declared name that is ``module`` or a package above it."""
    best, best_len = None, -1
    for level, names in enumerate(layers):
        for declared in names:
            if (module == declared or module.startswith(declared + ".")) and len(declared) > best_len:
                best, best_len = level, len(declared)
    if best is None:
        raise KeyError(f"{module}: in no layer of LAYERS")
    return best


def upward(edges: list[Edge], layers: list[tuple[str, ...]] = LAYERS) -> list[Edge]:
    """The edges from a lower layer to a higher one."""
    return [e for e in edges if layer_of(e.target, layers) > layer_of(e.source, layers)]


def largest_files(package: Path = PACKAGE, count: int = 10) -> list[tuple[int, str]]:
    sizes = [(len(p.read_text(encoding="utf-8").splitlines()), p.relative_to(ROOT).as_posix())
             for p in package.rglob("*.py")]
    return sorted(sizes, key=lambda s: (-s[0], s[1]))[:count]


def import_time_ms(module: str = "chattune.cli", runs: int = 3) -> float:
    """Best of ``runs`` of ``python -X importtime -c 'import MODULE'``: MODULE's cumulative time."""
    best = float("inf")
    pattern = re.compile(r"import time:\s+\d+ \|\s+(\d+) \|\s+" + re.escape(module) + r"\s*$")
    for _ in range(runs):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                              capture_output=True, text=True, check=True)
        times = [int(m.group(1)) for line in proc.stderr.splitlines() if (m := pattern.search(line))]
        best = min(best, times[-1] / 1000)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="import time: best of this many runs")
    args = parser.parse_args(argv)
    known = modules()
    edges = import_edges()
    top_level = [m for m, p in known.items() if m.count(".") == 1 and p.name != "__init__.py"]
    packages = [m for m, p in known.items() if m.count(".") == 1 and p.name == "__init__.py"]
    print(f"modules at the top level of src/chattune  {len(top_level)} (and {len(packages)} packages)")
    print(f"modules in total                          {len(known)}")
    print(f"import edges (module-level + lazy)        {sum(not e.lazy for e in edges)} + "
          f"{sum(e.lazy for e in edges)}")
    print("\nlargest files (lines):")
    for lines, path in largest_files():
        print(f"  {lines:5d}  {path}")
    for title, lazy in (("import cycles, module-level imports", False), ("import cycles, lazy imports too", True)):
        found = cycles(edges, lazy)
        print(f"\n{title}: {len(found)}")
        for component in found:
            print("  " + " <-> ".join(component))
    up = upward(edges)
    print(f"\nupward imports (against LAYERS): {len(up)}")
    for e in sorted(up, key=lambda e: (e.source, e.target, e.line)):
        print(f"  {e.source} -> {e.target}{'  (lazy)' if e.lazy else ''}  {e.where()}")
    print(f"\nchattune.cli start-up import time: {import_time_ms(runs=args.runs):.1f} ms "
          f"(python -X importtime, best of {args.runs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
