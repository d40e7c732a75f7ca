"""vssl-fast: Variational Self-Supervised Learning, fast and validated against plain references."""

import importlib.util as _ilu
import sys as _sys
from pathlib import Path as _Path

__version__ = "0.1.0"


def _source_tree_kernels() -> None:
    """Run from a source checkout (a bare GPU machine, or a second checkout beside an editable
    install of another one): ``kernels/`` beside this package becomes ``vssl_fast.kernels``, as the
    installed package maps it (pyproject.toml). A checkout's own kernels win over an editable
    install's mapping, which points at the checkout that was installed (git worktrees)."""
    name = __name__ + ".kernels"
    if name in _sys.modules:
        return
    root = _Path(__file__).resolve().parent.parent
    src = root / "kernels" / "__init__.py"
    # a source checkout holds pyproject.toml beside the package; site-packages does not (and may hold
    # an unrelated top-level package named `kernels`)
    if not (src.is_file() and (root / "pyproject.toml").is_file()):
        return  # installed: the package's own vssl_fast/kernels
    spec = _ilu.spec_from_file_location(name, src, submodule_search_locations=[str(src.parent)])
    mod = _ilu.module_from_spec(spec)
    _sys.modules[name] = mod
    spec.loader.exec_module(mod)


_source_tree_kernels()
