"""The package's import structure: every module imports only from layers below it, and nothing cycles.

Walks the AST of every module (function-level imports included) and resolves each ``nthr_kernels``
import to a module of the package.
"""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "nthr_kernels"

# Layer of each module, by dotted-name prefix (the longest matching prefix wins). Within a layer a module
# may import another of the same layer only inside ops/ (an op's implementation may use another op's
# building block); the cycle check below still applies there.
LAYERS = {
    "core.rules": 0,
    "core.checks": 1,
    "core.plan": 2,
    "core": 2,
    "ops": 3,
    "registry": 4,
    "library": 5,
    "api": 6,
    "": 6.5,  # the package's __init__: re-exports the public functions
    "synthetic": 7,
    "testing": 7,
    "demo_synthetic": 7,
    "grpo": 7,
    "integrations": 7,
    "__main__": 8,
}
SAME_LAYER_OK = {3, 7}
TOP_ONLY = ("grpo", "integrations", "demo_synthetic", "__main__")


def _modules():
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_pkg)
    return out


MODULES = _modules()


def layer(name: str) -> int:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".") or p == ""), key=len)
    return LAYERS[best]


def _resolve(target: str) -> str:
    """The package module a dotted import names (a ``from X import name`` may name a submodule)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target


def imports_of(name: str) -> set:
    path, is_pkg = MODULES[name]
    here = name.split(".") if name else []
    base = here if is_pkg else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "nthr_kernels" or a.name.startswith("nthr_kernels."):
                    found.add(_resolve(a.name[len("nthr_kernels") + 1:]))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            elif node.module and (node.module == "nthr_kernels" or node.module.startswith("nthr_kernels.")):
                mod = node.module[len("nthr_kernels") + 1:]
            else:
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}" if mod else a.name
                found.add(_resolve(sub if sub in MODULES else mod))
    found.discard(name)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


@pytest.mark.parametrize("module", sorted(MODULES), ids=lambda m: m or "__init__")
def test_imports_point_down(module):
    mine = layer(module)
    for dep in sorted(GRAPH[module]):
        theirs = layer(dep)
        ok = theirs < mine or (theirs == mine and mine in SAME_LAYER_OK)
        assert ok, f"{module or '__init__'} (layer {mine}) imports {dep or '__init__'} (layer {theirs})"
        if mine < LAYERS["grpo"]:
            assert not dep.startswith(TOP_ONLY), f"{module} imports {dep}"


def test_no_cycles():
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in GRAPH[m]:
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(x or "__init__" for x in cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def test_walk_sees_function_level_imports():
    """The walk must not miss a lazy import (the registry's are dynamic strings, checked separately)."""
    assert "ops.advantages.distributed" in GRAPH["api"]
    assert "ops.native_lib" in GRAPH["registry"]


def test_registry_names_existing_modules():
    from nthr_kernels.registry import IMPLEMENTATIONS

    for op, table in IMPLEMENTATIONS.items():
        for backend, mod in table.items():
            assert f"ops.{mod}" in MODULES, (op, backend, mod)
