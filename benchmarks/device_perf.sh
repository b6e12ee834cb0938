#!/usr/bin/env bash
# The GPU half of the performance benchmarks (workloads a, b, c), for one CUDA GPU (the lent H100):
#   bash benchmarks/device_perf.sh [OUT_DIR] [PART...]   # writes gpu-h100-*.json there (default benchmarks/results)
# PART: tests | vit | llama | sweep (default: all four). One file per workload: eager and compiled variants
# (reduce-overhead, the Lightning modules' default on a GPU) and PEFT in one run, so every ratio is from one
# process. On a copied tree, export DORAN_GIT_COMMIT (and DORAN_GIT_DIRTY) first so the files name the code.
set -euo pipefail
out=${1:-benchmarks/results}
shift || true
parts=${*:-tests vit llama sweep}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
VARIANTS="lora dora doran lora@compile-ro dora@compile-ro doran@compile-ro doran@compile-ro-nobank
          doran@compile-ro-ref peft-lora peft-dora base doran@nobank doran@reference"
for part in $parts; do
    case $part in
        tests)
            python3 -m pytest -q -m gpu -p no:cacheprovider -p no:logging --tb=short tests/test_fused.py \
                tests/test_compiling.py || echo 'GPU TESTS FAILED (see above)' ;;
        vit|llama)
            nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
            # shellcheck disable=SC2086
            python3 -m benchmarks.step_time --workload "$part" --inference --variants $VARIANTS \
                --out "$out/gpu-h100-$part.json" ;;
        sweep)
            python3 -m benchmarks.step_time --layer-sweep --out "$out/gpu-h100-layer-sweep.json" ;;
        *) echo "unknown part $part (tests | vit | llama | sweep)"; exit 2 ;;
    esac
done
