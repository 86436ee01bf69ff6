#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one go, each step time-boxed so one slow step cannot eat the
# device budget. Usage (on the GPU machine, repository root):
#     bash benchmarks/gpu_check.sh [OUT_DIR]        (default: $OUT or ./results)
# Writes logs and JSON to OUT_DIR and prints a short summary last. Steps can be skipped with
# SKIP="build tests check fuse conv model" (any subset).
set -u
OUT=${1:-${OUT:-results}}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
summary=()
step() {  # step NAME SECONDS COMMAND...
  local name=$1 secs=$2; shift 2
  case " ${SKIP:-} " in *" $name "*) summary+=("$name: skipped"); return;; esac
  local t0=$SECONDS
  timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$name: rc=$rc in $((SECONDS - t0)) s (log $OUT/$name.log)")
  tail -n 25 "$OUT/$name.log"
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python - > "$OUT/env.txt" 2>&1 <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("device", torch.cuda.get_device_name(0))
import triton; print("triton", triton.__version__)
PY
cat "$OUT/env.txt"

step build 240 env HRNET_FAST_BUILD_CUDA=1 pip install --no-build-isolation --no-deps -e .
step tests 300 python -m pytest -q -x -p no:cacheprovider tests
step check 240 python -m hrnet_fast check --preset w18 --size 1024x2048 --batch 1 --backends torch triton cuda
step fuse 120 python benchmarks/bench_fuse_kernels.py --json "$OUT/fuse_kernels.json"
step conv 180 python benchmarks/bench_conv_kernels.py --json "$OUT/conv_kernels.json"
step model 300 python -m hrnet_fast bench --preset w18 w48 --size 1024x2048 --dtype fp16 \
    --impls torch+graphs triton triton+graphs cuda+graphs --peers eager compile-ro \
    --repeats 20 --json "$OUT/model_bench.json"

echo
echo "== summary =="
printf '%s\n' "${summary[@]}"
