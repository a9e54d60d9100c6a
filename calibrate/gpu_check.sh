#!/usr/bin/env bash
# One-GPU check (calibrate/gpu_check.py) from the repository root, outputs under one folder.
#   bash calibrate/gpu_check.sh [OUT_DIR] [gpu_check.py options...]
# OUT_DIR defaults to $OUT, else ./gpu_check_out. PYTHON picks the interpreter (default python3);
# it needs torch with CUDA, numpy and PyYAML (moesim's own dependencies).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${OUT:-gpu_check_out}"
if [[ $# -gt 0 && "$1" != -* ]]; then out="$1"; shift; fi
mkdir -p "$out"
out="$(cd "$out" && pwd)"  # absolute: the script runs from the repository root
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv \
    > "$out/nvidia-smi.csv" 2>&1 || true
cd "$root"
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "${PYTHON:-python3}" calibrate/gpu_check.py \
    --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
