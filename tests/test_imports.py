"""The import graph stays clean: no cycles between egress-guard's modules, and the pure
package (`proxy/`, i.e. `egress_guard` minus `egress_guard.addons`) never imports mitmproxy
or the addons — except `server.py`, the one composition root.

Read from the source with `ast` (module-level imports only: those under `if TYPE_CHECKING:`
and inside functions do not run at import time, so they cannot make a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = {"egress_guard": ROOT / "proxy", "egress_guard.addons": ROOT / "addons"}
COMPOSITION_ROOT = "egress_guard.server"


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _runtime(body: list[ast.stmt]) -> list[ast.stmt]:
    out: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out.extend(_runtime(node.orelse))
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for block in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, block, []):
                    out.extend(_runtime(child.body if isinstance(child, ast.ExceptHandler) else [child]))
        else:
            out.append(node)
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules `name` imports when it is imported."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in _runtime(ast.parse(path.read_text()).body):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            submodules = {f"{module}.{a.name}" for a in node.names} & known.keys()
            found.update(submodules)
            if len(submodules) < len(node.names):  # names from the module itself, not only its submodules
                found.add(module)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_the_pure_package_never_imports_mitmproxy_or_the_addons() -> None:
    for name, deps in graph().items():
        if name.startswith("egress_guard.addons") or name == COMPOSITION_ROOT:
            continue
        bad = sorted(d for d in deps if d.split(".")[0] == "mitmproxy" or d.startswith("egress_guard.addons"))
        assert not bad, f"{name} imports {bad}: only {COMPOSITION_ROOT} may (keep proxy/ pure)"


def test_no_import_cycles() -> None:
    g = graph()
    inner = {name: {d for d in deps if d in g and d != name} for name, deps in g.items()}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            cycle = [*path[path.index(node) :], node]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if node in done:
            return
        for dep in sorted(inner[node]):
            visit(dep, [*path, node])
        done.add(node)

    for name in sorted(inner):
        visit(name, [])


def test_a_proxy_on_sqlite_never_imports_the_postgresql_driver() -> None:
    """psycopg (≈ 0.1 s to import, ≈ 10 MB) is loaded only for a `store: postgresql://…`."""
    import subprocess
    import sys

    code = "import sys, egress_guard.cli, egress_guard.server; print('psycopg' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out
