#!/usr/bin/env bash
# One prepared device run (see bench/gpu_check.py): correctness on CUDA first, then every benchmark,
# under one total budget in seconds (default 540 = 9 min); at most 6 files land in $OUT.
# On the device machine, from the repo root, with the CIFAR tar carried into .gpu/ (git-ignored):
#   bash bench/gpu_check.sh                 # everything, 540 s
#   bash bench/gpu_check.sh 300 tests,step  # a budget and a subset of stages
set -u
exec python -m bench.gpu_check --budget-s "${1:-540}" ${2:+--stages "$2"} --out "${OUT:-bench/results}"
