"""The architecture's rules, checked on the source with `ast` (no imports, milliseconds).

Rooms (see README "Code map"): ``models/`` is the network and knows nothing of
data, analysis, the zoo or runs; ``data/`` knows nothing of models;
``analysis/`` measures models on data; ``zoo/`` stores models and never resolves
user references (``loading.py`` does, and nothing imports it back). The library
never imports the command line, and the command line's modules import nothing
heavy at start-up so ``iterconv --help`` stays instant.
"""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / "iterconv_keras"
CLI = REPO / "cli"

# Room -> module prefixes it must never import (at any depth: a deferred import
# inside a function still couples the rooms and can hide a cycle).
FORBIDDEN = {
    "models": ("iterconv_keras.data", "iterconv_keras.analysis", "iterconv_keras.zoo", "iterconv_keras.training",
               "iterconv_keras.loading", "iterconv_keras.runs", "iterconv_cli"),
    "data": ("iterconv_keras.models", "iterconv_keras.analysis", "iterconv_keras.zoo", "iterconv_keras.training",
             "iterconv_keras.loading", "iterconv_keras.runs", "iterconv_cli"),
    "analysis": ("iterconv_keras.zoo", "iterconv_keras.training", "iterconv_keras.loading", "iterconv_cli"),
    "zoo": ("iterconv_keras.loading", "iterconv_keras.training", "iterconv_keras.analysis", "iterconv_cli"),
    "": ("iterconv_cli",),  # the top-level modules
}
HEAVY = ("tensorflow", "keras", "numpy", "matplotlib", "PIL", "tensorflow_datasets")


def _imports(path, module_level_only=False):
    """Absolute names imported by a file (``from a import b`` yields ``a.b`` and ``a``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if module_level_only else ast.walk(tree)
    names = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def _room(path):
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else ""


def _violations(files, rule):
    found = []
    for path in files:
        found += [f"{path.relative_to(REPO)} imports {name}" for name in rule(path) if name]
    return found


def _hits(names, prefixes):
    return [n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)]


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_rooms_import_only_what_they_may(room):
    files = [p for p in PACKAGE.rglob("*.py") if _room(p) == room]
    assert files, f"room {room!r} has no modules"
    assert not _violations(files, lambda p: _hits(_imports(p), FORBIDDEN[room]))


# The modules the command line reads its option tables from at start-up (dataset
# names, variants, optimizers ...): standard library only, checked below.
TABLE_MODULES = ("iterconv_keras.config", "iterconv_keras.data.sources", "iterconv_keras.models.variants")


def test_command_modules_import_nothing_heavy_at_start_up():
    heavy = HEAVY + ("iterconv_keras.models", "iterconv_keras.data", "iterconv_keras.analysis",
                     "iterconv_keras.zoo", "iterconv_keras.training", "iterconv_keras.loading")

    def rule(path):
        names = [n for n in _imports(path, module_level_only=True) if not _hits([n], TABLE_MODULES)]
        return _hits(names, heavy)

    assert not _violations(sorted(CLI.glob("*.py")), rule)


@pytest.mark.parametrize("module", ["__init__.py", "_env.py", "_registration.py", "version.py", "errors.py",
                                    "fsutil.py"])
def test_front_door_modules_import_nothing_heavy_at_import(module):
    assert not _hits(_imports(PACKAGE / module, module_level_only=True), HEAVY + ("iterconv_keras.models",))


def test_every_subpackage_is_installed():
    # A plain `pip install .` ships only the packages pyproject lists.
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in PACKAGE.rglob("__init__.py")}
    assert on_disk <= listed


def _files_run_by_importing(module):
    """``iterconv_keras.a.b`` -> ``a/__init__.py``, ``a/b.py``: what Python runs to import it."""
    parts = module.split(".")[1:]
    return [f"{'/'.join(parts[:i])}/__init__.py" for i in range(1, len(parts))] + [f"{'/'.join(parts)}.py"]


# The table modules (and their packages' __init__): --help and `data info` must stay instant.
STDLIB_ONLY = sorted({f for module in TABLE_MODULES for f in _files_run_by_importing(module)})


@pytest.mark.parametrize("module", STDLIB_ONLY)
def test_table_modules_import_only_the_standard_library_at_import(module):
    import sys

    names = _imports(PACKAGE / module, module_level_only=True)
    # The package itself is light (test_front_door_modules_import_nothing_heavy_at_import).
    third_party = [n for n in names if n.split(".")[0] not in sys.stdlib_module_names and n != "iterconv_keras"
                   and not n.startswith(("iterconv_keras.errors", "iterconv_keras.fsutil"))]
    assert not third_party, third_party


def test_index_formulas_import_no_tensorflow():
    # experiments/report.py computes summaries of stored results with them: no TensorFlow start-up.
    for module in _files_run_by_importing("iterconv_keras.analysis.formulas"):
        names = _imports(PACKAGE / module, module_level_only=True)
        assert not _hits(names, ("tensorflow", "keras", "matplotlib", "iterconv_keras.models")), (module, names)


def _top_level_names(path, imported):
    """Names a module binds at its top level: its own definitions, or (``imported``) the names it imports."""
    names = set()
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if imported and isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {alias.asname or alias.name.split(".")[0] for alias in node.names}
        elif not imported and isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif not imported and isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return {n for n in names if not n.startswith("__")}


def test_training_gives_no_second_name_to_what_compiling_runs_and_config_define():
    # training.py was split into compiling.py (the compiled model), runs.py (the run
    # directory) and config.py (TrainConfig): each of their names has one home, so a
    # caller reads `compiling.make_loss`, never `training.make_loss`.
    owned = set().union(*(_top_level_names(PACKAGE / f"{module}.py", imported=False)
                          for module in ("compiling", "runs", "config")))
    assert not _top_level_names(PACKAGE / "training.py", imported=True) & owned
