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
    "fft.paths": 0,
    "fft.models": 1,
    "fft.data": 1,
    "fft.train": 2,
    "fft.checkpoint": 2,
    "fft.generate": 2,
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
    "fft": 0,  # the package __init__ (its lazy API import happens at call time)
}


def layer_of(module: str) -> int | None:
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
