"""The source tree works without an install (a bare GPU machine): ``vssl_fast.kernels`` resolves
to ``kernels/`` beside the package, as the installed package maps it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CODE = """
import sys
# forget the editable install, as on a machine where the project was never installed
sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in str(getattr(f, '__module__', ''))]
sys.path_hooks[:] = [h for h in sys.path_hooks if '__editable__' not in str(getattr(h, '__module__', ''))]
sys.path_importer_cache.clear()
sys.path.insert(0, sys.argv[1])
import vssl_fast.kernels as K
from vssl_fast.kernels import lars
from vssl_fast.optim import build_optimizer  # the package's own imports of the kernels
print(K.__file__)
print(lars.__file__)
"""


def test_kernels_import_from_a_source_checkout_without_install(tmp_path):
    out = subprocess.run([sys.executable, "-c", CODE, str(ROOT)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    files = out.stdout.split()
    assert files == [str(ROOT / "kernels" / "__init__.py"), str(ROOT / "kernels" / "lars.py")]



def test_a_second_checkout_uses_its_own_kernels(tmp_path):
    """Beside an editable install of this checkout, another checkout (a git worktree; here a copy)
    imports its own kernels, not the installed checkout's (the editable finder maps
    vssl_fast.kernels by path)."""
    import shutil

    other = tmp_path / "other"
    for d in ("vssl_fast", "kernels"):
        shutil.copytree(ROOT / d, other / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", other / "pyproject.toml")
    code = "import vssl_fast, vssl_fast.kernels as K; print(vssl_fast.__file__); print(K.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=other, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(other / "vssl_fast" / "__init__.py"), str(other / "kernels" / "__init__.py")]


def _module_graph() -> dict[str, set[str]]:
    """Which of the package's modules (``vssl_fast.data.*`` counted as one, ``vssl_fast.data``) import which,
    lazy imports inside functions included: a lazy import still ties the two modules together."""
    import ast

    def node(mod: str) -> str | None:
        parts = mod.split(".")
        return ".".join(parts[:2]) if parts[0] == "vssl_fast" and len(parts) > 1 else None

    graph: dict[str, set[str]] = {}
    for f in (ROOT / "vssl_fast").rglob("*.py"):
        me = node(".".join(f.relative_to(ROOT).with_suffix("").parts))
        for a in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(a, ast.ImportFrom) and a.module and a.level == 0:
                names = [f"{a.module}.{n.name}" for n in a.names] if a.module == "vssl_fast" else [a.module]
            elif isinstance(a, ast.Import):
                names = [n.name for n in a.names]
            for n in names:
                if (t := node(n)) and t != me:
                    graph.setdefault(me, set()).add(t)
    return graph


def test_the_package_has_no_import_circle():
    """faults (the failure policy every module raises through) imported vssl_fast.data, which imports faults:
    a circle that only lazy imports kept from breaking."""
    graph = _module_graph()
    assert "vssl_fast.faults" in graph.get("vssl_fast.data", ())  # the graph sees the data package's imports

    def cycle_from(start, path):
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == start:
                return path + [nxt]
            if nxt not in path and (c := cycle_from(start, path + [nxt])):
                return c
        return None

    cycles = [c for m in sorted(graph) if (c := cycle_from(m, [m]))]
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)
