"""``qwen3-next-mcore train``: the reference training loop (continued pretraining or SFT).

Runs in one process (a local gloo/NCCL group of one) or under ``torchrun`` (one process per GPU), e.g.::

    torchrun --nproc-per-node 8 -m qwen3_next_mcore train --hf-dir /ckpt/Qwen3-Next-80B-A3B-Instruct \\
        --data-path data/c4 --seq-length 4096 --micro-batch-size 1 --global-batch-size 256 \\
        --expert-model-parallel-size 8 --bf16 --use-distributed-optimizer --train-iters 1000 --save out
"""

from __future__ import annotations

import argparse


def register(sub, name: str, help_text: str) -> None:
    from ..training.arguments import build_parser

    p = sub.add_parser(name, help=help_text, description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    build_parser(p)
    p.set_defaults(func=_train)


def _train(args) -> int:
    from ..training.arguments import config_from_namespace

    cfg = config_from_namespace(args)  # validate before importing torch/megatron-core
    import sys

    from .. import parallel
    from ..training.loop import TrainingDiverged, train

    try:
        metrics = train(cfg)
    except TrainingDiverged as e:
        print(f"qwen3-next-mcore train: error: {e}", file=sys.stderr)
        return 3
    finally:
        parallel.destroy()
    if metrics:
        last = metrics[-1]
        print(f"trained {len(metrics)} iterations; last lm loss {last['lm_loss']:.6f}")
    return 0
