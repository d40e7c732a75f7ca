#!/usr/bin/env bash
# The prepared device check (see bench/gpu_check.py; `python -m bench.gpu_check --plan` prints the plan):
# two calls of at most 540 s each, correctness first, every stage capped; at most 6 files land in $OUT.
# On the device machine, from the repo root:
#   bash bench/gpu_check.sh kernels        # call 1: carries .gpu/cifar10-jpeg.tar.gz
#   bash bench/gpu_check.sh data           # call 2 (needs nothing from call 1): carries .gpu/dali, .gpu/cifar-tiny.tar
#   bash bench/gpu_check.sh kernels 300 tests,step   # a budget and a subset of stages
set -u
exec python -m bench.gpu_check --call "${1:?usage: gpu_check.sh kernels|data [budget_s] [stages]}" \
  --budget-s "${2:-540}" ${3:+--stages "$3"} --out "${OUT:-bench/results}"
