"""The import-layer contract of compress/, serve/ and bench/, checked over the AST, and
their size limit (no module over 350 lines).

Every import counts: module level, lazy ones inside functions and ``TYPE_CHECKING`` ones,
because each of them is a dependency a reader must follow and a place a cycle can hide.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("compress", "serve", "bench")

# Each layer may import itself and the layers listed before it, never one after it. A
# module belongs to the layer of its longest matching prefix (``serve`` alone: a module
# left at the top of serve/ is part of the contract compress and serve share).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("contract", ("serve", "compress.errors")),  # artifact + manifest, errors
    ("runtime", ("serve.runtime",)),  # protocol, loader, one module per format, step LMs
    ("engine", ("serve.engine",)),  # scheduler, sequences, completion, micro-batcher
    ("api", ("serve.api",)),  # request models, body reading, routes, OpenAPI
    ("app", ("serve.app",)),  # BentoML service, ASGI front, launcher
    ("compress", ("compress",)),  # recipe, stages, pipeline, evaluation
    ("bench", ("bench",)),  # benchmarks (drive serve and compress)
    ("cli", ("compress.cli", "compress.commands", "compress.demo.run")),  # entry points
)


def module_names() -> dict[str, Path]:
    """Every module of the checked packages, by dotted name."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` (a module or a name inside one) refers to."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``module`` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                drop = node.level - 1 if is_package else node.level
                anchor = anchor[: len(anchor) - drop]
                base = ".".join([*anchor, base] if base else anchor)
            # "from pkg import mod" imports pkg.mod when it is a module, else a name of pkg.
            targets = [f"{base}.{alias.name}" for alias in node.names] or [base]
        else:
            continue
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved and resolved != module:
                found.add(resolved)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports."""
    modules = module_names()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
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
    return found


def layer_of(module: str) -> int:
    """The position in ``LAYERS`` of the layer ``module`` belongs to."""
    best = (-1, -1)
    for position, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best[0]:
                best = (len(prefix), position)
    assert best[1] >= 0, f"{module} belongs to no layer; add it to LAYERS"
    return best[1]


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    for component in found:
        print("import cycle:", " ↔ ".join(component))
    assert not found, f"{len(found)} import cycle(s): {found}"


def test_each_layer_imports_only_layers_before_it() -> None:
    wrong = []
    for module, targets in sorted(import_graph().items()):
        own = layer_of(module)
        for target in sorted(targets):
            if layer_of(target) > own:
                wrong.append(
                    f"{module} ({LAYERS[own][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
                )
    for line in wrong:
        print(line)
    assert not wrong, f"{len(wrong)} import(s) against the layer order"


MAX_LINES = 350  # a module past this is split along a seam a reader can see


def test_no_module_is_over_the_line_limit() -> None:
    long = {name: n for name, path in module_names().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them): {long}"


def test_every_runtime_the_loader_names_is_a_class_of_the_runtime_layer() -> None:
    # The loader imports its runtimes by name, so the AST walk above does not see them.
    from serve.runtime.loader import RUNTIMES

    modules = module_names()
    for fmt, target in RUNTIMES.items():
        module, _, name = target.partition(":")
        assert module in modules and LAYERS[layer_of(module)][0] == "runtime", (fmt, target)
        tree = ast.parse(modules[module].read_text())
        assert any(isinstance(node, ast.ClassDef) and node.name == name
                   for node in tree.body), (fmt, target)
