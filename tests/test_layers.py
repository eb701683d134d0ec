"""The package's import graph follows its layers (docs/DEVELOPING.md, "Layers").

Every module of ``ppllava_jax/`` is parsed with ``ast`` (nothing is imported), every import is
resolved to a module of the package (relative imports and imports inside functions included),
and each arrow is checked against ``ALLOWED``: a module may import only the layers its own layer
lists. Also checked: no module imports a private name (``_x``) of another module, no module is
over ``MAX_LINES`` lines, ``configs/*.py`` import only ``ppllava_jax``, ``ml_collections`` and
``configs/common.py``, the layout module imports only NumPy and the standard library, and no
module changes an environment variable when it is imported. The self-tests at the end build a
small package with forbidden arrows and check that the checker names each.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ppllava_jax"
MAX_LINES = 450

# The layer of each module (first match of its dotted name inside the package: "" = the
# package's own __init__); the command lines on top may import anything.
LAYER_OF = {
    "": "root",
    "layout": "layout",
    "models": "models",
    "data": "data",
    "convert": "convert",
    "sharding": "sharding",
    "flops": "flops",
    "generate": "generate",
    "train": "train",
    "evaluate": "evaluate",
    "plan": "command line",
    "chat": "command line",
    "demo": "command line",
    "demo_engine": "command line",
    "demo_page": "command line",
    "launch": "command line",
    "command_line": "command line",
    "judge": "command line",
}
_BASE = {"root", "layout"}
_PLACEMENT = _BASE | {"models", "convert"}
ALLOWED: dict[str, set[str] | None] = {
    "root": set(),
    "layout": {"layout"},
    "models": _BASE | {"models"},
    "data": _BASE | {"data"},
    "convert": _BASE | {"models", "convert"},
    "sharding": _PLACEMENT | {"sharding"},
    "flops": _PLACEMENT | {"flops"},
    "generate": _PLACEMENT | {"sharding", "generate"},
    "train": _PLACEMENT | {"data", "sharding", "flops", "generate", "train"},
    "evaluate": _PLACEMENT | {"data", "sharding", "flops", "generate", "evaluate"},
    "command line": None,  # anything
}
EXTRA = {"train.run": {"evaluate"}}  # only train/run.py may import evaluate/ (end-of-run eval)
LAYOUT_THIRD_PARTY = {"numpy"}  # the layout module: NumPy and the standard library only
CONFIG_IMPORTS = ("ppllava_jax", "ml_collections", "__future__", "configs.common")


@dataclass(frozen=True)
class Import:
    file: Path  # the importing file
    line: int
    importer: str  # its dotted module name
    target: str  # the imported module, dotted ("" when outside the package)
    external: str  # the top-level name of a module outside the package ("" when inside)
    names: tuple[str, ...]  # names taken from the target (from-imports)


def module_names(package: Path) -> dict[str, Path]:
    """{dotted name: file} of every module under ``package`` (``pkg.sub`` for ``__init__``)."""
    out = {}
    for f in sorted(package.rglob("*.py")):
        parts = list(f.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def _resolve_from(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def parse(file: Path) -> ast.Module:
    """The syntax tree of ``file`` (an unparsable file fails the test, naming the line)."""
    try:
        return ast.parse(file.read_text(), str(file))
    except SyntaxError as e:
        raise AssertionError(f"{file}:{e.lineno}: does not parse: {e.msg}") from None


def imports_of(file: Path, importer: str, modules: dict[str, Path]) -> list[Import]:
    """Every import in ``file`` (at any depth), resolved to modules of the package."""
    top = importer.split(".")[0]
    is_package = file.name == "__init__.py"
    out = []
    for node in ast.walk(parse(file)):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append(_one(file, node.lineno, importer, a.name, (), top, modules))
        elif isinstance(node, ast.ImportFrom):
            src = _resolve_from(node, importer, is_package)
            for a in node.names:
                sub = f"{src}.{a.name}"
                if sub in modules:  # `from pkg import module`
                    out.append(_one(file, node.lineno, importer, sub, (), top, modules))
                else:
                    out.append(_one(file, node.lineno, importer, src, (a.name,), top, modules))
    return out


def _one(file, line, importer, name, names, top, modules) -> Import:
    if name.split(".")[0] != top:
        return Import(file, line, importer, "", name.split(".")[0], names)
    while name not in modules and "." in name:  # `import pkg.mod.attr`: the module part
        name = name.rsplit(".", 1)[0]
    return Import(file, line, importer, name, "", names)


def layer_of(module: str) -> str | None:
    inner = module.split(".", 1)[1] if "." in module else ""
    head = inner.split(".")[0]
    return LAYER_OF.get(head if inner else "")


def _rule(layer: str, allowed: set[str]) -> str:
    shown = sorted(allowed - {"root"}) or ["nothing of the package"]
    return f"{layer} may import only {', '.join(shown)}"


def _where(imp: Import) -> str:
    try:
        return f"{imp.file.relative_to(ROOT)}:{imp.line}"
    except ValueError:
        return f"{imp.file}:{imp.line}"


def layer_violations(package: Path) -> list[str]:
    """One line per forbidden arrow: file:line, what it imports, the rule it breaks."""
    modules = module_names(package)
    bad = []
    for mod, f in modules.items():
        layer = layer_of(mod)
        if layer is None:
            bad.append(f"{f}: module {mod} has no layer: add it to LAYER_OF (tests/test_layers.py)")
            continue
        inner = mod.split(".", 1)[1] if "." in mod else ""
        allowed = ALLOWED[layer]
        for imp in imports_of(f, mod, modules):
            if layer == "layout" and imp.external:
                ok = imp.external in LAYOUT_THIRD_PARTY or imp.external in sys.stdlib_module_names
                if not ok and imp.external != "__future__":
                    bad.append(f"{_where(imp)}: layout imports {imp.external}: NumPy, stdlib only")
            if not imp.target or allowed is None:
                continue
            to = layer_of(imp.target)
            extra = EXTRA.get(inner, set())
            if to is not None and to not in allowed | extra:
                bad.append(
                    f"{_where(imp)}: {mod} ({layer}) imports {imp.target} ({to}): "
                    f"{_rule(layer, allowed)}"
                    + ("" if layer != "train" else "; only train/run.py may import evaluate")
                )
    return bad


def _module_aliases(tree: ast.AST, importer: str, is_package: bool, modules) -> dict[str, str]:
    """{local name: package module} bound by the imports of a file."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname and a.name in modules:
                    aliases[a.asname] = a.name
                elif not a.asname and a.name.split(".")[0] in modules:
                    aliases[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            src = _resolve_from(node, importer, is_package)
            for a in node.names:
                if f"{src}.{a.name}" in modules:
                    aliases[a.asname or a.name] = f"{src}.{a.name}"
    return aliases


def _dotted(node: ast.AST) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_violations(package: Path) -> list[str]:
    """Imports of another module's private names (``from m import _x``, ``m._x``)."""
    modules = module_names(package)
    bad = []
    for mod, f in modules.items():
        for imp in imports_of(f, mod, modules):
            for n in imp.names:
                if imp.target and imp.target != mod and _private(n):
                    bad.append(f"{_where(imp)}: {mod} imports private {imp.target}.{n}")
        tree = parse(f)
        aliases = _module_aliases(tree, mod, f.name == "__init__.py", modules)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            chain = _dotted(node)
            if not chain or chain[0] not in aliases:
                continue
            owner = ".".join([aliases[chain[0]], *chain[1:-1]])
            if owner in modules and owner != mod:
                where = _where(Import(f, node.lineno, mod, owner, "", ()))
                bad.append(f"{where}: {mod} uses private {owner}.{node.attr}")
    return sorted(set(bad), key=_by_place)


def _by_place(line: str) -> tuple[str, int]:
    where = line.split(": ")[0]
    path, _, num = where.rpartition(":")
    return (path, int(num)) if num.isdigit() else (where, 0)


def size_violations(package: Path, limit: int = MAX_LINES) -> list[str]:
    out = []
    for f in module_names(package).values():
        n = len(f.read_text().splitlines())
        if n > limit:
            out.append(f"{f.relative_to(package.parent)}: {n} lines (limit {limit})")
    return out


def _sets_environment(node: ast.AST) -> bool:
    """``os.environ[...] = ...``, ``os.environ.setdefault/update/pop(...)``, ``os.putenv``."""
    for sub in ast.walk(node):
        if isinstance(sub, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = sub.targets if isinstance(sub, (ast.Assign, ast.Delete)) else [sub.target]
            for t in targets:
                if isinstance(t, ast.Subscript) and (_dotted(t.value) or [""])[-1] == "environ":
                    return True
        if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute):
            chain = _dotted(sub.func) or []
            if chain[-2:-1] == ["environ"] and chain[-1] in {"setdefault", "update", "pop"}:
                return True
            if chain[-1:] == ["putenv"]:
                return True
    return False


def import_time_env_violations(package: Path) -> list[str]:
    """Modules that change an environment variable when imported (at module level, or in a
    function the module calls at module level)."""
    bad = []
    for mod, f in module_names(package).items():
        tree = parse(f)
        funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        for stmt in tree.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(stmt, ast.If) and "__main__" in ast.unparse(stmt.test):
                continue  # run as a program, not on import
            called = [
                funcs[c.func.id]
                for c in ast.walk(stmt)
                if isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and c.func.id in funcs
            ]
            if _sets_environment(stmt) or any(_sets_environment(fn) for fn in called):
                bad.append(f"{f.relative_to(package.parent)}:{stmt.lineno}: {mod} sets the env")
    return bad


def config_violations(configs: Path) -> list[str]:
    """configs/*.py import only ppllava_jax, ml_collections and configs/common.py."""
    bad = []
    for f in sorted(configs.glob("*.py")):
        if f.stem == "__init__":
            continue
        for node in ast.walk(parse(f)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                src = node.module or ""
                if node.level:  # `from . import common`, `from .common import X`
                    src = "configs" + (f".{src}" if src else "")
                names = [src] if src != "configs" else [f"configs.{a.name}" for a in node.names]
            else:
                continue
            for n in names:
                if not any(n == p or n.startswith(p + ".") for p in CONFIG_IMPORTS):
                    bad.append(
                        f"{f.relative_to(configs.parent)}:{node.lineno}: imports {n}: configs "
                        "import only ppllava_jax, ml_collections and configs/common.py"
                    )
    return bad


def _report(lines: list[str]) -> str:
    return "\n" + "\n".join(lines)


def test_import_layers():
    bad = layer_violations(PACKAGE)
    assert not bad, _report(bad)


def test_no_private_names_of_other_modules():
    bad = private_violations(PACKAGE)
    assert not bad, _report(bad)


def test_modules_are_small():
    bad = size_violations(PACKAGE)
    assert not bad, _report(bad)


def test_importing_the_package_sets_no_environment_variable():
    bad = import_time_env_violations(PACKAGE)
    assert not bad, _report(bad)


def test_configs_import_only_the_package_and_common():
    bad = config_violations(ROOT / "configs")
    assert not bad, _report(bad)


# ----------------------------------------------------------------------- self-tests


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / "ppllava_jax"


def test_checker_flags_forbidden_arrows(tmp_path):
    pkg = _write(
        tmp_path,
        {
            "ppllava_jax/__init__.py": "",
            "ppllava_jax/layout.py": "import numpy as np\nimport jax\n",
            "ppllava_jax/models/__init__.py": "",
            "ppllava_jax/models/ok.py": "from ppllava_jax import layout\nfrom . import other\n",
            "ppllava_jax/models/other.py": "",
            "ppllava_jax/models/bad.py": (
                "import numpy\n\n\ndef f():\n    from ..data import pipe\n    return pipe\n"
            ),
            "ppllava_jax/data/__init__.py": "",
            "ppllava_jax/data/pipe.py": "import ppllava_jax.models.ok\n",
            "ppllava_jax/train/__init__.py": "",
            "ppllava_jax/train/run.py": "from ppllava_jax.evaluate import cli\n",
            "ppllava_jax/train/step.py": "from ppllava_jax.evaluate.cli import main\n",
            "ppllava_jax/evaluate/__init__.py": "",
            "ppllava_jax/evaluate/cli.py": "from ppllava_jax.train import step\n",
            "ppllava_jax/sharding.py": "from ppllava_jax import train\n",
            "ppllava_jax/plan.py": "from ppllava_jax.train import run\nfrom . import data\n",
            "ppllava_jax/stray.py": "",
        },
    )
    bad = layer_violations(pkg)
    text = "\n".join(bad)
    expect = [
        ("models/bad.py:5", "ppllava_jax.data.pipe (data)", "models may import only layout, model"),
        ("data/pipe.py:1", "ppllava_jax.models.ok (models)", "data may import only data, layout"),
        ("train/step.py:1", "evaluate.cli (evaluate)", "only train/run.py may import evaluate"),
        ("evaluate/cli.py:1", "ppllava_jax.train.step (train)", "evaluate may import only"),
        ("sharding.py:1", "ppllava_jax.train (train)", "sharding may import only"),
        ("layout.py:2", "layout imports jax", "NumPy, stdlib only"),
        ("stray.py", "has no layer", "LAYER_OF"),
    ]
    for where, what, rule in expect:
        assert any(where in b and what in b and rule in b for b in bad), (where, text)
    assert len(bad) == len(expect), text  # models/ok.py, train/run.py and plan.py are allowed


def test_checker_flags_private_names_and_sizes_and_env(tmp_path):
    pkg = _write(
        tmp_path,
        {
            "ppllava_jax/__init__.py": (
                "import os\n\n\ndef _guard():\n    os.environ.setdefault('X', '1')\n\n\n_guard()\n"
            ),
            "ppllava_jax/convert/__init__.py": "",
            "ppllava_jax/convert/io.py": "_secret = 1\n\n\ndef _helper():\n    pass\n",
            "ppllava_jax/cli.py": "import os\nif __name__ == '__main__':\n    os.putenv('A', '')\n",
            "ppllava_jax/sharding.py": (
                "from ppllava_jax.convert.io import _secret\n"
                "from ppllava_jax.convert import io as tio\n"
                "import ppllava_jax.convert.io\n\n\n"
                "def f():\n    tio._helper()\n    return ppllava_jax.convert.io._secret\n"
            ),
            "ppllava_jax/models/__init__.py": "",
            "ppllava_jax/models/big.py": "x = 1\n" * (MAX_LINES + 1),
            "ppllava_jax/models/self_ok.py": "from . import self_ok\n_a = 1\nb = self_ok._a\n",
            "configs/a.py": "import ml_collections\nfrom configs import b\nfrom . import common\n",
            "configs/common.py": "import os\n",
        },
    )
    bad = private_violations(pkg)
    assert len(bad) == 3, bad
    assert "sharding.py:1:" in bad[0] and "private ppllava_jax.convert.io._secret" in bad[0]
    assert any("sharding.py:7" in b and "io._helper" in b for b in bad), bad
    assert any("sharding.py:8" in b and "io._secret" in b for b in bad), bad
    sizes = size_violations(pkg)
    assert sizes == [f"ppllava_jax/models/big.py: {MAX_LINES + 1} lines (limit {MAX_LINES})"]
    env = import_time_env_violations(pkg)
    assert len(env) == 1 and "ppllava_jax/__init__.py:8" in env[0], env
    cfg = config_violations(tmp_path / "configs")
    assert [c.split(": ")[1] for c in cfg] == ["imports configs.b", "imports os"], cfg
