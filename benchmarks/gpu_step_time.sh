#!/usr/bin/env bash
# Step time of every variant on one CUDA GPU: ViT-B/16 (batch 64) and a LLaMA-shaped model (4 x 512), and the
# single-layer sweep. Numbers and how to read them: docs/performance.md.
#   bash benchmarks/gpu_step_time.sh [OUT_DIR] [PART...]   # writes gpu-<gpu>-<part>.json (default benchmarks/results)
# PART: tests | vit | llama | sweep (default: all four). tests runs the GPU tests of the fast path first.
# One file per workload, every ratio from one process: our LoRA, DoRA and DoRAN compiled (doran.compile_model
# with CUDA graphs, the Lightning modules' default on a GPU) and eager, PEFT's DoRA and the base model (about
# 4 min for vit and 3 for llama on an H200). Then every variant is timed again in ROUNDS interleaved rounds
# (default 6; ROUNDS=0: none): the GPU's clocks drift over a run, so the rounds' ratios are the fair ones; the
# models stay alive for them, so the run needs about 8x one variant's memory. ALL=1 adds the other execution
# modes and PEFT's LoRA (twice as long). On a copy of the tree without its git history, export
# DORAN_GIT_COMMIT (and DORAN_GIT_DIRTY) first so that the files name the code they ran.
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
