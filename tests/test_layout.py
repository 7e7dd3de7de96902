"""The package's rooms stay easy to find: each module says what it owns, the pure core imports nothing of TRL or the
trainer, no module imports in a cycle, and no function grows past what a reader takes in at once."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "trl_treepo"
MODULES = sorted(PACKAGE.rglob("*.py"))

# The sampler, the advantage estimators and packing read well next to the paper and are driven by tests with a
# scripted engine: they know nothing of TRL, accelerate, torch.distributed or the trainer. The sampler does not even
# know torch.
PURE_CORE = {
    "sampling.py": ("trl", "accelerate", "torch", "transformers", "vllm"),
    "tree.py": ("trl", "accelerate", "torch", "transformers", "vllm"),
    "scheduling.py": ("trl", "accelerate", "torch", "transformers", "vllm"),
    "advantages.py": ("trl", "accelerate", "torch.distributed", "transformers", "vllm"),
    "packing.py": ("trl", "accelerate", "torch.distributed", "vllm"),
}
PACKAGE_ROOMS = ("trl_treepo.trainer", "trl_treepo.config", "trl_treepo.backends", "trl_treepo.benchmark",
                 "trl_treepo.learning", "trl_treepo.testing", "trl_treepo.tools")  # fmt: skip
LONGEST_FUNCTION = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Absolute names of the modules `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    nodes = tree.body if top_level_only else ast.walk(tree)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_opens_with_a_docstring_that_names_what_it_owns(path):
    docstring = ast.get_docstring(ast.parse(path.read_text()))
    assert docstring and len(docstring) > 40, f"{path.relative_to(PACKAGE)} has no docstring saying what it owns"


@pytest.mark.parametrize("name", sorted(PURE_CORE))
def test_the_pure_core_imports_nothing_of_trl_or_the_trainer(name):
    imported = imports(PACKAGE / name)
    for forbidden in PURE_CORE[name]:
        found = sorted(i for i in imported if i == forbidden or i.startswith(forbidden + "."))
        assert not found, f"{name} imports {found}"
    rooms = sorted(i for i in imported if i.startswith(PACKAGE_ROOMS))
    assert not rooms, f"{name} imports {rooms}: the core must not depend on the trainer's side"


def test_no_module_imports_in_a_cycle():
    """Module-level imports between the package's modules form no cycle (an import a function makes when it runs is
    not a cycle at import time)."""
    names = {module_name(path): path for path in MODULES}

    def internal(path):
        found = set()
        for imported in imports(path, top_level_only=True):
            while imported and imported not in names:
                imported = imported.rpartition(".")[0]
            if imported and imported != module_name(path):
                found.add(imported)
        return found

    graph = {name: internal(path) for name, path in names.items()}
    visiting, done = [], set()

    def visit(name):
        if name in done:
            return
        assert name not in visiting, f"import cycle: {' -> '.join(visiting[visiting.index(name):] + [name])}"
        visiting.append(name)
        for other in graph[name]:
            if not (name.startswith(other + ".") or other == name.rpartition(".")[0]):  # a package's own __init__
                visit(other)
        visiting.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_no_function_is_longer_than_a_reader_takes_in_at_once():
    long = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > LONGEST_FUNCTION:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, f"functions over {LONGEST_FUNCTION} lines: {long}"


def test_the_trainer_class_keeps_only_grpo_trainers_overrides():
    """TreePOTrainer's methods are GRPOTrainer's, extended; the work lives in the rooms of `trl_treepo.trainer`."""
    from trl import GRPOTrainer

    from trl_treepo import TreePOTrainer

    own = {name for name, value in vars(TreePOTrainer).items() if callable(value) and not name.startswith("__")}
    extra = own - set(dir(GRPOTrainer))
    assert not extra, f"TreePOTrainer methods that GRPOTrainer does not have: {extra}"
