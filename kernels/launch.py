"""Launch settings per card: elements per program, warps, rows per tile; measured, then looked up.

Every Triton kernel in this package takes its launch settings from ``settings(family, device)``:

- under the interpreter (CPU tensors, ``TRITON_INTERPRET=1``), ``INTERPRETER``: a program costs
  Python overhead whatever its size, so programs are large and warps mean nothing;
- on CUDA, the entry measured for the device's compute capability in ``launch_table.json`` (written
  by ``python -m bench.tune_launch`` on that card: every candidate timed as GPU time replayed from a
  CUDA graph, the fastest kept, with card, versions, date and the timings beside it), or ``DEFAULTS``
  for a capability that was never measured (``source()`` says which one a run used).

Nothing here runs at import or in the CPU tests beyond a dictionary lookup; there is no autotuner
in the launch path (its first call would time every candidate inside a user's training step).

Determinism: the optimizers' norms are reduced per block in a fixed order, so they are the same
bits on every run with the same ``BLOCK``; a run resumed under another table (another card, a
re-tuned entry, ``VSSL_LAUNCH_TABLE``) continues correctly but not bit-identically.
Overrides are process-wide (not per thread).

Families (the kernels that share a block map must share ``BLOCK``):

- ``ema``, ``restore``: one multi-tensor sweep each; ``BLOCK`` elements per program, ``num_warps``;
- ``lars``: the norm sweep and the update share ``BLOCK``; ``num_warps`` for both;
- ``lamb``: norms, moments (stage 1) and update (stage 2) share ``BLOCK``; ``num_warps``;
- ``cosine``: the row kernels; a program holds ``TILE`` elements (``TILE // BLOCK_D`` rows when a
  row is shorter), ``num_warps`` below d = 2048 and ``num_warps_wide`` at d >= 2048.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

TABLE_PATH = Path(__file__).with_name("launch_table.json")

# Starting points for a card without a measured entry, chosen on paper from what ptxas allots
# (``python -m vssl_fast.kernels.aot_check``, which fails on a spill or under 50% theoretical
# occupancy on sm_90): about 8 elements per thread in the multi-tensor sweeps and 4 per tile row
# in the cosine kernels. The settings of every GPU figure before issue 13 (``PREVIOUS``: 32
# elements per thread) need up to 255 registers (LAMB stage 1, the KL backward at d = 256, with
# spills), i.e. 12-25% occupancy on sm_90; the tuner measures both.
DEFAULTS: dict = {
    "ema": {"BLOCK": 2048, "num_warps": 8},
    "restore": {"BLOCK": 2048, "num_warps": 8},
    "lars": {"BLOCK": 2048, "num_warps": 8},
    "lamb": {"BLOCK": 2048, "num_warps": 8},
    "cosine": {"TILE": 1024, "num_warps": 8, "num_warps_wide": 16},
}
PREVIOUS: dict = {
    **{f: {"BLOCK": 4096, "num_warps": 4} for f in ("ema", "restore", "lars", "lamb")},
    "cosine": {"TILE": 4096, "num_warps": 4, "num_warps_wide": 8},
}

# Under the interpreter: large programs (a channels-last ResNet-18 LARS step: ~230 programs instead
# of ~2,800, measured 11 s vs 20 s per step; per-element cost rises past 1 << 16).
INTERPRETER: dict = {
    "ema": {"BLOCK": 1 << 16, "num_warps": 1},
    "restore": {"BLOCK": 1 << 16, "num_warps": 1},
    "lars": {"BLOCK": 1 << 16, "num_warps": 1},
    "lamb": {"BLOCK": 1 << 16, "num_warps": 1},
    "cosine": {"TILE": 32768, "num_warps": 1, "num_warps_wide": 1},
}

# What each setting may be; the tuner's candidates and the table's validation both use it.
ALLOWED = {
    "BLOCK": (512, 1024, 2048, 4096, 8192, 16384) + (1 << 16,),
    "TILE": (512, 1024, 2048, 4096, 8192, 16384, 32768),
    "num_warps": (1, 2, 4, 8, 16),
    "num_warps_wide": (1, 2, 4, 8, 16),
}

_overrides: list[dict] = []
_tables: dict = {}  # path -> parsed table


def capability_key(device: torch.device) -> str | None:
    """``'sm_90'`` for an H100/H200; None off CUDA."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def _table_path() -> Path:
    return Path(os.environ.get("VSSL_LAUNCH_TABLE", TABLE_PATH))


def load_table(path: Path | None = None) -> dict:
    """The measured table ``{capability: {family: settings, ..., "_measured": {...}}}`` ({} when absent).

    A malformed table is an error naming the file and the entry, not a silent fallback: a run that
    believes it uses measured settings must.
    """
    path = Path(path) if path is not None else _table_path()
    key = str(path)
    if key not in _tables:
        if not path.exists():
            _tables[key] = {}
        else:
            try:
                table = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"launch table {path}: not valid JSON ({e})") from e
            validate_table(table, str(path))
            _tables[key] = table
    return _tables[key]


def validate_table(table: dict, where: str = "launch table") -> None:
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected an object keyed by capability ('sm_90'), got {type(table).__name__}")
    for cap, entry in table.items():
        if not (isinstance(cap, str) and cap.startswith("sm_")) or not isinstance(entry, dict):
            raise ValueError(f"{where}: entry {cap!r} must be 'sm_XY': {{family: settings}}")
        for fam, st in entry.items():
            if fam.startswith("_"):
                continue  # provenance: card, versions, date, timings
            if fam not in DEFAULTS:
                raise ValueError(f"{where}: {cap}: unknown kernel family {fam!r} (known: {sorted(DEFAULTS)})")
            if not isinstance(st, dict):
                raise ValueError(f"{where}: {cap}.{fam} must be an object of settings, got {st!r}")
            for k, v in st.items():
                if k not in DEFAULTS[fam]:
                    raise ValueError(f"{where}: {cap}.{fam}: unknown setting {k!r} (known: {sorted(DEFAULTS[fam])})")
                if type(v) is not int or v not in ALLOWED[k]:
                    raise ValueError(f"{where}: {cap}.{fam}.{k} = {v!r}; allowed: {ALLOWED[k]}")


def settings(family: str, device: torch.device) -> dict:
    """Launch settings of ``family`` for tensors on ``device`` (a fresh dict; overrides applied in order)."""
    out = _base(family, device)
    for o in _overrides:
        out.update(o.get(family, {}))
    return out


def _base(family: str, device: torch.device) -> dict:
    if device.type != "cuda":  # the interpreter is the only way a Triton kernel runs off CUDA
        return dict(INTERPRETER[family])
    return for_capability(family, capability_key(device))


def for_capability(family: str, cap: str | None, table: dict | None = None) -> dict:
    """Settings of ``family`` on a CUDA card of capability ``cap`` ('sm_90'): the measured entry
    over the defaults (a family or setting the table lacks keeps its default)."""
    entry = (load_table() if table is None else table).get(cap, {})
    return {**DEFAULTS[family], **entry.get(family, {})}


def source(device: torch.device) -> str:
    """Where ``settings`` takes its values for ``device``: 'interpreter', 'measured (...)' or 'defaults'."""
    if device.type != "cuda":
        return "interpreter"
    cap = capability_key(device)
    entry = load_table().get(cap)
    if not entry:
        return f"defaults ({cap} not measured)"
    meta = entry.get("_measured", {})
    return f"measured for {cap} on {meta.get('device', '?')} ({meta.get('date', '?')}, triton {meta.get('triton', '?')})"


@contextlib.contextmanager
def override(**families):
    """Temporarily replace settings, e.g. ``override(lars={"BLOCK": 16})`` (tests, the tuner).

    Tables built under an override carry its block size, so they are not reused outside it.
    """
    for fam, st in families.items():
        if fam not in DEFAULTS:
            raise ValueError(f"override: unknown kernel family {fam!r}")
        for k, v in st.items():
            if k not in DEFAULTS[fam]:
                raise ValueError(f"override: {fam}: unknown setting {k!r}")
            if type(v) is not int or v < 1 or v & (v - 1):  # tests may go below ALLOWED (16-element blocks)
                raise ValueError(f"override: {fam}.{k} = {v!r}; a power of two is needed")
    _overrides.append(families)
    try:
        yield
    finally:  # this entry, by identity: an equal one of an outer override must stay
        del _overrides[next(i for i in range(len(_overrides) - 1, -1, -1) if _overrides[i] is families)]
