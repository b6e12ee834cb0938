#!/usr/bin/env bash
# The language-model arm on 1 and 2 GPUs of one host, with a random-init LLaMA of about 1.1B parameters
# (experiments/configs/lm_multigpu.yaml); numbers in docs/performance.md:
#   curves:     the same run (global batch 16, 60 steps) on 1 GPU, on 2 GPUs with DDP, and with a float32 base
#               on 1 GPU and on 2 GPUs with FSDP;
#   throughput: global batch 64 on 1 GPU and on 2 GPUs with DDP, 30 steps, LoRA and DoRAN.
# Usage: bash benchmarks/gpu_multigpu.sh curves|throughput. Result files and a table go to $OUT (default
# /tmp/out); the runs themselves to experiments/results/lm-multigpu/<part>.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
part=${1:-curves}
RES=experiments/results/lm-multigpu/$part
mkdir -p "$OUT" "$RES"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, lightning, transformers; print('torch', torch.__version__, 'lightning', lightning.__version__, 'transformers', transformers.__version__, 'gpus', torch.cuda.device_count())"
lm() { python3 -m experiments.run_lm --config experiments/configs/lm_multigpu.yaml runtime.progress_bar=false "$@" 2>&1 | grep -E "run_lm\]|Error|error" | tail -3; }
if [ "$part" = curves ]; then
  lm out=$RES train.devices=1 train.batch_size=16
  lm out=$RES train.devices=2 train.batch_size=8 train.strategy=ddp
  lm out=$RES-fp32 train.devices=1 train.batch_size=16 model.dtype=float32
  lm out=$RES-fp32 train.devices=2 train.batch_size=8 train.strategy=fsdp model.dtype=float32
else
  # throughput: diagnostics off (the per-step tau / magnitude records synchronise the GPU), LoRA and DoRAN
  for method in lora doran; do
    lm out=$RES method=$method diagnostics.every_n_steps=100000 train.devices=1 train.batch_size=64 train.max_steps=30
    lm out=$RES method=$method diagnostics.every_n_steps=100000 train.devices=2 train.batch_size=32 train.max_steps=30 train.strategy=ddp
  done
fi
for f in $RES/*.json $RES-fp32/*.json; do [ -f "$f" ] && cp "$f" "$OUT/${part}-$(basename "$f")"; done
python3 -m experiments.multigpu_report $RES/*.json $(ls $RES-fp32/*.json 2>/dev/null) | tee "$OUT/multigpu_${part}.md"
