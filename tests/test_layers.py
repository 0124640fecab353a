"""Imports run one way: a module imports only from its own layer or lower ones, and no saejax
modules import each other round a cycle. Imports inside functions count too: a lazy import is
still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import saejax

# Lowest first. A module's layer is that of the longest entry its dotted name starts with.
LAYERS = [
    ["saejax.errors", "saejax.paths", "saejax.objstore", "saejax.atomic", "saejax.files",  # 0
     "saejax.hashmix", "saejax.typedconfig", "saejax.axes"],
    ["saejax.sae", "saejax.text"],                                        # 1 sae, text
    ["saejax.config", "saejax.sharding", "saejax.checkpoint", "saejax.sweep",
     "saejax.cluster"],                                                   # 2 config
    ["saejax.lm"],                                                        # 3 lm
    ["saejax.data"],                                                      # 4 data
    ["saejax.train"],                                                     # 5 train
    ["saejax.runs", "saejax.export", "saejax.eval"],                      # 6 runs
    ["saejax.analysis"],                                                  # 7 analysis
    ["saejax.browse", "saejax.cli"],                                      # 8 app
]

ROOT = Path(saejax.__file__).parent


def layer_of(module: str) -> int | None:
    """The layer of a dotted module name; None when no entry of LAYERS covers it."""
    hits = [(len(p), i) for i, layer in enumerate(LAYERS) for p in layer
            if module == p or module.startswith(p + ".")]
    return max(hits)[1] if hits else None


def modules() -> dict[str, Path]:
    """{dotted name: file} of every module of the package (a package is its __init__.py)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def saejax_imports(name: str, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, module) for every import of a saejax module in module `name`, at any depth.
    `from a import b` imports a.b when that is a module, else a."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing package
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        else:
            continue
        found += [(node.lineno, t) for t in dict.fromkeys(targets) if t.startswith("saejax.")]
    return found


def import_graph() -> dict[str, list[tuple[int, str]]]:
    """{module: [(line, imported saejax module), ...]} over every module of the package."""
    files = modules()
    return {m: saejax_imports(m, p, set(files)) for m, p in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Cycles [a, b, ..., a] of the directed graph: one per edge that closes a loop in a
    depth-first search (no cycles found means there are none)."""
    done: set[str] = set()
    path: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        path.append(v)
        for w in sorted(graph.get(v, ())):
            if w in path:
                cycles.append(path[path.index(w):] + [w])
            elif w not in done:
                visit(w)
        path.pop()
        done.add(v)

    for v in sorted(graph):
        if v not in done:
            visit(v)
    return cycles


def _where(mod: str, line: int) -> str:
    return f"{modules()[mod].relative_to(ROOT.parent)}:{line}"


def test_every_module_has_a_layer():
    missing = [m for m in modules() if m != "saejax" and layer_of(m) is None]
    assert not missing, f"add these modules to LAYERS in {__file__}: {missing}"


def test_every_import_names_a_module():
    # A module moved or deleted leaves lazy imports behind that fail only when they run.
    known = modules()
    bad = [f"{_where(mod, line)}: {target}" for mod, imports in import_graph().items()
           for line, target in imports if target not in known]
    assert not bad, "imports of saejax modules that do not exist:\n" + "\n".join(bad)


def test_no_import_runs_uphill():
    bad = []
    for mod, imports in import_graph().items():
        for line, target in imports:
            low, high = layer_of(mod), layer_of(target)
            if low is not None and high is not None and high > low:
                bad.append(f"{_where(mod, line)}: {mod} (layer {low}) imports {target} "
                           f"(layer {high})")
    assert not bad, "imports from a higher layer:\n" + "\n".join(bad)


def test_no_import_cycle():
    # A submodule importing its own package (`from saejax.lm import x` inside saejax.lm.y) is
    # no cycle: Python has imported the package first anyway.
    graph = {m: {t for _, t in imports if t != m and not m.startswith(t + ".")}
             for m, imports in import_graph().items()}
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_itself():
    assert layer_of("saejax.sae.stats") == 1 and layer_of("saejax.lm.stream") == 3
    assert layer_of("saejax.runs") == 6 and layer_of("saejax.cli") == 8
    assert layer_of("saejax.nowhere") is None
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
