#!/usr/bin/env bash
# GPU checks on the offline test machine (see scripts/gpu_env.sh): the gpu-marked tests, then a bf16
# proxy-preset training run. Usage: bash scripts/gpu_checks.sh OUTDIR [tests|train|all] [TRAIN ARGS...]
# Carry .gpu-wheels/site.tar.xz and .gpu-data/gpu-data.tar.xz (a tokenizer and the c4 sample, tokenised).
set -uo pipefail
out=${1:?OUTDIR}; what=${2:-all}; shift 2 || true
mkdir -p "$out"
source scripts/gpu_env.sh
[ -d /tmp/gd ] || { mkdir -p /tmp/gd && tar -xJf .gpu-data/gpu-data.tar.xz -C /tmp/gd; }
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton, fla, tilelang, megatron.core as m; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__, 'tilelang', tilelang.__version__, 'mcore', m.__version__)" | tee -a "$out/gpu.txt"
rc=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  python3 -m pytest -q -rs -s -m gpu -o addopts="" -p no:cacheprovider ${GPU_TESTS:-tests/ops tests/model} 2>&1 | tee "$out/gpu_tests.log"
  rc=$((rc | $?))
fi
if [ "$what" = train ] || [ "$what" = all ]; then
  python3 -m qwen3_next_mcore train --preset proxy --tokenizer /tmp/gd/tok \
    --data-path /tmp/gd/data/c4_text_document --split 100,0,0 --seq-length 4096 --micro-batch-size 2 \
    --global-batch-size 2 --train-iters 50 --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 5 --bf16 \
    --log-json "$out/train.jsonl" "$@" 2>&1 | tee "$out/train.log"
  rc=$((rc | $?))
fi
gpu_cache_pack "$out"
exit $rc
