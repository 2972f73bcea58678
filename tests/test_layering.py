"""The layering of DESIGN.md stays true: a module imports only from layers below (or its own).

Checked with `ast` over every module under fft/.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "fft"

# Module (or package prefix) -> layer. Longest prefix wins.
LAYERS = {
    "fft.config_lib": 0,
    "fft.sharding": 0,
    "fft.metrics": 0,
    "fft.tokenizers": 0,
    "fft.kernels": 0,
    "fft.distributed": 0,
    "fft.paths": 0,
    "fft.models": 1,
    "fft.data": 1,
    "fft.train": 2,
    "fft.checkpoint": 2,
    "fft.sampling": 2,
    "fft.eval": 2,
    "fft.interop": 2,
    "fft.pretrained": 2,
    "fft.rl": 3,
    "fft.methods": 4,
    "fft.zoo": 5,
    "fft.api": 5,
    "fft.main": 6,
    "fft.export": 6,
    "fft.bench": 6,
    "fft.label": 6,
    "fft.report": 6,
    "fft.launch": 6,
    "fft.compile": 6,
}
# The package __init__ (its lazy API import happens at call time): only the module `fft`
# itself, so that a module missing from LAYERS fails the test instead of falling into L0.
PACKAGE = "fft"


def layer_of(module: str) -> int | None:
    if module == PACKAGE:
        return 0
    best = None
    for prefix, layer in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    return None if best is None else best[1]


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(tree: ast.AST, module: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".")[: -node.level] if node.level else []
                base = ".".join(pkg + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield full if layer_of(full) is not None and full.startswith("fft.") else base


def test_imports_follow_layers():
    bad = []
    for path in ROOT.rglob("*.py"):
        module = module_name(path)
        if module == "fft":
            continue
        mine = layer_of(module)
        assert mine is not None, f"{module} has no layer in tests/test_layering.py"
        tree = ast.parse(path.read_text())
        for imported in imported_modules(tree, module):
            if not imported.startswith("fft"):
                continue
            theirs = layer_of(imported)
            if theirs is None or imported == "fft":
                continue
            same_package = imported.split(".")[:2] == module.split(".")[:2]
            if theirs > mine or (theirs == mine and not same_package and mine in (1, 4)):
                bad.append(f"{module} (L{mine}) imports {imported} (L{theirs})")
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_methods_never_import_each_other():
    for path in (ROOT / "methods").glob("*.py"):
        tree = ast.parse(path.read_text())
        me = module_name(path)
        for imported in imported_modules(tree, me):
            if imported.startswith("fft.methods.") and imported != me:
                raise AssertionError(f"{me} imports {imported}")


def test_every_module_has_a_layer():
    missing = [module_name(p) for p in ROOT.rglob("*.py") if layer_of(module_name(p)) is None]
    assert not missing, f"modules with no layer in tests/test_layering.py LAYERS: {missing}"


def test_configs_import_only_config_lib():
    """Config files are data: they may import fft.config_lib (and ml_collections), no more."""
    bad = []
    for path in (ROOT.parent / "configs").glob("*.py"):
        for imported in imported_modules(ast.parse(path.read_text()), "configs." + path.stem):
            if imported.startswith("fft") and imported != "fft.config_lib":
                bad.append(f"{path.name} imports {imported}")
    assert not bad, bad


def test_methods_are_recipes_the_trainer_runs():
    """Methods describe runs; only the Trainer runs them and owns the workdir's files."""
    bad = []
    for path in (ROOT / "methods").glob("*.py"):
        text = path.read_text()
        me = module_name(path)
        for imported in imported_modules(ast.parse(text), me):
            if imported.split(".")[:3] in (
                ["fft", "train", "trainer"],
                ["fft", "train", "run_files"],
            ):
                bad.append(f"{me} imports {imported}")
        for name in ('"eval_before.json"', '"results.json"', "make_train_step"):
            if name in text:
                bad.append(f"{me} mentions {name}")
        if path.stem != "__init__" and "def recipe(" not in text:
            bad.append(f"{me} has no recipe()")
    # The step is assembled once: only the Trainer calls make_train_step.
    for path in ROOT.rglob("*.py"):
        if module_name(path) not in ("fft.train.trainer", "fft.train.step"):
            if "make_train_step(" in path.read_text():
                bad.append(f"{module_name(path)} calls make_train_step")
    assert not bad, bad
