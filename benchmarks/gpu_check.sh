#!/usr/bin/env bash
# Thin wrapper kept for the old name: the steps, their time boxes and outputs live in gpu_check.py.
#     bash benchmarks/gpu_check.sh [--steps run1|run2|STEP,...] [--budget SECONDS] [--out DIR]
exec python "$(dirname "$0")/gpu_check.py" "$@"
