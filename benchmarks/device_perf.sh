#!/usr/bin/env bash
# The GPU half of the performance benchmarks (workloads a, b, c), for one CUDA GPU (the lent H100):
#   bash benchmarks/device_perf.sh [OUT_DIR]        # writes gpu-*.json there (default benchmarks/results)
# The GPU tests of the fused path run first: a variant is timed only if its maths checked out.
set -euo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fused.py
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
python3 -m benchmarks.step_time --workload vit llama --inference \
    --variants base lora dora doran lora@reference dora@reference doran@reference peft-lora peft-dora \
    --out "$out/gpu-models.json"
python3 -m benchmarks.step_time --layer-sweep --out "$out/gpu-layer-sweep.json"
