#!/usr/bin/env bash
# Pai-Megatron-Patch's examples/qwen3_next/run_mcore_qwen3.sh interface on qwen3-next-mcore.
#
#   bash examples/run_mcore_qwen3.sh ENV MODEL_SIZE BATCH_SIZE GLOBAL_BATCH_SIZE LR MIN_LR SEQ_LEN PAD_LEN PR \
#       TP PP CP ETP EP SP DO FL SFT AC OPTIMIZER_OFFLOAD SAVE_INTERVAL DATASET_PATH VALID_DATASET_PATH \
#       PRETRAIN_CHECKPOINT_PATH TRAIN_TOKENS_OR_ITERS WARMUP_TOKENS_OR_ITERS OUTPUT_BASEPATH
#
# Environment: MP_DATASET_TYPE (idxmap|raw), MP_AC_LAYERS, MP_SFT_PACKING (true|false); ENV=dlc reads
# MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK as PAI-DLC sets them; GPUS_PER_NODE overrides the GPU count.
# The mapping onto `qwen3-next-mcore train` is qwen3_next_mcore/training/pai_args.py (table: docs/training.md);
# it prints the torchrun command, then runs it. DRY_RUN=1 only prints it.
set -euo pipefail
PYTHON=${PYTHON:-python}
if [[ "${DRY_RUN:-0}" == "1" ]]; then
  exec "$PYTHON" -m qwen3_next_mcore.training.pai_args --dry-run "$@"
fi
exec "$PYTHON" -m qwen3_next_mcore.training.pai_args "$@"
