#!/usr/bin/env bash
# One device call: kernel benchmarks, the GPU-only Inductor tests, the end-to-end benchmark.
# Usage on the device machine (repo root): bash tools/gpu_session.sh OUT_DIR
# Each stage has its own time limit so one slow stage cannot starve the others.
set -u
out="${1:-${OUT:-/tmp/out}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
stage() {  # stage NAME SECONDS CMD...
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "=== $name exit $?"
    tail -n 40 "$out/$name.log"
}
stage bench_kernels 170 python3 tools/bench_kernels.py --json "$out/bench_kernels.json"
stage inductor_gpu_tests 110 python3 -m pytest -q -p no:cacheprovider tests/test_inductor_gpu.py
stage optim_gpu_tests 50 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_optim.py -k "gpu_8bit_vs_bitsandbytes or gpu_32bit_vs_bitsandbytes"
stage bench_e2e 170 python3 tools/bench_e2e.py --layers 2 --steps 32 --json "$out/bench_e2e.json"
