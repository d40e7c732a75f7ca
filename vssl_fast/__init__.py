"""vssl-fast: Variational Self-Supervised Learning, fast and validated against plain references."""

import importlib.util as _ilu
import sys as _sys
from pathlib import Path as _Path

__version__ = "0.1.0"


def _source_tree_kernels() -> None:
    """Run from a source checkout with no install (a bare GPU machine): ``kernels/`` beside this
    package becomes ``vssl_fast.kernels``, as the installed package maps it (pyproject.toml)."""
    name = __name__ + ".kernels"
    if name in _sys.modules or _ilu.find_spec(name) is not None:
        return
    src = _Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
    if not src.is_file():
        return
    spec = _ilu.spec_from_file_location(name, src, submodule_search_locations=[str(src.parent)])
    mod = _ilu.module_from_spec(spec)
    _sys.modules[name] = mod
    spec.loader.exec_module(mod)


_source_tree_kernels()
