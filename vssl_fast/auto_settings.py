"""What the ``auto`` settings rest on: the measurements behind ``train.compile=auto`` and ``train.graph=auto``.

Each entry names the rule, its source (card, versions, code, command), the samples per figure and
their spread, so a run's log and ``results.json`` say what its automatic choice is worth. A rule
changes only with a ``decision(...)`` row of ``python -m bench.bench_step --graph-modes off,on
--compile-modes none,default`` whose choice is not 'undecided' (the faster option's p80 below the
other's p20); its ``rests_on`` (median, p20, p80, samples, warm-ups per option) goes here.

The launch table's entries (``kernels/launch_table.json``, written by ``bench.tune_launch``) carry
their own samples and spread per candidate under ``_measured``.
"""

from __future__ import annotations

EVIDENCE = {
    "train.compile": {
        "rule": "'default' on CUDA at crop sizes <= 64 px, else 'none'",
        "source": "issues 6 and 7: NVIDIA H200, torch 2.11.0+cu130, the plain step before the fused kernels, "
                  "project at 8f0e74d, 2026-11-26",
        "figures": {"32 px, batch 256": {"compiled": "27,636 views/s", "eager": "18,740 views/s"},
                    "224 px": "no gain from compiling"},
        "samples": "1-2 per figure (bench_step handed warmup=3, rep=30 to triton.testing.do_bench, which reads "
                   "them as milliseconds: issue 22)",
        "spread": None,
        "status": "provisional: a 1.47x gap on one or two samples; to be re-decided by bench_step's decision row",
    },
    "train.graph": {
        "rule": "off: the step runs uncaptured",
        "source": "none yet: the captured step has not been timed on a card",
        "figures": {},
        "samples": 0,
        "spread": None,
        "status": "undecided until bench_step --graph-modes off,on gives a decision row",
    },
}


def why(setting: str) -> str:
    """One line for the log: the rule and what it rests on."""
    e = EVIDENCE[setting]
    spread = "none stated" if e["spread"] is None else e["spread"]
    return f"{setting}=auto: {e['rule']}; rests on {e['source']} (samples: {e['samples']}; spread: {spread}; {e['status']})"
