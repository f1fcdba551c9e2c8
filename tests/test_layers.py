"""The layers import one way (docs/architecture.md), read from the sources' import statements
(lazy imports inside functions count too): no module imports a higher layer, `cloud` and `device`
never import each other, and no package has an import circle."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first; a module may import its own layer and those below it. frames is shared by both
# sides of the split and imports nothing of costeer.
LAYERS = {"errors": 0, "steering": 0, "frames": 0, "engine": 1, "api": 2, "chat": 2, "hf": 2, "cloud": 3, "device": 3,
          "gateway": 4, "playground": 4, "eval": 5, "cli": 6}  # fmt: skip
APART = ({"cloud", "device"}, {"frames", "steering"})  # same layer, never each other


def _modules() -> dict[str, Path]:
    out = {}
    for p in (SRC / "costeer").rglob("*.py"):
        parts = p.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(name: str, path: Path, known) -> set[str]:
    """costeer modules that `name` imports (`from pkg import mod` counts as pkg.mod)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    deps = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name.startswith("costeer")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            if base.startswith("costeer"):
                deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return deps - {name}


def _runtime_nodes(tree: ast.AST):
    """Every node but those under `if TYPE_CHECKING:` (annotations only: no import at run time)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


GRAPH = {n: _imports(n, p, set(_modules())) for n, p in _modules().items()}


def _top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _top(m) in LAYERS))
def test_no_module_imports_a_higher_layer(module):
    mine = _top(module)
    for dep in GRAPH[module]:
        theirs = _top(dep)
        if theirs is None or theirs == mine or theirs not in LAYERS:
            continue
        assert LAYERS[theirs] <= LAYERS[mine], f"{module} imports {dep}: {theirs} is above {mine}"
        assert {mine, theirs} not in APART, f"{module} imports {dep}: {mine} and {theirs} stay apart"


def test_no_import_circle_inside_a_package():
    """Within each package (device, engine, cloud, eval…), imports between its modules form no cycle
    (the package's __init__, which gathers its names, aside)."""
    inner = {n: {d for d in deps if d.rpartition(".")[0] == n.rpartition(".")[0]} for n, deps in GRAPH.items()}
    inner = {n: deps - {n.rpartition(".")[0]} for n, deps in inner.items() if n.count(".") >= 2}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(n, path):
        state[n] = 1
        for d in inner.get(n, ()):
            assert state.get(d) != 1, "import circle: " + " -> ".join([*path, n, d])
            if d not in state:
                visit(d, [*path, n])
        state[n] = 2

    for n in inner:
        if n not in state:
            visit(n, [])


def test_the_check_sees_the_device_split():
    """The graph is read as intended: the device's modules import one way."""
    assert "costeer.device.tokenizers" in GRAPH["costeer.device.wire"]
    assert "costeer.device.client" not in GRAPH["costeer.device.wire"]
    assert "costeer.device.client" not in GRAPH["costeer.device.engines"]
