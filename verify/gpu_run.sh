#!/usr/bin/env bash
# The compiled verify run on a GPU host, each step under its own time limit, logs under $1:
#   verify_gpu.log / .times     pytest verify/ -m gpu (LLaMA-sized shapes)
#   verify_all.log / .times     the whole pytest verify/ (every law compiled), wall time to exit
#   memcheck.log, racecheck.log compute-sanitizer over the GPU-marked kernel tests
# Usage: bash verify/gpu_run.sh OUTDIR [steps...]   (steps: gpu all memcheck racecheck; default all four)
# Limits (seconds) from the environment: ZQ_T_GPU, ZQ_T_ALL, ZQ_T_MEMCHECK, ZQ_T_RACECHECK.
# ZQ_WORKERS (default 8): pytest-xdist processes for the gpu and all steps (0: one process). The
# compiled run's time is Triton compilation (every new constexpr / shape specialization is a
# compile, CPU-bound), which parallel workers spread over the host's cores; they share Triton's
# on-disk cache. The sanitizer steps run in one process.
set -u
out=${1:?usage: verify/gpu_run.sh OUTDIR [steps...]}; shift
mkdir -p "$out"
workers=${ZQ_WORKERS:-8}
par=()
if [ "$workers" != 0 ]; then
    python3 -c "import xdist" 2>/dev/null || { echo "ZQ_WORKERS=$workers needs pytest-xdist (pip install pytest-xdist), or set ZQ_WORKERS=0"; exit 2; }
    par=(-n "$workers")
fi
steps=${*:-gpu all memcheck racecheck}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
step() {  # name limit command...
    local name=$1 limit=$2; shift 2
    local t0 t1 rc
    t0=$(date +%s.%N)
    ZQ_TEST_TIMES="$out/$name.times" timeout "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    echo "# $name: exit $rc, wall $(python3 -c "print(round($t1 - $t0, 1))") s, limit $limit s: $*" | tee -a "$out/$name.log"
}
for s in $steps; do
    case $s in
        gpu) step verify_gpu "${ZQ_T_GPU:-240}" python -m pytest verify/ -m gpu "${par[@]}" -q -p no:cacheprovider --durations=20 ;;
        all) step verify_all "${ZQ_T_ALL:-420}" python -m pytest verify/ "${par[@]}" -q -p no:cacheprovider --durations=40 ;;
        memcheck) step memcheck "${ZQ_T_MEMCHECK:-240}" compute-sanitizer --tool memcheck --error-exitcode 3 \
            python -m pytest verify/test_mosaic.py verify/test_zipper.py verify/test_actquant.py verify/test_w4a4.py \
            verify/test_w4a16.py verify/test_rmsnorm.py -m gpu -q -p no:cacheprovider ;;
        # racecheck costs 1-24 s per LLaMA-sized test (sanitizer_racecheck_cut*.times): every kernel family and variant once
        # (W4A4 / W4A16 split-K at M = 1, 16 and the tiled GEMM at 100, the tma variant at both tiles; Mosaic's three fused
        # variants; Zipper's high part; the activation quantizer's one- and two-pass rows; the RMSNorm's fp16 rows)
        racecheck) step racecheck "${ZQ_T_RACECHECK:-240}" compute-sanitizer --tool racecheck --error-exitcode 3 \
            python -m pytest verify/test_w4a4.py verify/test_mosaic.py verify/test_zipper.py verify/test_actquant.py \
            verify/test_w4a16.py verify/test_rmsnorm.py -m gpu -q -p no:cacheprovider -k "(llama_shapes_int32_exact_compiled and 1000-4000 and not 256) or \
            (test_w4a16 and llama_shapes_compiled and 1000-4000 and not 256) or \
            (tma_llama_shapes_compiled and 1000-4000-300) or \
            (llama_sizes_compiled and not down and not qkv) or (llama_o_size_compiled and not 512) or \
            (llama_rows and dtype0)" ;;
        *) echo "unknown step $s (gpu all memcheck racecheck)"; exit 2 ;;
    esac
done
