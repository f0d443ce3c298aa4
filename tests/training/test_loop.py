"""The reference loop on CPU: the loss falls (pretraining and SFT), resuming equals not stopping, the CLI
runs, the checkpoint layout is Megatron-LM's, and divergence stops with a clear error."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qwen3_next_mcore import parallel
from qwen3_next_mcore.training import TrainingDiverged, make_config, train
from qwen3_next_mcore.training.checkpoint import TRACKER


@pytest.fixture(autouse=True)
def _fresh_process_group():
    yield
    parallel.destroy()


def pretrain_fields(assets, **kw) -> dict:
    fields = {"model_config_path": assets["model_config"], "tokenizer": assets["tokenizer"],
                  "data_path": (str(assets["data"]),), "micro_batch_size": 2, "global_batch_size": 4, "seq_length": 64,
                  "lr": 3e-3, "min_lr": 3e-4, "lr_warmup_iters": 2, "train_iters": 24, "seed": 1234}
    return fields | kw


def test_pretraining_loss_falls(small_assets, tmp_path):
    log_json = tmp_path / "metrics.jsonl"
    metrics = train(make_config(**pretrain_fields(small_assets, log_json=log_json, eval_interval=12, eval_iters=1,
                                                  split="95,5,0")))
    losses = [m["lm_loss"] for m in metrics]
    assert len(losses) == 24
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first > 6.8  # ~ln(1024) at initialisation
    assert last < first - 0.6, losses
    rows = [json.loads(line) for line in log_json.read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, 25))
    assert rows[0]["lr"] == 0.0 and rows[2]["lr"] == pytest.approx(3e-3)  # warmup from 0, Megatron-LM's
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["mtp_loss"] > 0 for r in rows)
    assert rows[-1]["consumed_samples"] == 24 * 4
    valid = [r["valid_lm_loss"] for r in rows if "valid_lm_loss" in r]
    assert len(valid) == 2 and valid[1] < valid[0] < 6.9


def test_sft_loss_falls_with_packing(small_assets, shared_data):
    fields = {"model_config_path": small_assets["model_config"], "tokenizer": small_assets["tokenizer"], "sft": True,
                  "train_data": shared_data / "text" / "alpaca_zh_demo.json", "sft_packing": True,
                  "micro_batch_size": 1, "global_batch_size": 2, "seq_length": 256, "lr": 3e-3, "min_lr": 3e-4,
                  "lr_warmup_iters": 2, "train_iters": 16}
    losses = [m["lm_loss"] for m in train(make_config(**fields))]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.4, losses


def test_resume_equals_uninterrupted(small_assets, tmp_path):
    fields = pretrain_fields(small_assets, train_iters=6)
    full = [m["lm_loss"] for m in train(make_config(**fields))]
    parallel.destroy()
    save = tmp_path / "ckpt"
    first = train(make_config(**fields, save=save, exit_interval=3))
    assert (save / TRACKER).read_text().strip() == "3"
    assert (save / "iter_0000003" / "metadata.json").is_file()
    assert not list(save.glob("*.tmp"))
    parallel.destroy()
    rest = train(make_config(**fields, load=save))
    assert [m["iteration"] for m in rest] == [4, 5, 6]
    resumed = [m["lm_loss"] for m in first] + [m["lm_loss"] for m in rest]
    assert resumed == pytest.approx(full, rel=0, abs=1e-6)
    assert [m["lr"] for m in rest] == pytest.approx([m["lr"] for m in train_lrs(full_fields=fields)][3:])


def train_lrs(full_fields):
    """The learning rates of an uninterrupted run (a cheap re-run of the scheduler alone)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    class _Opt:
        def __init__(self):
            self.param_groups = [{}]

    cfg = make_config(**full_fields)
    sched = OptimizerParamScheduler(_Opt(), init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr,
                                    lr_warmup_steps=cfg.lr_warmup_iters, lr_decay_steps=cfg.decay_iters,
                                    lr_decay_style="cosine", start_wd=0.01, end_wd=0.01, wd_incr_steps=1,
                                    wd_incr_style="constant")
    out = []
    for _ in range(cfg.train_iters):
        out.append({"lr": sched.get_lr({})})
        sched.step(1)
    return out


def test_cli_train_and_nan_stop(small_assets, tmp_path, capsys):
    from qwen3_next_mcore.cli import main

    argv = ["train", "--model-config", str(small_assets["model_config"]), "--tokenizer",
            str(small_assets["tokenizer"]), "--data-path", str(small_assets["data"]), "--seq-length", "32",
            "--micro-batch-size", "2", "--train-iters", "2", "--lr", "1e-3"]
    assert main(argv) == 0
    assert "trained 2 iterations" in capsys.readouterr().out
    # an absurd learning rate makes the weights explode: the loop stops and names the iteration
    assert main(argv[:-2] + ["--lr", "1e30", "--clip-grad", "0", "--train-iters", "6"]) == 3
    assert "stopping" in capsys.readouterr().err


def test_load_of_an_empty_folder_starts_from_scratch(small_assets, tmp_path):
    metrics = train(make_config(**pretrain_fields(small_assets, train_iters=1, lr_warmup_iters=0, load=tmp_path / "none")))
    assert metrics[0]["iteration"] == 1


def test_diverged_error_type():
    assert issubclass(TrainingDiverged, FloatingPointError)


def test_full_recompute_gives_the_same_losses(small_assets):
    fields = pretrain_fields(small_assets, train_iters=3, micro_batch_size=1, global_batch_size=2, seq_length=32)
    plain = [m["lm_loss"] for m in train(make_config(**fields))]
    parallel.destroy()
    recomputed = train(make_config(**fields, recompute_granularity="full", recompute_method="uniform",
                                   recompute_num_layers=1))
    assert [m["lm_loss"] for m in recomputed] == pytest.approx(plain, rel=0, abs=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_cpu_refuses_half_precision_and_distributed_optimizer(small_assets):
    with pytest.raises(ValueError, match="on CPU only fp32"):
        train(make_config(**pretrain_fields(small_assets, bf16=True)))


def test_load_takes_a_converted_checkpoint_and_finetune_restarts(small_assets, tmp_path):
    """--load of a `convert hf-to-mcore` output (tracker 'release') starts at iteration 0 from its weights:
    the losses equal a run that loads the same HF weights with --hf-dir. --finetune from a training
    checkpoint restarts at iteration 0 with its weights (fresh optimizer and data position)."""
    from qwen3_next_mcore.config import Qwen3NextConfig
    from qwen3_next_mcore.convert import convert_hf_to_mcore
    from qwen3_next_mcore.testing.tiny_hf import make_hf_checkpoint

    cfg = Qwen3NextConfig.from_hf(small_assets["model_config"])
    hf = tmp_path / "hf"
    make_hf_checkpoint(cfg, hf, seed=3)
    convert_hf_to_mcore(hf, tmp_path / "mcore")
    fields = pretrain_fields(small_assets, train_iters=3, lr_warmup_iters=0)
    from_hf = [m["lm_loss"] for m in train(make_config(**fields, hf_dir=hf))]
    parallel.destroy()
    save = tmp_path / "pretrain"
    loaded = train(make_config(**fields, load=tmp_path / "mcore", save=save))
    assert [m["iteration"] for m in loaded] == [1, 2, 3]
    assert [m["lm_loss"] for m in loaded] == pytest.approx(from_hf, rel=0, abs=1e-6)
    parallel.destroy()
    tuned = train(make_config(**pretrain_fields(small_assets, train_iters=2, lr_warmup_iters=0), load=save,
                              finetune=True))
    assert [m["iteration"] for m in tuned] == [1, 2] and tuned[0]["consumed_samples"] == 4
    # the fine-tuned run starts from the trained weights: its first loss is below the converted model's
    assert tuned[0]["lm_loss"] < loaded[0]["lm_loss"] - 0.05


def test_metrics_are_read_after_the_next_step_is_issued(small_assets, monkeypatch):
    """Each iteration's numbers are read after the next iteration's step is queued (the GPU never waits
    for the host between steps), except where the iteration must finish first: the last one, and one
    that evaluates or saves."""
    from qwen3_next_mcore.training import loop

    order = []
    step, read = loop.optimizer_step, loop._StepMetrics.read

    def issuing(*args, **kwargs):
        order.append("issue")
        return step(*args, **kwargs)

    def reading(self):
        order.append("read")
        return read(self)

    monkeypatch.setattr(loop, "optimizer_step", issuing)
    monkeypatch.setattr(loop._StepMetrics, "read", reading)
    metrics = train(make_config(**pretrain_fields(small_assets, train_iters=5, eval_interval=3, eval_iters=1,
                                                  split="95,5,0")))
    assert [m["iteration"] for m in metrics] == [1, 2, 3, 4, 5]
    # 3 evaluates: read before issuing 4; 5 is the last
    assert order == ["issue", "issue", "read", "issue", "read", "read", "issue", "issue", "read", "read"], order
    assert all(m["iteration_s"] > 0 and math.isfinite(m["lm_loss"]) for m in metrics)
    assert "valid_lm_loss" in metrics[2] and "valid_lm_loss" in metrics[4]


def test_iteration_times_on_cpu_are_each_steps_own(small_assets, monkeypatch):
    """On CPU a step's work runs inside ``optimizer_step``; reading its numbers after the next step must not
    move that step's time to its predecessor (the last iteration then showed 0.00 s and absurd tokens/s).
    The loop's clock is a fake that only the steps advance (1 s, 2 s, 1 s, 2 s), so the check does not
    depend on the machine's speed or load."""
    import types

    from qwen3_next_mcore.training import loop

    clock = [0.0]
    durations = iter([1.0, 2.0, 1.0, 2.0])
    step = loop.optimizer_step

    def timed_step(*args, **kwargs):
        out = step(*args, **kwargs)
        clock[0] += next(durations)
        return out

    monkeypatch.setattr(loop, "optimizer_step", timed_step)
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    metrics = train(make_config(**pretrain_fields(small_assets, train_iters=4)))
    # the late read would give [3, 1, 2, 0]: each step's time on its predecessor, nothing on the last
    assert [m["iteration_s"] for m in metrics] == [1.0, 2.0, 1.0, 2.0]
