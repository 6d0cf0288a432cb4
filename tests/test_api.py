"""The public API: every library module declares ``__all__``, and everything it exports exists
and is documented; the top-level names are the ones the README's API tour documents."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import revjax

# Command-line entry points and private helpers; everything else is library API.
NOT_LIBRARY = {"revjax.__main__", "revjax.bench", "revjax.compare", "revjax.demo"}
LIBRARY = sorted(
    name
    for name in ["revjax", *(m.name for m in pkgutil.walk_packages(revjax.__path__, "revjax."))]
    if name not in NOT_LIBRARY and not name.rpartition(".")[2].startswith("_")
)


@pytest.mark.parametrize("module_name", LIBRARY)
def test_module_declares_its_public_names(module_name):
    module = importlib.import_module(module_name)
    if module_name == "revjax.models":
        assert not hasattr(module, "__all__")  # a namespace for the model modules only
        return
    assert isinstance(module.__all__, list) and module.__all__
    assert len(set(module.__all__)) == len(module.__all__)
    for name in module.__all__:
        assert not name.startswith("_"), (module_name, name)
        value = getattr(module, name)  # AttributeError for a stale entry
        if inspect.isfunction(value) or inspect.isclass(value):
            assert inspect.getdoc(value), f"{module_name}.{name} has no docstring"
    assert inspect.getdoc(module), f"{module_name} has no module docstring"


@pytest.mark.parametrize("module_name", sorted(NOT_LIBRARY - {"revjax.__main__"}))
def test_command_line_functions_are_documented(module_name):
    module = importlib.import_module(module_name)
    for name, value in vars(module).items():
        if inspect.isfunction(value) and value.__module__ == module_name and name[0] != "_":
            assert inspect.getdoc(value), f"{module_name}.{name} has no docstring"


def test_every_exported_name_is_in_the_readme():
    """The top-level names and those of every library module (``__all__``): the README is the
    API's documentation, so nothing is exported without a word there."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    missing = [
        f"{module_name}.{name}"
        for module_name in LIBRARY
        if module_name != "revjax.models"
        for name in importlib.import_module(module_name).__all__
        if not re.search(rf"\b{re.escape(name)}\b", readme)
    ]
    assert not missing, missing


def test_activations_export_no_function_of_private_types():
    """``recover_input`` took the private ``_TwoBranch`` spec; ``derivative_error`` is the public
    way to measure the recovery."""
    assert "recover_input" not in revjax.activations.__all__
    assert not hasattr(revjax.activations, "recover_input")


# The dependency direction of DESIGN.md section 1, as found in the code: each module may
# import only modules of a lower or equal layer. Two refinements of DESIGN's arrow: the
# precision policy sits below scan (reversible_scan takes a policy), and the dependency-free
# utilities (_validate, _tree_metrics, data, timing, memory) sit at the bottom.
LAYERS = [
    {"_validate", "_tree_metrics", "data", "timing", "memory", "coupling", "closure"},
    {"precision"},
    {"scan"},
    {"layers", "activations"},
    {"moonwalk", "moonwalk.gradients", "moonwalk.layers"},
    {
        "nnx",
        "_nnx_block",
        "_nnx_branch",
        "nnx_state",
        "linen",
        "models",
        *(f"models.{m}" for m in ("mlp", "revnet", "transformer")),
    },
    {"models.lm_training", "diagnostics"},
    {"compare", "demo", "bench", "__main__", ""},  # "" is the package's __init__
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
FLAX_ALLOWED = {
    *("nnx", "_nnx_block", "_nnx_branch", "nnx_state", "linen"),
    *("compare", "demo", "bench", "__main__"),
}


def _module_imports(path: Path) -> set[str]:
    """Every ``revjax.X`` module and top-level package a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module == "revjax":  # from revjax import moonwalk
                found |= {f"revjax.{alias.name}" for alias in node.names}
    return found


def _own_name(path: Path) -> str:
    parts = path.relative_to(Path(revjax.__file__).parent).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def test_modules_import_only_downward_and_the_core_has_no_flax():
    root = Path(revjax.__file__).parent
    files = sorted(root.rglob("*.py"))
    names = {_own_name(path) for path in files}
    assert names <= set(RANK), sorted(names - set(RANK))  # a new module needs a layer
    upward, flax_users = [], []
    for path in files:
        name = _own_name(path)
        for imported in _module_imports(path):
            if imported.startswith("revjax."):
                target = imported.removeprefix("revjax.")
                if target in RANK and RANK[target] > RANK[name]:
                    upward.append(f"{name} imports {target}")
            elif imported.split(".")[0] == "flax" and name.split(".")[0] not in (
                FLAX_ALLOWED | {"models"}
            ):
                flax_users.append(name)
    assert not upward, upward
    assert not flax_users, flax_users


def test_import_revjax_does_not_load_flax_until_nnx_is_used():
    """The core is pure JAX: ``import revjax`` once loaded Flax through ``revjax.nnx``, which
    is now imported on first attribute access (and ``from revjax import nnx`` still works)."""
    code = (
        "import sys, revjax\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'flax'], 'flax loaded'\n"
        "assert revjax.nnx.Stack.__module__ == 'revjax.nnx' and 'flax' in sys.modules\n"
        "from revjax import nnx\n"
        "assert nnx is revjax.nnx\n"
        "try:\n"
        "    revjax.no_such_name\n"
        "except AttributeError as err:\n"
        "    assert \"no attribute 'no_such_name'\" in str(err)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
