#!/usr/bin/env bash
# The GPU check in one go, for a machine with one or more CUDA GPUs (issue 11). From the repository root:
#
#     FLOWSAN_DATA_ROOT=<folder holding lfw/ and utkface/> bash benchmarks/gpu_check.sh
#
# Needs the project's .venv and the pretrained weights in the model cache (`flowsan models fetch`, or
# FLOWSAN_MODEL_CACHE pointing at a copy). Writes everything under benchmarks/results/gpu_check_<time>/:
#   nvidia-smi.txt, pytest_cuda.txt       the CUDA-marked tests and the data-parallel tests
#   run_gpu-check.log, stage_times.txt    the gpu-check preset end to end (stages 01-05), time per stage
#   train_throughput.json/.txt            ours vs the original recipe (fp32, batch 8), 112 and 224 px
#   inference_throughput.json/.txt        FlowSAN-1..3 at 112 and 224 px, fp32 / bf16 / channels-last
#   run_gpus<N>.log                       with several GPUs: 03-04 data parallel, members one per GPU
# Every step runs even when an earlier one failed; the exit status is the number of failed steps.
set -u
cd "$(dirname "$0")/.."
PY=.venv/bin/python
STAMP=$(date +%Y%m%d_%H%M%S)
OUT=benchmarks/results/gpu_check_$STAMP
mkdir -p "$OUT"
export FLOWSAN_DATA_WORKERS=${FLOWSAN_DATA_WORKERS:-$(nproc)}   # dlib alignment of the data stage on every core
fails=0
step() {  # step NAME TIMEOUT_S CMD...: run, log to $OUT/NAME.txt, time it
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$name: rc $rc, $(( $(date +%s) - t0 )) s" | tee -a "$OUT/steps.txt"
  [ $rc -eq 0 ] || fails=$((fails + 1))
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
NGPU=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
echo "commit $(git rev-parse --short HEAD), $NGPU GPU(s), $(date -Is)" | tee "$OUT/steps.txt"
if [ "$NGPU" -lt 1 ]; then echo "no CUDA GPU: nothing to check" | tee -a "$OUT/steps.txt"; exit 1; fi

# 1. tests that need CUDA (skipped in CI) and the data-parallel ones
step pytest_cuda 600 $PY -m pytest -q -m cuda tests/test_device.py tests/test_precision.py tests/test_parallel.py \
    tests/test_san.py tests/test_flow.py
# 2. the gpu-check preset end to end (01-05) on one GPU, then the time of each stage
step run_gpu-check 900 .venv/bin/flowsan run gpu-check --run-name "gpu-check-$STAMP"
step stage_times 60 $PY benchmarks/stage_times.py "outputs/gpu-check-$STAMP" --out "$OUT/stage_times.json"
# 3. training throughput: ours vs the plain-PyTorch original recipe at equal settings and at our defaults
step train_throughput 900 $PY benchmarks/train_throughput.py --device cuda --resolutions 112 224 \
    --variants original equal default --steps 40 --warmup 10 --check --out "$OUT/train_throughput.json"
# 4. FlowSAN-1..3 inference images/s at 112 and 224 px, share of peak, peak memory
step inference_throughput 600 $PY benchmarks/inference_throughput.py --device cuda --resolutions 112 224 --stages 3 \
    --images 8192 --repeats 3 --options fp32 bf16 cl --folder-images 0 --out "$OUT/inference_throughput.json"
# 5. several GPUs: SAN and auxiliary training data parallel, ensemble members one per GPU
if [ "$NGPU" -gt 1 ]; then
  step "run_gpus$NGPU" 900 .venv/bin/flowsan run gpu-check --run-name "gpu-check-$STAMP-gpus$NGPU" \
      --only 01_data 02_prototypes 03_aux_classifiers 04_flowsan --gpus "$NGPU"
fi
echo "failed steps: $fails; results in $OUT" | tee -a "$OUT/steps.txt"
exit $fails
