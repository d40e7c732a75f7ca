"""The README's Python API snippet (load a config, override, train, evaluate) runs as written."""

import json
import re
import subprocess
import sys

from helpers_train import REPO, env, tiny_args


def _snippet() -> str:
    m = re.search(r"<!-- api-snippet -->\n```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert m, "README.md has no ```python block after <!-- api-snippet -->"
    return m.group(1)


def test_readme_python_api_snippet_runs_as_written(cifar_tiny_tar, tmp_path):
    # my_run.json, which the snippet loads: the tiny test configuration as a (partial) config file
    settings: dict = {}
    for arg in tiny_args(cifar_tiny_tar, tmp_path / "run", tmp_path / "cache", steps=100):
        key, val = arg[2:].split("=", 1)
        key = key.replace("run-dir", "run_dir")
        if "." in key:
            sec, k = key.split(".")
            settings.setdefault(sec, {})[k] = val  # strings: a file's strings are parsed as on the command line
        else:
            settings[key] = val
    (tmp_path / "my_run.json").write_text(json.dumps(settings))
    (tmp_path / "snippet.py").write_text(_snippet())
    r = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=env(PYTHONPATH=REPO), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["optim"]["lr"] == 0.5 and cfg["train"]["max_steps"] == 8  # the command-line and Python overrides
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["steps"] == 8 and res["knn_top1"] is not None
    knn = json.loads((tmp_path / "knn.json").read_text())
    assert 0 <= knn["knn_k20_t0.07_top1"] <= 100 and knn["val_size"] == 100
