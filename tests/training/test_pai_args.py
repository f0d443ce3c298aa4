"""run_mcore_qwen3.sh's 27 positional arguments -> our options, argument by argument."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from qwen3_next_mcore.training.arguments import parse_args
from qwen3_next_mcore.training.pai_args import NAMES, command, launcher_args, pai_to_train_args

ROOT = Path(__file__).resolve().parents[2]

# the continued-pretraining example of the Pai-Megatron-Patch README
PRETRAIN = ["dsw", "A3B", "1", "8", "1e-5", "1e-6", "1024", "1024", "bf16", "1", "1", "1", "1", "8", "true", "true",
            "false", "false", "none", "false", "100000", "/data/mmap_qwen3_datasets_text_document",
            "/data/mmap_qwen3_datasets_text_document", "/ckpt/Qwen3-Next-80B-A3B-Instruct", "1000000000", "10000",
            "/out"]


def args(**changes) -> list[str]:
    values = dict(zip(NAMES, PRETRAIN))
    values.update(changes)
    return [values[n] for n in NAMES]


def opt(argv: list[str], name: str):
    """The value after ``name`` (True for a flag, None when absent)."""
    if name not in argv:
        return None
    i = argv.index(name)
    return argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else True


def test_pretraining_example_maps_and_validates():
    m = pai_to_train_args(PRETRAIN)
    a = m.train_args
    assert opt(a, "--hf-dir") == "/ckpt/Qwen3-Next-80B-A3B-Instruct" == opt(a, "--tokenizer")
    assert opt(a, "--micro-batch-size") == "1" and opt(a, "--global-batch-size") == "8"
    assert opt(a, "--lr") == "1e-5" and opt(a, "--min-lr") == "1e-6" and opt(a, "--seq-length") == "1024"
    assert opt(a, "--bf16") is True and opt(a, "--expert-model-parallel-size") == "8"
    assert opt(a, "--sequence-parallel") is None  # SP with TP=1 is dropped, with a note
    assert any("SP=true with TP=1" in n for n in m.notes)
    assert opt(a, "--use-distributed-optimizer") is True and opt(a, "--sft") is None
    assert opt(a, "--recompute-granularity") is None and opt(a, "--optimizer-cpu-offload") is None
    assert opt(a, "--save-interval") == "100000"
    assert opt(a, "--data-path") == "/data/mmap_qwen3_datasets_text_document"
    assert opt(a, "--train-iters") == str(10**9 // (8 * 1024))  # tokens -> iterations
    assert opt(a, "--lr-warmup-iters") == str(10000 // (8 * 1024))
    assert opt(a, "--save") == "/out/checkpoint" and opt(a, "--log-json") == "/out/log/metrics.jsonl"
    assert opt(a, "--lr-decay-style") == "cosine" and opt(a, "--clip-grad") == "1.0"
    cfg = parse_args(a)  # our own validation accepts it
    assert cfg.train_iters == 122070 and cfg.lr_warmup_iters == 1 and cfg.bf16


def test_sft_counts_iterations_and_uses_pad_len():
    m = pai_to_train_args(args(SFT="true", SEQ_LEN="2048", PAD_LEN="1024", DATASET_PATH="/d/train.json",
                               VALID_DATASET_PATH="/d/valid.json", TRAIN_TOKENS_OR_ITERS="10000",
                               WARMUP_TOKENS_OR_ITERS="100"),
                          {"MP_DATASET_TYPE": "raw", "MP_SFT_PACKING": "true"})
    a = m.train_args
    assert opt(a, "--sft") is True and opt(a, "--sft-packing") is True
    assert opt(a, "--train-data") == "/d/train.json" and opt(a, "--valid-data") == "/d/valid.json"
    assert opt(a, "--seq-length") == "1024" and opt(a, "--train-iters") == "10000"
    assert opt(a, "--lr-warmup-iters") == "100" and opt(a, "--data-path") is None
    assert parse_args(a).sft


@pytest.mark.parametrize("changes, env, expected", [
    ({"AC": "sel"}, {}, ["--recompute-granularity", "selective"]),
    ({"AC": "full"}, {"MP_AC_LAYERS": "2"},
     ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "2"]),
    ({"AC": "offload"}, {"MP_AC_LAYERS": "3"}, ["--cpu-offloading", "--cpu-offloading-num-layers", "3"]),
    ({"PR": "fp16"}, {}, ["--fp16"]),
    ({"PR": "fp8"}, {}, ["--bf16", "--fp8-format", "hybrid", "--transformer-impl", "transformer_engine"]),
    ({"TP": "2", "SP": "true"}, {}, ["--sequence-parallel"]),
    ({"OPTIMIZER_OFFLOAD": "0.5"}, {}, ["--optimizer-cpu-offload", "--optimizer-offload-fraction", "0.5"]),
    ({"PP": "2", "ETP": "1", "CP": "1"}, {}, ["--pipeline-model-parallel-size", "2"]),
])
def test_single_arguments(changes, env, expected):
    a = pai_to_train_args(args(**changes), env).train_args
    joined = " ".join(a)
    assert " ".join(expected) in joined
    parse_args(a)


@pytest.mark.parametrize("changes, env, message", [
    ({"ENV": "k8s"}, {}, "ENV='k8s'"),
    ({"MODEL_SIZE": "A22B"}, {}, "MODEL_SIZE='A22B'"),
    ({"PR": "fp4"}, {}, "PR='fp4'"),
    ({"AC": "swap"}, {}, "AC='swap'"),
    ({"SP": "maybe"}, {}, "SP='maybe'"),
    ({"OPTIMIZER_OFFLOAD": "2"}, {}, "OPTIMIZER_OFFLOAD='2'"),
    ({"OPTIMIZER_OFFLOAD": "0.5", "DO": "false"}, {}, "needs DO=true"),
    ({"TRAIN_TOKENS_OR_ITERS": "100"}, {}, "fewer tokens than one iteration"),
    ({"TP": "x"}, {}, "TP='x'"),
    ({}, {"MP_DATASET_TYPE": "raw"}, "MP_DATASET_TYPE=raw is for SFT"),
])
def test_bad_arguments_are_named(changes, env, message):
    with pytest.raises(ValueError, match=message):
        pai_to_train_args(args(**changes), env)


def test_wrong_argument_count():
    with pytest.raises(ValueError, match="takes 27 arguments"):
        pai_to_train_args(PRETRAIN[:-1])


def test_megatron_checkpoint_is_loaded(tmp_path):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("10\n")
    a = pai_to_train_args(args(PRETRAIN_CHECKPOINT_PATH=str(tmp_path))).train_args
    assert opt(a, "--load") == str(tmp_path) and opt(a, "--preset") == "qwen3-next-80b-a3b"
    assert opt(a, "--hf-dir") is None


def test_launchers():
    assert launcher_args("dsw", {}, 8)[:2] == ["--nproc-per-node", "8"]
    env = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "23456", "WORLD_SIZE": "4", "RANK": "2",
           "KUBERNETES_CONTAINER_RESOURCE_GPU": "8"}
    dlc = launcher_args("dlc", env, 1)
    assert dlc == ["--nproc-per-node", "8", "--nnodes", "4", "--node-rank", "2", "--master-addr", "10.0.0.1",
                   "--master-port", "23456"]
    with pytest.raises(ValueError, match="needs MASTER_ADDR"):
        launcher_args("dlc", {}, 8)
    cmd, _ = command(PRETRAIN, {}, 8)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and cmd[cmd.index("qwen3_next_mcore") + 1] == "train"


def test_shell_script_dry_run():
    env = dict(os.environ, DRY_RUN="1", GPUS_PER_NODE="8", PYTHON=str(ROOT / ".venv" / "bin" / "python"))
    out = subprocess.run(["bash", str(ROOT / "examples" / "run_mcore_qwen3.sh"), *PRETRAIN], env=env, check=False,
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "torch.distributed.run --nproc-per-node 8" in out.stdout and "qwen3_next_mcore train" in out.stdout
    bad = subprocess.run(["bash", str(ROOT / "examples" / "run_mcore_qwen3.sh"), "dsw"], env=env, check=False,
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert bad.returncode == 2 and "takes 27 arguments" in bad.stderr
