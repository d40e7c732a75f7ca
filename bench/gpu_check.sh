#!/usr/bin/env bash
# The prepared device check (see bench/gpu_check.py; `python -m bench.gpu_check --plan` prints the plan):
# session 1: call 1 (480 s) then call 2 (240 s) back to back; call 3 (rest) in a later session; at most 6 files in $OUT.
# On the device machine, from the repo root:
#   bash bench/gpu_check.sh kernels        # call 1: carries .gpu/cifar10-jpeg.tar.gz
#   bash bench/gpu_check.sh data           # call 2, at once while warm: carries .gpu/dali, .gpu/cifar-tiny.tar
#   bash bench/gpu_check.sh rest           # call 3, a later session: carries .gpu/dali
#   bash bench/gpu_check.sh kernels 300 tests,step   # a budget and a subset of stages
set -u
exec python -m bench.gpu_check --call "${1:?usage: gpu_check.sh kernels|data|rest [budget_s] [stages]}" \
  ${2:+--budget-s "$2"} ${3:+--stages "$3"} --out "${OUT:-bench/results}"
