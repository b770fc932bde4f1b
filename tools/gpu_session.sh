#!/usr/bin/env bash
# One device call: kernel benchmarks, the GPU-only tests, the end-to-end benchmarks.
# Usage on the device machine (repo root): bash tools/gpu_session.sh OUT_DIR [STAGE ...]
# Stages (default: all, in this order): bench_kernels inductor_gpu_tests kernel_gpu_tests
# bench_optim_e2e bench_decode. Each stage has its own time limit so one slow stage cannot
# starve the others; DECODE_LAYERS (default 8) sets the decode benchmark's depth. Named only:
# quant_sweep (the quantize/dequantize launch-configuration variants, checked then timed);
# quant_producer (a quantize of a pointwise product compiled as kernel-after-product and fused);
# quant_profile (ncu stall reasons, memory and scheduler sections of both quantize kernels);
# gemm_prologue (large-M dequantize + linear compiled under max-autotune, template prologue on/off).
set -u
out="${1:-${OUT:-/tmp/out}}"
shift || true
stages="${*:-bench_kernels inductor_gpu_tests kernel_gpu_tests bench_optim_e2e bench_decode}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
stage() {  # stage NAME SECONDS CMD...
    local name=$1 limit=$2; shift 2
    case " $stages " in *" $name "*) ;; *) return ;; esac
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "=== $name exit $?"
    tail -n 40 "$out/$name.log"
}
stage bench_kernels 300 python3 tools/bench_kernels.py --json "$out/bench_kernels.json"
stage inductor_gpu_tests 110 python3 -m pytest -q -p no:cacheprovider tests/test_inductor_gpu.py
stage kernel_gpu_tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_quant.py tests/test_kernels_optim.py tests/test_kernels_gemm.py -k "(gpu or capture or device_scalars or inplace_step) and not 2_31"
stage quant_sweep 420 bash -c "python3 -m pytest -q -p no:cacheprovider tests/test_kernels_quant.py -k 'configs or search or exact_codes or arbitrary or prefetch' && python3 tools/bench_quant.py --check --sweep --json $out/quant_sweep.json"
stage quant_producer 240 python3 tools/bench_quant.py --producer --json "$out/quant_producer.json"
ncu_sections="--section SpeedOfLight --section SchedulerStats --section WarpStateStats --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats"
# the third launch of each kernel: the first compiles it (and builds the 8-bit tables, cached)
stage quant_profile 180 bash -c "for op in quantize_blockwise quantize_4bit; do ncu --launch-skip 2 --launch-count 1 -k regex:_\${op}_kernel $ncu_sections python3 tools/bench_quant.py --profile \$op; done"
stage gemm_prologue 540 python3 tools/bench_gemm.py --prologue --json "$out/gemm_prologue.json"
stage bench_optim_e2e 120 python3 tools/bench_e2e.py --skip-decode --json "$out/bench_optim_e2e.json"
stage bench_decode 420 python3 tools/bench_e2e.py --skip-optim --layers "${DECODE_LAYERS:-8}" --steps 32 --kernels --json "$out/bench_decode.json"
