"""The package's shape, as `jaxrlhf/__init__.py` states it: a one-way import arrow between its layers, no
import cycle between modules, no module named like a dependency, `import jaxrlhf.losses` light."""

import ast
import importlib.metadata
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "jaxrlhf"

# Bottom to top, as the map in jaxrlhf/__init__.py lists them; a module imports from lower rows only
# (and from its own subpackage).
LAYERS = [
    {"ops", "parallel", "validate", "xla_cpu"},
    {"data", "models"},
    {"text"},
    {"rollout"},
    {"losses"},
    {"train"},
    {"engine"},
    {"export"},
    {"stages"},
    {"happy", "arith"},
]
RANK = {name: i for i, row in enumerate(LAYERS) for name in row}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    """The jaxrlhf modules `path` imports (at any depth of its code), as dotted names."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out = set()
    tree = ast.parse(path.read_text())
    typing_only = {  # imports under `if TYPE_CHECKING:` never run
        id(n) for block in ast.walk(tree)
        if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING"
        for stmt in block.body for n in ast.walk(stmt)
    }  # fmt: skip
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if base.startswith("jaxrlhf"):
                for alias in node.names:  # `from jaxrlhf import losses` imports the subpackage
                    sub = f"{base}.{alias.name}"
                    out.add(sub if _exists(sub) else base)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("jaxrlhf"))
    return out


def _exists(dotted: str) -> bool:
    path = REPO.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_top_level_name_has_a_layer():
    tops = {name.split(".")[1] for name in MODULES if name != "jaxrlhf"}
    assert tops == set(RANK), (
        "a module was added or removed: place it in LAYERS and in jaxrlhf/__init__.py's map"
    )
    doc = (PACKAGE / "__init__.py").read_text()
    for name in tops:
        assert name in doc, f"jaxrlhf/__init__.py's map does not name {name}"


@pytest.mark.parametrize("module", [m for m in MODULES if m != "jaxrlhf"])
def test_imports_point_down_the_arrow(module):
    top = module.split(".")[1]
    for imported in _imports(MODULES[module]):
        if imported == "jaxrlhf":
            continue
        target = imported.split(".")[1]
        assert target == top or RANK[target] < RANK[top], (
            f"{module} imports {imported}: {target} is not below {top} in the package's layers"
        )


def test_no_import_cycle_between_modules():
    graph = {m: {i for i in _imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}
    # A package's __init__ importing its own modules is not a cycle through them.
    graph = {
        m: {i for i in deps if not (m.endswith(i) or i == m.rpartition(".")[0])} for m, deps in graph.items()
    }
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])


def test_no_module_shadows_a_dependency():
    dependency_names = set()
    for dist in importlib.metadata.distributions():
        top = dist.read_text("top_level.txt")
        names = top.split() if top else [dist.metadata["Name"].replace("-", "_").lower()]
        dependency_names.update(n.lower() for n in names)
    dependency_names -= {"jaxrlhf"}
    ours = {p.stem.lower() for p in PACKAGE.rglob("*.py") if p.stem != "__init__"}
    ours |= {p.name.lower() for p in PACKAGE.rglob("*") if p.is_dir() and (p / "__init__.py").exists()}
    assert not ours & dependency_names, (
        f"modules named like an installed package: {sorted(ours & dependency_names)}"
    )


def test_importing_the_losses_loads_no_model_or_engine():
    code = (
        "import sys, jaxrlhf.losses; "
        "print(sorted(m for m in sys.modules if m.startswith('jaxrlhf.') "
        "and not m.startswith('jaxrlhf.losses')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "['jaxrlhf.ops']", out.stdout
