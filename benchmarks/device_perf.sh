#!/usr/bin/env bash
# The GPU half of the performance benchmarks (workloads a, b, c), for one CUDA GPU (the lent H100):
#   bash benchmarks/device_perf.sh [OUT_DIR] [PART...]   # writes gpu-<gpu>-*.json there (default benchmarks/results)
# PART: tests | vit | llama | sweep (default: all four). One file per workload: compiled variants (reduce-overhead
# through doran.compile_model, the Lightning modules' default on a GPU), eager ones and PEFT's DoRA in one run,
# so every ratio is from one process (about 4 min for vit, 3 for llama on an H200), then every variant again in
# 6 interleaved rounds (ROUNDS=0: none; step_time.py interleaved_rounds: the GPU's clocks drift over a run,
# so the rounds' ratios are the fairer ones; the models stay alive, so the run needs ~8x one variant's memory). ALL=1 adds the other
# execution modes and PEFT's LoRA (twice as long). On a copied tree, export DORAN_GIT_COMMIT (and
# DORAN_GIT_DIRTY) first so the files name the code.
set -euo pipefail
out=${1:-benchmarks/results}
shift || true
parts=${*:-tests vit llama sweep}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).lower().replace('nvidia', '').split()[0])")
VARIANTS="lora@compile-ro dora@compile-ro doran@compile-ro peft-dora base lora dora doran"
if [ "${ALL:-0}" = 1 ]; then
    VARIANTS="$VARIANTS doran@compile-ro-nobank doran@compile-ro-ref peft-lora doran@nobank doran@reference"
fi
for part in $parts; do
    case $part in
        tests)
            python3 -m pytest -q -m gpu -p no:cacheprovider -p no:logging --tb=short tests/test_fused.py \
                tests/test_compiling.py tests/test_packing.py || echo 'GPU TESTS FAILED (see above)' ;;
        vit|llama)
            nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
            # shellcheck disable=SC2086
            python3 -m benchmarks.step_time --workload "$part" --inference --phases --all-kernels \
                --rounds "${ROUNDS:-6}" --variants $VARIANTS --out "$out/gpu-$gpu-$part.json" ;;
        sweep)
            python3 -m benchmarks.step_time --layer-sweep --out "$out/gpu-$gpu-layer-sweep.json" ;;
        *) echo "unknown part $part (tests | vit | llama | sweep)"; exit 2 ;;
    esac
done
