#!/usr/bin/env bash
# GPU figures in one call of at most ~8 minutes on one H100/H200 (docs/performance.md, "GPU figures"):
# the cifar preset at 32x32x3, training images/s and 1000-step ancestral sampling images/s for each speed
# option (bf16, channels_last, torch.compile, fused AdamW, CUDA graphs) and the best combinations, as
# paired ratios to fp32 eager and as fractions of the bf16 peak; then the CUDA-only tests.
# Needs torch (a CUDA build), numpy and pytest only: no Ray, MLflow or pydantic, nothing installed.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # default: $OUT, else ./gpu-check
#
# Writes to OUT_DIR: summary.md (the table to read first), bench_eager.json, bench_compile_sample.json,
# bench_compile_train.json, one .log per step (tests_cuda.log: the tests) and steps.txt (exit code and
# seconds of each step). Every step has its own time limit, so a slow compilation loses only its figures.
# BENCH_ARGS is appended to every bench command; a CPU rehearsal of the script's plumbing (the GPU-only
# variants are listed as skipped): BENCH_ARGS="--device cpu --preset tiny --image-size 8 --channels 1 --quick"
set -uo pipefail

cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the repository, without installing it
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/ddpm-inductor-cache}"  # not into $out
py="${PYTHON:-$(command -v python || command -v python3)}"
read -r -a extra <<<"${BENCH_ARGS:-}"
model=(--preset cifar --image-size 32 --channels 3 --device cuda)
: >"$out/steps.txt"

# step NAME LIMIT_S COMMAND...: run with a time limit, log to OUT/NAME.log, record exit code and seconds.
step() {
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    rc=${PIPESTATUS[0]}
    echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$out/steps.txt"
}

step env 30 bash -c "nvidia-smi -L; $py -c 'import torch; print(torch.__version__, torch.version.cuda, \
torch.cuda.is_available() and torch.cuda.get_device_name())'"

# 1. Eager options and their best combination; compiling is left to steps 3 and 4.
step bench_eager 150 "$py" -m benchmarks.bench "${model[@]}" --no-compile --sample-steps 8 \
    --train-variants fp32,bf16,channels_last,fused,cudnn_benchmark,bf16+channels_last+fused+cudnn_benchmark \
    --sample-variants fp32,bf16,channels_last,cudnn_benchmark,cuda_graph,bf16+channels_last+cudnn_benchmark+cuda_graph \
    --json "$out/bench_eager.json" "${extra[@]}"

# 2. The tests skipped without CUDA (-k cuda: marked or parametrized cuda): CUDA graphs and reduce-overhead
#    sampling vs eager (torch only); the trainer's save/restore on the GPU, which needs pipeline.train.loop
#    (pydantic), only where that imports. --noconftest: tests/conftest.py holds the local stack's fixtures
#    (Ray, pydantic), which no unit test uses.
tests=(tests/unit/ddpm/test_fast_paths.py)
if "$py" -c "import pipeline.train.loop" 2>/dev/null; then tests+=(tests/unit/train/test_state.py); fi
step tests_cuda 75 "$py" -m pytest -q -rs -p no:cacheprovider --noconftest -k cuda "${tests[@]}"

# 3-4. torch.compile alone and in the best combination (sampling: mode reduce-overhead, i.e. with CUDA graphs).
step bench_compile_sample 105 "$py" -m benchmarks.bench "${model[@]}" --sections sample --sample-steps 8 \
    --repeats 5 --warmup 2 --sample-variants fp32,compile,bf16+channels_last+cudnn_benchmark+compile \
    --json "$out/bench_compile_sample.json" "${extra[@]}"
step bench_compile_train 135 "$py" -m benchmarks.bench "${model[@]}" --sections train \
    --repeats 5 --warmup 2 --train-variants fp32,compile,bf16+channels_last+fused+cudnn_benchmark+compile \
    --json "$out/bench_compile_train.json" "${extra[@]}"

"$py" -m benchmarks.report "$out/bench_eager.json" "$out/bench_compile_sample.json" \
    "$out/bench_compile_train.json" | tee "$out/summary.md"
