"""Pai-Megatron-Patch's ``run_mcore_qwen3.sh`` interface, mapped onto ``qwen3-next-mcore train``.

``examples/run_mcore_qwen3.sh`` passes its 27 positional arguments here; :func:`pai_to_train_args` maps
them (plus ``MP_DATASET_TYPE``, ``MP_AC_LAYERS``, ``MP_SFT_PACKING``) argument by argument onto our
options, :func:`launcher_args` turns ``ENV=dsw|dlc`` into ``torchrun`` options, and :func:`main` runs
(or, with ``--dry-run``, prints) the command. The table is in docs/training.md.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

NAMES = (
    "ENV", "MODEL_SIZE", "BATCH_SIZE", "GLOBAL_BATCH_SIZE", "LR", "MIN_LR", "SEQ_LEN", "PAD_LEN", "PR", "TP", "PP",
    "CP", "ETP", "EP", "SP", "DO", "FL", "SFT", "AC", "OPTIMIZER_OFFLOAD", "SAVE_INTERVAL", "DATASET_PATH",
    "VALID_DATASET_PATH", "PRETRAIN_CHECKPOINT_PATH", "TRAIN_TOKENS_OR_ITERS", "WARMUP_TOKENS_OR_ITERS",
    "OUTPUT_BASEPATH",
)
PRESETS = {"A3B": "qwen3-next-80b-a3b"}
# what Pai's script fixes and we keep
FIXED = ["--lr-decay-style", "cosine", "--weight-decay", "0.01", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
         "--clip-grad", "1.0", "--eval-interval", "10000", "--eval-iters", "10", "--log-interval", "1"]


class PaiMapping(NamedTuple):
    train_args: list[str]  # options of ``qwen3-next-mcore train``
    notes: list[str]  # arguments accepted but changed or ignored, and why


def _bool(name: str, value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"{name}={value!r}: expected true or false")


def _int(name: str, value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected an integer") from None
    if n < 0:
        raise ValueError(f"{name}={value!r}: expected an integer >= 0")
    return n


def pai_to_train_args(positional: Sequence[str], env: Mapping[str, str] | None = None) -> PaiMapping:
    """Map the 27 positional arguments of ``run_mcore_qwen3.sh`` (and its environment variables) onto
    ``qwen3-next-mcore train`` options. Raises ValueError naming the argument for what we cannot honour."""
    env = env or {}
    if len(positional) != len(NAMES):
        raise ValueError(f"run_mcore_qwen3.sh takes {len(NAMES)} arguments ({' '.join(NAMES)}), got {len(positional)}")
    a = dict(zip(NAMES, (str(v) for v in positional)))
    out: list[str] = []
    notes: list[str] = []

    if a["ENV"] not in ("dsw", "dlc"):
        raise ValueError(f"ENV={a['ENV']!r}: expected dsw (one machine) or dlc (several)")
    if a["MODEL_SIZE"] not in PRESETS:
        raise ValueError(f"MODEL_SIZE={a['MODEL_SIZE']!r}: expected one of {', '.join(PRESETS)}")
    ckpt = Path(a["PRETRAIN_CHECKPOINT_PATH"])
    if (ckpt / "latest_checkpointed_iteration.txt").is_file():
        out += ["--preset", PRESETS[a["MODEL_SIZE"]], "--load", str(ckpt)]
        notes.append("PRETRAIN_CHECKPOINT_PATH is a megatron checkpoint: loaded with --load")
    else:
        # a HF checkpoint folder: the architecture, the weights and the tokenizer all come from it
        out += ["--hf-dir", str(ckpt), "--tokenizer", str(ckpt)]

    sft = _bool("SFT", a["SFT"])
    mbs, gbs = _int("BATCH_SIZE", a["BATCH_SIZE"]), _int("GLOBAL_BATCH_SIZE", a["GLOBAL_BATCH_SIZE"])
    seq, pad = _int("SEQ_LEN", a["SEQ_LEN"]), _int("PAD_LEN", a["PAD_LEN"])
    out += ["--micro-batch-size", str(mbs), "--global-batch-size", str(gbs), "--lr", a["LR"], "--min-lr", a["MIN_LR"]]
    # SFT rows are PAD_LEN long (Pai pads every sample to it); pretraining samples are SEQ_LEN long
    out += ["--seq-length", str(pad if sft else seq)]
    if sft and pad != seq:
        notes.append(f"SFT: rows are PAD_LEN={pad} tokens (SEQ_LEN={seq} not used)")

    pr = a["PR"]
    if pr == "bf16":
        out.append("--bf16")
    elif pr == "fp16":
        out.append("--fp16")
    elif pr == "fp8":  # Pai's fp8: TE's hybrid format (e4m3 forward, e5m2 gradients), delayed scaling
        out += ["--bf16", "--fp8-format", "hybrid", "--transformer-impl", "transformer_engine"]
        notes.append("PR=fp8: FP8 GEMMs through Transformer Engine (--fp8-format hybrid); the GDN recurrence "
                     "and attention stay bf16")
    else:
        raise ValueError(f"PR={pr!r}: expected bf16, fp16 or fp8")

    tp = _int("TP", a["TP"])
    for name, opt in (("TP", "--tensor-model-parallel-size"), ("PP", "--pipeline-model-parallel-size"),
                      ("CP", "--context-parallel-size"), ("ETP", "--expert-tensor-parallel-size"),
                      ("EP", "--expert-model-parallel-size")):
        out += [opt, str(_int(name, a[name]))]
    if _bool("SP", a["SP"]):
        if tp > 1:
            out.append("--sequence-parallel")
        else:
            notes.append("SP=true with TP=1: sequence parallelism dropped (Megatron-LM does the same)")
    do = _bool("DO", a["DO"])
    if do:
        out.append("--use-distributed-optimizer")
    if _bool("FL", a["FL"]):
        notes.append("FL=true: attention kernels are chosen by the model backend (flash via Transformer Engine)")
    if sft:
        out.append("--sft")

    ac = a["AC"]
    layers = env.get("MP_AC_LAYERS", "1")
    if ac == "sel":
        out += ["--recompute-granularity", "selective"]
    elif ac == "full":
        out += ["--recompute-granularity", "full", "--recompute-method", "uniform",
                "--recompute-num-layers", str(_int("MP_AC_LAYERS", layers) or 1)]
    elif ac == "offload":
        out += ["--cpu-offloading", "--cpu-offloading-num-layers", str(_int("MP_AC_LAYERS", layers) or 1)]
    elif ac != "none":
        raise ValueError(f"AC={ac!r}: expected sel, full, offload or none")

    off = a["OPTIMIZER_OFFLOAD"]
    if off.lower() != "false":
        try:
            fraction = float(off)
        except ValueError:
            raise ValueError(f"OPTIMIZER_OFFLOAD={off!r}: expected false or a fraction in [0, 1]") from None
        if not 0 <= fraction <= 1:
            raise ValueError(f"OPTIMIZER_OFFLOAD={off!r}: expected false or a fraction in [0, 1]")
        if not do:
            raise ValueError("OPTIMIZER_OFFLOAD needs DO=true (it offloads the distributed optimizer)")
        out += ["--optimizer-cpu-offload", "--optimizer-offload-fraction", str(fraction)]

    out += ["--save-interval", str(_int("SAVE_INTERVAL", a["SAVE_INTERVAL"]))]
    dtype = env.get("MP_DATASET_TYPE", "idxmap")
    if dtype not in ("idxmap", "raw"):
        raise ValueError(f"MP_DATASET_TYPE={dtype!r}: expected idxmap or raw")
    if sft:
        out += ["--train-data", a["DATASET_PATH"], "--valid-data", a["VALID_DATASET_PATH"]]
        if _bool("MP_SFT_PACKING", env.get("MP_SFT_PACKING", "false")):
            out.append("--sft-packing")
    else:
        if dtype == "raw":
            raise ValueError("MP_DATASET_TYPE=raw is for SFT; pretraining reads .bin/.idx (preprocess pretrain)")
        out += ["--data-path", a["DATASET_PATH"], "--valid-data", a["VALID_DATASET_PATH"]]

    train, warmup = (_int("TRAIN_TOKENS_OR_ITERS", a["TRAIN_TOKENS_OR_ITERS"]),
                     _int("WARMUP_TOKENS_OR_ITERS", a["WARMUP_TOKENS_OR_ITERS"]))
    if not sft:  # pretraining counts tokens: iterations = tokens / (global batch * sequence length)
        train, warmup = train // (gbs * seq), warmup // (gbs * seq)
        if train == 0:
            raise ValueError(f"TRAIN_TOKENS_OR_ITERS={a['TRAIN_TOKENS_OR_ITERS']}: fewer tokens than one "
                             f"iteration ({gbs} x {seq})")
    out += ["--train-iters", str(train), "--lr-warmup-iters", str(warmup)]

    base = Path(a["OUTPUT_BASEPATH"])
    out += ["--save", str(base / "checkpoint"), "--log-json", str(base / "log" / "metrics.jsonl")]
    return PaiMapping(out + FIXED, notes)


def launcher_args(env_type: str, env: Mapping[str, str], gpus_per_node: int) -> list[str]:
    """``torchrun`` options: ``dsw`` is one machine; ``dlc`` reads PAI-DLC's ``MASTER_ADDR``,
    ``MASTER_PORT``, ``WORLD_SIZE`` (machines) and ``RANK`` (this machine)."""
    if env_type == "dsw":
        return ["--nproc-per-node", str(gpus_per_node), "--nnodes", "1", "--node-rank", "0",
                "--master-addr", "localhost", "--master-port", env.get("MASTER_PORT", "29500")]
    if env_type == "dlc":
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK") if k not in env]
        if missing:
            raise ValueError(f"ENV=dlc needs {', '.join(missing)} in the environment (set by PAI-DLC)")
        gpus = env.get("KUBERNETES_CONTAINER_RESOURCE_GPU", str(gpus_per_node))
        return ["--nproc-per-node", gpus, "--nnodes", env["WORLD_SIZE"], "--node-rank", env["RANK"],
                "--master-addr", env["MASTER_ADDR"], "--master-port", env["MASTER_PORT"]]
    raise ValueError(f"ENV={env_type!r}: expected dsw or dlc")


def command(positional: Sequence[str], env: Mapping[str, str], gpus_per_node: int) -> tuple[list[str], list[str]]:
    """(the full torchrun command, notes)."""
    mapping = pai_to_train_args(positional, env)
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher_args(str(positional[0]), env, gpus_per_node),
           "-m", "qwen3_next_mcore", "train", *mapping.train_args]
    return cmd, mapping.notes


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    dry = "--dry-run" in argv
    if dry:
        argv.remove("--dry-run")
    gpus = int(os.environ.get("GPUS_PER_NODE", "0"))
    if not gpus:
        import torch

        gpus = max(1, torch.cuda.device_count())
    try:
        cmd, notes = command(argv, os.environ, gpus)
    except ValueError as e:
        print(f"run_mcore_qwen3.sh: error: {e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"run_mcore_qwen3.sh: note: {note}", file=sys.stderr)
    print(shlex.join(cmd), flush=True)
    if dry:
        return 0
    os.execvp(cmd[0], cmd)
    return 0  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
