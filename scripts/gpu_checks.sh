#!/usr/bin/env bash
# Everything we run on the offline GPU machine, part by part, each under its own time limit so one slow
# part cannot lose the others' results. The device returns only about eight files per call, so OUTDIR ends
# with two: results.tar.gz (every log, report and profiler table) and kcache.tar.xz (the kernel caches,
# in 15 MiB pieces when larger).
#   bash scripts/gpu_checks.sh OUTDIR PART... [-- TRAIN ARGS...]
# PARTs: tests (gpu-marked tests), bench (all benchmark cases), train (50 bf16 proxy steps),
#        parallel (per-step losses at TP=2 and EP=2 against one GPU; needs 2 GPUs).
# TESTS: the gpu-test paths (default tests/ops tests/model). Limits per part (seconds): TESTS_S, BENCH_S, TRAIN_S, PARALLEL_S (defaults below); BENCH_ARGS: benchmark
# cases and options (default: all cases); PARALLEL_LAYOUTS: layouts of the parallel part (default tp2 ep2).
# Carry .gpu-wheels/site.tar.xz and .gpu-data (tokenizer + tokenised c4 sample, kernel caches).
set -uo pipefail
final=${1:?OUTDIR}; shift
out=$final/results
parts=(); while [ $# -gt 0 ] && [ "$1" != "--" ]; do parts+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
mkdir -p "$out"
source scripts/gpu_env.sh
[ -d /tmp/gd ] || { mkdir -p /tmp/gd && tar -xJf .gpu-data/gpu-data.tar.xz -C /tmp/gd; }
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton, fla, tilelang, megatron.core as m; print('torch', torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__, 'tilelang', tilelang.__version__, 'mcore', m.__version__)" | tee -a "$out/gpu.txt"
quiet() { grep -v "Warning\|warnings.warn\|TileLang\|param.main_grad\|^\s*$"; }
rc=0
for part in "${parts[@]}"; do
  case $part in
    # SIGINT at the limit: pytest then still prints its failures and summary; the log keeps everything.
    tests) timeout -s INT -k 30 "${TESTS_S:-400}" python3 -m pytest -v -rfEs -s -m gpu -o addopts="" \
             -p no:cacheprovider ${TESTS:-tests/ops tests/model} 2>&1 | tee "$out/gpu_tests.log" | quiet ;;
    bench) timeout "${BENCH_S:-480}" python3 -m benchmarks.run --out "$out" ${BENCH_ARGS:-} 2>&1 | quiet | tee "$out/bench.log" ;;
    train) timeout "${TRAIN_S:-300}" python3 -m qwen3_next_mcore train --preset proxy --tokenizer /tmp/gd/tok \
             --data-path /tmp/gd/data/c4_text_document --split 100,0,0 --seq-length 4096 --micro-batch-size 1 \
             --global-batch-size 2 --train-iters 50 --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 5 --bf16 \
             --log-json "$out/train.jsonl" "$@" 2>&1 | grep "iteration\|Error\|error\|trained" | tee "$out/train.log" ;;
    parallel) timeout "${PARALLEL_S:-480}" python3 scripts/parallel_losses.py --out "$out/parallel" --hf-dir /tmp/pl_hf --preset proxy \
             --experts 16 --steps 20 --bf16 --layouts ${PARALLEL_LAYOUTS:-tp2 ep2} --data-path /tmp/gd/data/c4_text_document \
             --tokenizer /tmp/gd/tok 2>&1 | quiet | tail -40 | tee "$out/parallel.log" ;;
    *) echo "unknown part $part (tests, bench, train, parallel)"; rc=2; continue ;;
  esac
  rc=$((rc | $?))
done
gpu_cache_pack "$final"
tar -czf "$final/results.tar.gz" -C "$final" results && rm -rf "$out"
exit $rc
