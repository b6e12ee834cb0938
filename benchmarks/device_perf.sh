#!/usr/bin/env bash
# The GPU half of the performance benchmarks (workloads a, b, c), for one CUDA GPU (the lent H100):
#   bash benchmarks/device_perf.sh [OUT_DIR]        # writes gpu-*.json there (default benchmarks/results)
# On a copied tree, export DORAN_GIT_COMMIT (and DORAN_GIT_DIRTY) first so the result files name the code.
# The GPU tests of the fused path run first; every variant is also checked against the reference before timing.
set -euo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fused.py || echo 'GPU TESTS FAILED (see above)'
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
python3 -m benchmarks.step_time --workload vit llama --inference \
    --variants base lora dora doran doran@nobank doran@reference peft-lora peft-dora \
    --out "$out/gpu-h100-eager.json"
python3 -m benchmarks.step_time --layer-sweep --out "$out/gpu-h100-layer-sweep.json"
python3 -m benchmarks.step_time --workload llama --variants lora@compile-ro doran@compile-ro --steps 10 \
    --out "$out/gpu-h100-compile-llama.json"
