"""ember's layers point one way (shared/DESIGN.md): every `import` in platform/ember, read with ast (imports
inside functions and under TYPE_CHECKING count too), goes from a layer to the same or a lower one, and no two
subpackages import each other, directly or round a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "platform" / "ember"

# Top to bottom. A unit is a subpackage or a top-level module of ember; "ember" is the package's own
# __init__ (its public API, beside the CLI).
LAYERS = [
    {"cli", "ember"},
    {"train", "serve", "evaluate", "cluster"},
    {"generation"},
    {"engines"},
    {"checkpoint", "data", "observe", "interop"},  # interop: Hugging Face names and configs (not in DESIGN.md yet)
    {"models"},
    {"spec", "world", "errors", "registry"},
]
LAYER_OF = {unit: depth for depth, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """ember.models.gpt -> models; ember -> ember."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "ember"


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(code: str, module: str, is_package: bool) -> list[tuple[str, int]]:
    """(ember module imported, line) for every import statement in `code`, wherever it sits."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from ember import world` names a unit; `from ember.models import GPT` names a module
            found += [(f"{base}.{alias.name}" if base == "ember" else base, node.lineno) for alias in node.names]
    return sorted({(name, line) for name, line in found if name == "ember" or name.startswith("ember.")})


def arrows() -> list[tuple[str, str, str]]:
    """(importing unit, imported unit, where) for every import between two different units."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = unit_of(module_name(path))
        for target_module, line in imported_modules(path.read_text(), module_name(path), path.name == "__init__.py"):
            target = unit_of(target_module)
            if target != source:
                found.append((source, target, f"{path.relative_to(PACKAGE.parent)}:{line} imports {target_module}"))
    return found


def cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one unit (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for source, target in edges:
        graph.setdefault(source, set()).add(target)
        graph.setdefault(target, set())
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_every_unit_of_the_package_has_a_layer() -> None:
    units = {unit_of(module_name(path)) for path in PACKAGE.rglob("*.py")}
    assert units - set(LAYER_OF) == set(), "add the new subpackage or module to LAYERS (and to DESIGN.md)"


def test_no_import_points_up_the_layers() -> None:
    upward = [where for source, target, where in arrows() if LAYER_OF.get(target, 0) < LAYER_OF.get(source, 0)]
    assert upward == [], "imports against DESIGN.md's order:\n" + "\n".join(upward)


def test_no_two_units_import_each_other_round_a_circle() -> None:
    found = arrows()
    circles = cycles({(source, target) for source, target, _ in found})
    where = [w for source, target, w in found for circle in circles if source in circle and target in circle]
    assert circles == [], f"import cycles {circles}:\n" + "\n".join(where)


@pytest.mark.parametrize(
    ("module", "code", "ok"),
    [
        ("ember.models.gpt", "from ember.engines import Engine", False),
        ("ember.generation.decode", "def build():\n    from ..train import loop", False),
        ("ember.train.loop", "import ember", False),
        ("ember.train.loop", "from ember import world", True),
        ("ember.serve.app", "from ember.generation.sampling import SamplingParams", True),
    ],
)
def test_the_check_sees_lazy_relative_and_bare_imports(module: str, code: str, ok: bool) -> None:
    targets = [unit_of(name) for name, _ in imported_modules(code, module, is_package=False)]
    assert targets, "the import was not seen"
    assert all(LAYER_OF[target] >= LAYER_OF[unit_of(module)] for target in targets) is ok


def deepspeed_importers(unit: str) -> set[str]:
    """Files of `unit` that import deepspeed (anywhere in the file)."""
    found = set()
    for path in (PACKAGE / unit).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] \
                if isinstance(node, ast.ImportFrom) else []
            if any(name.split(".")[0] == "deepspeed" for name in names):
                found.add(str(path.relative_to(PACKAGE)))
    return found


def test_deepspeed_is_touched_in_models_only_where_impl_deepspeed_builds_its_layer() -> None:
    assert deepspeed_importers("models") == {"models/layers/moe/deepspeed_layer.py"}


def test_checkpoint_knows_no_engine() -> None:
    assert deepspeed_importers("checkpoint") == set()


def test_train_serve_evaluate_and_cluster_import_none_of_each_other() -> None:
    """What two of them share (samplers, checkpoint readers) sits below them, in generation/ or checkpoint/."""
    siblings = LAYERS[1]
    across = [where for source, target, where in arrows() if source in siblings and target in siblings]
    assert across == [], "\n".join(across)
