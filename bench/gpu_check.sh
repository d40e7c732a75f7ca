#!/usr/bin/env bash
# One prepared device run for a GPU session: correctness on CUDA first, then every benchmark.
# Usage on the device machine (repo root; $OUT is the folder that comes back):
#   bash bench/gpu_check.sh [STAGES]     STAGES: comma list of tests,cosine,ema,lamb,lars,step,data,e2e,cmp (default: all but cmp)
# Each stage has its own time limit so one slow stage cannot eat the lease; logs and JSON rows
# land in $OUT. The CIFAR tar must be carried into .gpu/ (git-ignored): cp ../shared/data/cifar10-jpeg.tar.gz .gpu/
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
STAGES=${1:-tests,cosine,ema,lamb,lars,step,data,e2e}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
python -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" >> "$OUT/gpu.txt" 2>&1
run() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  case ",$STAGES," in *",$name,"*) ;; *) return 0 ;; esac
  echo "== $name ($(date -u +%H:%M:%S))"
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1; echo "   rc=$? ($(date -u +%H:%M:%S))"
  tail -n 25 "$OUT/$name.log"
}
run tests 240 python -m pytest -q -x tests/kernels tests/test_losses.py
run cosine 120 python -m bench.bench_cosine_loss --out "$OUT/rows.jsonl"
run ema 60 python -m bench.bench_ema --out "$OUT/rows.jsonl"
run lamb 90 python -m bench.bench_lamb --out "$OUT/rows.jsonl"
run lars 90 python -m bench.bench_lars --out "$OUT/rows.jsonl"
run step 420 python -m bench.bench_step --compile-modes auto,none,reduce-overhead --out "$OUT/rows.jsonl"
run data 240 python -m bench.bench_data --jpeg-dir /tmp/bench_jpegs --out "$OUT/rows.jsonl"
run e2e 300 python -m bench.bench_e2e --cifar .gpu/cifar10-jpeg.tar.gz --work /tmp/e2e --out "$OUT/rows.jsonl"
run cmp 590 python -m bench.vssl_vs_byol --cifar .gpu/cifar10-jpeg.tar.gz --epochs 20 --work /tmp/cmp --out "$OUT/rows.jsonl"
