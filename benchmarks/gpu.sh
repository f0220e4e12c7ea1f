#!/usr/bin/env bash
# The CUDA paths in one run (under 8 minutes on one GPU); figures go to benchmarks/GPU_RESULTS.md
# (or $OUT_FILE). Needs a Python with a CUDA build of torch and this package's test extra
# (onnxruntime-gpu in place of onnxruntime for the serving part): set PYTHON to it.
#   1. compiled bf16 LoRA training against PEFT and the frozen-base floor (bench_limit.py, wide shape);
#   2. ONNX Runtime CUDA latency, merged vs unmerged, and KV-cache generation (bench_gpu_serving.py).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT_FILE=${OUT_FILE:-benchmarks/GPU_RESULTS.md}
gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no GPU found")
printf '# GPU results\n\nGPU: %s; %s\n' "$gpu" "$(date -u +%Y-%m-%d)" > "$OUT_FILE"
status=0
timeout 330 "$PYTHON" benchmarks/bench_limit.py --device cuda --shapes wide --rounds 5 --steps 3 \
    --write --results "$OUT_FILE" || status=1
timeout 150 "$PYTHON" benchmarks/bench_gpu_serving.py --repeats 50 --results "$OUT_FILE" || status=1
cat "$OUT_FILE"
exit $status
