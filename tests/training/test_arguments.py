"""TrainConfig validation and the Megatron-LM style command line (no model is built here)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from qwen3_next_mcore.training.arguments import TrainConfig, make_config, parse_args

BASE = ["--preset", "tiny", "--data-path", "data/c4"]


def test_megatron_option_names_map_to_fields():
    cfg = parse_args(BASE + [
        "--micro-batch-size", "2", "--global-batch-size", "16", "--seq-length", "256", "--lr", "1e-4",
        "--min-lr", "1e-5", "--lr-warmup-iters", "5", "--train-iters", "50", "--exit-interval", "20",
        "--seed", "7", "--tensor-model-parallel-size", "2", "--sequence-parallel",
        "--expert-model-parallel-size", "4", "--expert-tensor-parallel-size", "1",
        "--pipeline-model-parallel-size", "1", "--use-distributed-optimizer", "--bf16",
        "--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1",
        "--mtp-loss-scaling-factor", "0.2", "--moe-aux-loss-coeff", "0.01", "--optimizer-cpu-offload",
        "--optimizer-offload-fraction", "0.5", "--save", "out", "--save-interval", "10",
        "--eval-interval", "10", "--eval-iters", "2", "--log-json", "m.jsonl"])
    assert cfg.micro_batch_size == 2 and cfg.global_batch_size == 16 and cfg.seq_length == 256
    assert cfg.tensor_model_parallel_size == 2 and cfg.sequence_parallel and cfg.expert_model_parallel_size == 4
    assert cfg.bf16 and not cfg.fp16 and cfg.use_distributed_optimizer and cfg.optimizer_offload_fraction == 0.5
    assert cfg.recompute_granularity == "full" and cfg.recompute_num_layers == 1
    assert cfg.data_path == ("data/c4",) and cfg.decay_iters == 50
    assert [i for i in range(1, 51) if cfg.stops_after(i)] == [20, 40, 50]
    assert cfg.model().hidden_size == 64


def test_defaults_and_blend():
    cfg = parse_args(["--preset", "tiny", "--data-path", "0.3", "a", "0.7", "b"])
    assert cfg.data_path == ("0.3", "a", "0.7", "b")
    assert cfg.adam_beta1 == 0.9 and cfg.adam_beta2 == 0.95 and cfg.weight_decay == 0.01 and cfg.clip_grad == 1.0
    assert cfg.lr_decay_style == "cosine" and not cfg.bf16 and cfg.global_batch_size is None


def test_frozen_and_no_extra_fields():
    cfg = parse_args(BASE)
    with pytest.raises(ValidationError):
        cfg.lr = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="--not-a-field"):
        make_config(preset="tiny", data_path=("x",), not_a_field=1)


@pytest.mark.parametrize("argv, message", [
    (["--micro-batch-size", "0"], r"--micro-batch-size=0"),
    (["--micro-batch-size", "3", "--global-batch-size", "8"], r"--global-batch-size=8: must be a multiple"),
    (["--bf16", "--fp16"], "mutually exclusive"),
    (["--lr", "1e-5", "--min-lr", "1e-4"], r"--min-lr=0.0001"),
    (["--sequence-parallel"], "--sequence-parallel needs --tensor-model-parallel-size"),
    (["--context-parallel-size", "2"], r"--context-parallel-size=2"),
    (["--save-interval", "5"], r"--save-interval=5: needs --save"),
    (["--recompute-method", "uniform"], r"--recompute-method='uniform'"),
    (["--optimizer-cpu-offload"], "needs --use-distributed-optimizer"),
    (["--optimizer-offload-fraction", "1.5"], r"--optimizer-offload-fraction=1.5"),
    (["--lr-warmup-iters", "20", "--train-iters", "10"], r"--lr-warmup-iters=20"),
    (["--sft-packing"], "need --sft"),
    (["--no-load-optim"], "--no-load-optim needs --load"),
    (["--finetune"], "--finetune needs --load"),
    (["--fp8-format", "hybrid"], r"--fp8-format='hybrid': FP8 GEMMs run inside a bf16/fp16 model"),
    (["--fp8-format", "hybrid", "--bf16"], r"--fp8-format='hybrid': FP8 needs Transformer Engine"),
    (["--cpu-offloading", "--recompute-granularity", "selective"], "mutually exclusive"),
    (["--experts-layout", "padded", "--expert-model-parallel-size", "2"], r"--experts-layout='padded': 'padded' needs"),
    (["--experts-layout", "padded", "--experts", "sequential"], r"--experts-layout='padded'"),
])
def test_bad_options_name_the_option(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_args(BASE + argv)


def test_model_and_data_sources_are_required():
    with pytest.raises(ValueError, match="no model"):
        parse_args(["--data-path", "x"])
    with pytest.raises(ValueError, match="pretraining needs --data-path"):
        parse_args(["--preset", "tiny"])
    with pytest.raises(ValueError, match="--sft needs --train-data"):
        parse_args(["--preset", "tiny", "--sft"])
    with pytest.raises(ValueError, match="not both"):
        parse_args(BASE + ["--model-config", "x.json"])
    assert parse_args(["--preset", "tiny", "--sft", "--train-data", "a.json", "--sft-packing"]).sft_packing


def test_cli_reports_bad_options(capsys):
    from qwen3_next_mcore.cli import main

    assert main(["train", "--preset", "tiny", "--data-path", "x", "--micro-batch-size", "0"]) == 2
    assert "--micro-batch-size=0" in capsys.readouterr().err
    assert isinstance(parse_args(BASE), TrainConfig)


def test_fp8_without_transformer_engine_is_refused_by_name():
    """--fp8-format runs through Transformer Engine's layers; where TE is missing the model build says so
    (never a silent bf16 run)."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed here")
    from qwen3_next_mcore.config import get_preset
    from qwen3_next_mcore.specs import get_qwen3_next_stack_spec

    cfg = parse_args(BASE + ["--fp8-format", "hybrid", "--bf16", "--transformer-impl", "transformer_engine"])
    assert cfg.fp8_format == "hybrid" and cfg.fp8_recipe == "delayed"
    with pytest.raises(ValueError, match="needs Transformer Engine"):
        get_qwen3_next_stack_spec(get_preset("tiny"), "te")
