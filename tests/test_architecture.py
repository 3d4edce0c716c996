"""The package's shape: no import cycles, no module reaching into another's private names,
no environment changed by importing probekit."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "probekit"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import, function-level ones too;
    imports under `if TYPE_CHECKING:` are annotations, not imports, and are left out."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            out.append((base, [a.name for a in node.names]))
    return out


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for mod, path in modules.items():
        for target, names in _imports(path):
            if not target.startswith("probekit"):
                continue
            objects = []  # `from probekit.x import y` may import the submodule x.y
            for name in names:
                if f"{target}.{name}" in modules:
                    edges[mod].add(f"{target}.{name}")
                else:
                    objects.append(name)
                if name.startswith("_") and not name.startswith("__") and target != mod:
                    private.append(f"{mod} imports {target}.{name}")
            if target in modules and target != mod and (objects or not names):
                edges[mod].add(target)
    return edges, private


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_walker_sees_imports():
    edges, _ = _graph()
    assert "probekit.metrics" in edges["probekit.engine"]
    assert "probekit.metrics.base" in edges["probekit.metrics.similarity"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_in_the_package():
    edges, _ = _graph()
    cycle = _cycle(edges)
    assert cycle is None, " -> ".join(cycle)


def test_no_module_imports_another_modules_private_names():
    _, private = _graph()
    assert not private, "\n".join(private)


def test_importing_probekit_changes_no_environment_variable():
    # the libraries probekit builds on set a few variables of their own when imported
    code = (
        "import json, os, pkgutil, importlib, sys\n"
        "import torch, transformers, transformer_lens, xarray, zarr, altair, sklearn, tqdm\n"
        "transformers.GPT2LMHeadModel  # its lazy import sets TORCHINDUCTOR_CACHE_DIR\n"
        "before = dict(os.environ)\n"
        "import probekit\n"
        "for m in pkgutil.walk_packages(probekit.__path__, 'probekit.'):\n"
        "    importlib.import_module(m.name)\n"
        "after = dict(os.environ)\n"
        "print(json.dumps(sorted(k for k in set(before) | set(after)"
        " if before.get(k) != after.get(k))))\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("HF_")}
    env.pop("TRANSFORMERS_OFFLINE", None)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
