"""End-to-end throughput of train.py with data loading, against the step benchmark on the same card.

    python -m bench.bench_e2e --cifar PATH_TO_cifar10-jpeg.tar.gz      # on a GPU
    python -m bench.bench_e2e --tiny --cifar PATH                      # smoke run on the CPU

Runs (1) the step benchmark's fast step at the same size, (2) train.py on the GPU CIFAR path and
(3) train.py on an ImageNet-style JPEG folder (DALI when importable, else the nvJPEG path),
each for a fixed number of steps, and reports train.py's steady-state views/s (log intervals
after the first, from metrics.jsonl), its data-wait share, and the ratio to (1).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from bench.bench_data import make_jpegs
from bench.common import RowSink, env_info, header, markdown_table

REPO = Path(__file__).resolve().parents[1]


def _train(args: list[str], run_dir: Path) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)  # a scratch run; train.py refuses a dir that holds another run
    cmd = [sys.executable, str(REPO / "train.py"), *args, f"--run-dir={run_dir}", "--log.progress=false",
           "--log.tensorboard=false", "--eval.knn_every_epochs=0", "--eval.online_every_epochs=100000"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"train.py failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tr = [x for x in rows if x.get("kind") == "train"][1:]  # drop the first interval (warm-up, compilation)
    vps = sum(x["views_per_s"] for x in tr) / max(len(tr), 1)
    wait = sum(x["data_wait"] for x in tr) / max(len(tr), 1)
    res = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").exists() else {}
    return {"views_per_s": vps, "data_wait": wait, "data_loader": res.get("data_loader")}


def _step_row(path: str | None, px: int, batch: int) -> float | None:
    """The fast step's views/s (eager, train.compile=auto) at (px, batch) from a bench_step rows file, if there."""
    if not path or not Path(path).exists():
        return None
    for line in Path(path).read_text().splitlines():
        r = json.loads(line) if line.strip() else {}
        if (r.get("bench") == "step" and r.get("px") == px and r.get("batch") == batch
                and str(r.get("variant", "")).startswith("b_fast(") and "=auto,graph=off)" in r["variant"]
                and r.get("views_per_s") is not None):  # a timing row, not bench_step's launches row
            return r["views_per_s"]
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cifar", required=True, help="CIFAR-10 source (the JPEG tar, a folder, ...)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--work", default=".cache/bench_e2e")
    ap.add_argument("--out", default="bench/results/e2e.jsonl")
    ap.add_argument("--paths", default="cifar_gpu,jpeg_folder", help="which runs: cifar_gpu, jpeg_folder")
    ap.add_argument("--step-rows", default=None, help="a rows file of bench_step (gpu_check's): its fast-step row at "
                    "the same size and graph=off is the reference instead of timing the step again")
    ap.add_argument("--jpeg-dir", default=None, help="the benchmark JPEGs (default WORK/jpegs; bench_data's folder "
                    "to make them once)")
    a = ap.parse_args(argv)
    from bench.bench_step import run_case

    work = Path(a.work)
    env = env_info()
    sink = RowSink("e2e", a.out, env)
    small = ["--method.proj_hidden_dim=64", "--method.pred_hidden_dim=64", "--method.denoiser_hidden_dim=64",
             "--method.proj_output_dim=32"] if a.tiny else []
    cases = [("cifar_gpu", 32, 8 if a.tiny else 256), ("jpeg_folder", 64 if a.tiny else 224, 8 if a.tiny else 128)]
    paths = a.paths.split(",")
    unknown = set(paths) - {c[0] for c in cases}
    if unknown:
        ap.error(f"--paths: unknown {sorted(unknown)}")
    for name, px, bs in [c for c in cases if c[0] in paths]:
        import torch

        step_vps, step_src = _step_row(a.step_rows, px, bs), "step stage"
        if step_vps is None:
            step_vps = next(r for r in run_case(px, bs, torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                                                a.tiny) if r["variant"].startswith("b_fast"))["views_per_s"]
            step_src = "timed here"
        steps, log_every = (4, 2) if a.tiny else (300, 50)
        common = [f"--train.batch_size={bs}", f"--train.max_steps={steps}", f"--log.every_steps={log_every}",
                  f"--ckpt.every_steps={10 * steps}", *small]
        if name == "cifar_gpu":
            args = ["--preset", "cifar10", f"--data.path={a.cifar}", f"--data.cache_dir={work / 'cache'}", *common]
        else:
            root = Path(a.jpeg_dir) if a.jpeg_dir else work / "jpegs"
            make_jpegs(root, 64 if a.tiny else 4096)
            if not (root / "val").exists():
                (root / "val").symlink_to((root / "train").resolve())
            args = ["--preset", "imagenet100", f"--data.path={root}", f"--data.crop_size={px}", *common]
        res = _train(args, work / f"run_{name}")
        sink.emit(dict(path=name, px=px, batch=bs, train_views_per_s=res["views_per_s"], step_bench_views_per_s=step_vps,
                       ratio=res["views_per_s"] / step_vps, data_wait=res["data_wait"], step_bench_from=step_src,
                       data_loader=res.get("data_loader")))
    rows = sink.rows
    print(header("end-to-end train.py vs step benchmark", env))
    print(markdown_table(rows, ["path", "px", "batch", "train_views_per_s", "step_bench_views_per_s", "ratio", "data_wait",
                                "data_loader"]))
    return rows


if __name__ == "__main__":
    main()
