"""The bench suite under pytest-benchmark: a saved run, a comparison against it, and the plain test run untouched."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _pytest(*args, env_extra=None):
    env = dict(os.environ, VSSL_BENCH_REPS="tiny", PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_a_saved_run_carries_the_figures_and_a_later_run_compares_against_it(tmp_path):
    pytest.importorskip("pytest_benchmark")
    store = tmp_path / "store"
    case = ["bench/test_losses.py", "-k", "ll-B256-d256-eager", "--benchmark-only", f"--benchmark-storage=file://{store}"]
    first = _pytest(*case, "--benchmark-autosave")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    (saved,) = store.rglob("0001_*.json")
    (b,) = json.loads(saved.read_text())["benchmarks"]
    assert b["group"] == "cosine ll B=256 d=256" and b["stats"]["rounds"] == 3  # VSSL_BENCH_REPS=tiny: 1 warm-up + 3
    info = b["extra_info"]
    assert (info["samples"], info["warmup"], info["timer"]) == (3, 1, "perf_counter") and info["p20"] <= info["p80"]
    assert info["bytes"] == 10 * 512 * 256 * 4 and info["GBps"] > 0  # LL fwd+bwd: 10 elements per (row, col), fp32
    assert b["options"]["timer"] == "perf_counter" and info["first_call_s"] > 0
    second = _pytest(*case, "--benchmark-compare=0001", "--benchmark-autosave")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "0001_" in second.stdout and "NOW" in second.stdout  # the saved run's row beside this run's
    assert len(list(store.rglob("000[12]_*.json"))) == 2


def test_the_bench_suite_skips_with_a_reason_without_the_plugin():
    r = _pytest("bench/test_losses.py", "-p", "no:benchmark", "-rs", "-k", "B256-d256")
    assert r.returncode == 0 and "needs pytest-benchmark" in r.stdout and " passed" not in r.stdout


def test_the_plain_test_run_needs_no_plugin_and_collects_no_benchmark():
    import re

    tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml with tomllib")
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert cfg["testpaths"] == ["tests"] and "benchmark" not in cfg.get("addopts", "")
    takes = [(p.name, m.group(1)) for p in (REPO / "tests").rglob("test_*.py")
             for m in re.finditer(r"def (test_\w+)\(([^)]*)\)", p.read_text()) if "benchmark" in m.group(2).split(", ")]
    assert takes == []  # no test under tests/ takes the benchmark fixture: a plain run times nothing
