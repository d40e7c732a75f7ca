"""VSSL against the BYOL control at the same budget on real CIFAR-10, in the same code (issue 8).

    python -m bench.vssl_vs_byol --cifar ../shared/data/cifar10-jpeg.tar.gz --epochs 30      # on a GPU
    python -m bench.vssl_vs_byol --cifar PATH --tiny                                          # CPU smoke run

Runs train.py with the cifar10 preset for VSSL and for BYOL (same seed, same epochs, the fast
path), then VSSL once more with the same seed to show the run-to-run spread, and prints one
table from each run's own results.json: online linear top-1, kNN top-1 (k=20 T=0.07 and k=200
T=0.1), wall time, images/s. Each run directory keeps its loss and accuracy plots.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import RowSink, env_info, header, markdown_table

REPO = Path(__file__).resolve().parents[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cifar", required=True)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--work", default="runs/vssl_vs_byol")
    ap.add_argument("--repeat", action="store_true", default=True)
    ap.add_argument("--out", default="bench/results/vssl_vs_byol.jsonl")
    a, extra = ap.parse_known_args(argv)  # anything else: --section.key=value overrides for every run
    a.extra = extra
    work = Path(a.work) / time.strftime("%Y%m%d-%H%M%S")  # fresh run dirs: train.py never reuses one
    base = ["--preset", "smoke" if a.tiny else "cifar10", f"--data.path={a.cifar}", f"--train.epochs={a.epochs}",
            f"--eval.knn_every_epochs={a.epochs}", "--log.progress=false", "--train.seed=5", *a.extra]
    if a.tiny:
        base += ["--data.train_subset=64", "--data.val_subset=64", "--train.batch_size=16",
                 "--method.proj_hidden_dim=64", "--method.pred_hidden_dim=64", "--method.denoiser_hidden_dim=64",
                 "--method.proj_output_dim=16"]
    runs = [("vssl", 1), ("byol", 1)] + ([("vssl", 2)] if a.repeat else [])
    env = env_info()
    sink = RowSink("vssl_vs_byol", a.out, env)  # each run's row is on disk as soon as the run ends
    rows = []
    for method, rep in runs:
        run_dir = work / f"{method}_{rep}"
        cmd = [sys.executable, str(REPO / "train.py"), *base, f"--method.method={method}", f"--run-dir={run_dir}"]
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{method} run failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        res = json.loads((run_dir / "results.json").read_text())
        rows.append(dict(method=method, run=rep, epochs=res["epochs"], online_top1=res["online_top1"],
                         knn_k20_top1=res.get("knn_k20_t0.07_top1"), knn_k200_top1=res.get("knn_k200_t0.1_top1"),
                         wall_time_s=res["wall_time_s"], img_per_s=res["img_per_s"], run_dir=str(run_dir),
                         command=" ".join(cmd[1:])))
        sink.emit(rows[-1])
    v = [r for r in rows if r["method"] == "vssl"]
    b = next(r for r in rows if r["method"] == "byol")
    summary = {"vssl_minus_byol_online": v[0]["online_top1"] - b["online_top1"],
               "vssl_minus_byol_knn200": (v[0]["knn_k200_top1"] or 0) - (b["knn_k200_top1"] or 0)}
    if len(v) > 1:
        summary["vssl_repeat_spread_online"] = abs(v[0]["online_top1"] - v[1]["online_top1"])
        summary["vssl_repeat_spread_knn200"] = abs((v[0]["knn_k200_top1"] or 0) - (v[1]["knn_k200_top1"] or 0))
    print(header("VSSL vs BYOL on CIFAR-10", env))
    print(markdown_table(rows, ["method", "run", "epochs", "online_top1", "knn_k20_top1", "knn_k200_top1", "wall_time_s",
                                "img_per_s"]))
    print(json.dumps(summary, indent=2))
    sink.emit(dict(summary=summary))
    return rows, summary


if __name__ == "__main__":
    main()
