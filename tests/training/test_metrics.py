"""The per-iteration metrics beyond the losses (TFLOP/s per GPU, memory, the MoE load-balancing loss) and
the TensorBoard writer (``--tensorboard-dir``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qwen3_next_mcore import parallel
from qwen3_next_mcore.config import Qwen3NextConfig
from qwen3_next_mcore.training import TrainingDiverged, make_config, train
from qwen3_next_mcore.training.arguments import parse_args
from qwen3_next_mcore.training.flops import training_flops

NEW_KEYS = {"tflops_per_gpu", "mem_allocated_gb", "mem_peak_gb", "moe_aux_loss"}


@pytest.fixture(autouse=True)
def _fresh_process_group():
    yield
    parallel.destroy()


def fields(assets, **kw) -> dict:
    base = {"model_config_path": assets["model_config"], "tokenizer": assets["tokenizer"],
            "data_path": (str(assets["data"]),), "micro_batch_size": 2, "global_batch_size": 4, "seq_length": 32,
            "lr": 3e-3, "lr_warmup_iters": 1, "train_iters": 3, "seed": 1234}
    return base | kw


def scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_json_and_tensorboard_metrics(small_assets, tmp_path):
    log_json, tb = tmp_path / "metrics.jsonl", tmp_path / "tb"
    cfg = make_config(**fields(small_assets, log_json=log_json, tensorboard_dir=tb, eval_interval=3, eval_iters=1,
                               split="95,5,0"))
    metrics = train(cfg)
    rows = [json.loads(line) for line in log_json.read_text().splitlines()]
    assert rows == metrics
    model = Qwen3NextConfig.from_hf(small_assets["model_config"])
    step_flops = training_flops(model, 32, 4)
    for r in rows:
        assert NEW_KEYS <= set(r)
        # world size 1: TFLOP/s per GPU is the step's model FLOPs over the iteration time
        assert r["tflops_per_gpu"] > 0
        assert r["tflops_per_gpu"] == pytest.approx(step_flops / r["iteration_s"] / 1 / 1e12, rel=1e-9)
        # CPU: host RSS and its peak (GPU: the CUDA allocator's), GB
        assert 0.05 < r["mem_allocated_gb"] <= r["mem_peak_gb"] * (1 + 1e-6) < 1e3
        # the tiny model's router_aux_loss_coef is 0.001: E * sum f_e P_e, 1 for uniform routing, >= ~1 always
        assert 0.5 < r["moe_aux_loss"] < 4.0
    # TensorBoard: one point per logged iteration, equal to the returned metrics (stored as float32)
    tags = scalars(tb)
    for key in ("lm_loss", "mtp_loss", "moe_aux_loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu",
                "mem_allocated_gb", "mem_peak_gb"):
        assert [step for step, _ in tags[key]] == [1, 2, 3], key
        assert [v for _, v in tags[key]] == pytest.approx([m[key] for m in metrics], rel=1e-6, abs=1e-9), key
    assert tags["valid_lm_loss"] == [(3, pytest.approx(metrics[-1]["valid_lm_loss"], rel=1e-6))]


def test_no_aux_loss_without_coefficient_and_recompute_flops(small_assets, tmp_path):
    tb = tmp_path / "tb"
    metrics = train(make_config(**fields(small_assets, train_iters=1, lr_warmup_iters=0, moe_aux_loss_coeff=0.0,
                                         tensorboard_dir=tb,
                                         recompute_granularity="selective")))
    assert metrics[0]["moe_aux_loss"] is None
    assert "moe_aux_loss" not in scalars(tb)
    model = Qwen3NextConfig.from_hf(small_assets["model_config"])
    assert metrics[0]["tflops_per_gpu"] == pytest.approx(
        training_flops(model, 32, 4, recompute="selective") / metrics[0]["iteration_s"] / 1e12, rel=1e-9)


def test_tensorboard_writer_closed_when_training_stops_with_an_error(small_assets, tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    closed = []
    original = SummaryWriter.close
    monkeypatch.setattr(SummaryWriter, "close", lambda self: (closed.append(self.log_dir), original(self))[1])
    tb = tmp_path / "tb"
    with pytest.raises(TrainingDiverged):
        train(make_config(**fields(small_assets, lr=1e30, clip_grad=0.0, lr_warmup_iters=0, train_iters=6,
                                   tensorboard_dir=tb)))
    assert closed == [str(tb)]
    assert scalars(tb)["lm_loss"]  # the iterations before the stop were written


def test_tensorboard_dir_option():
    cfg = parse_args(["--preset", "tiny", "--data-path", "data/c4", "--tensorboard-dir", "out/tb"])
    assert cfg.tensorboard_dir == Path("out/tb")
    assert parse_args(["--preset", "tiny", "--data-path", "data/c4"]).tensorboard_dir is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_cpu_memory_is_host_rss():
    import psutil

    from qwen3_next_mcore.training.loop import _memory_gb

    rss, peak = _memory_gb()
    assert rss == pytest.approx(psutil.Process().memory_info().rss / 1e9, rel=0.05)
    assert peak >= rss * (1 - 1e-6)


def test_mfu_over_the_cards_peak_counts_no_recompute(small_assets, monkeypatch, caplog):
    """MFU = model FLOPs (no recompute) per second per GPU over the card's dense bf16 peak; None on CPU."""
    from qwen3_next_mcore.training import loop

    plain = train(make_config(**fields(small_assets, train_iters=1, lr_warmup_iters=0)))
    assert plain[0]["mfu"] is None  # CPU: no datasheet peak
    monkeypatch.setattr(loop, "_peak_tflops", lambda: 1e-3)  # a pretend 1 GFLOP/s card
    with caplog.at_level("INFO", logger="qwen3_next_mcore.training.loop"):
        m = train(make_config(**fields(small_assets, train_iters=1, lr_warmup_iters=0,
                                       recompute_granularity="full", recompute_method="uniform",
                                       recompute_num_layers=1)))[0]
    model = Qwen3NextConfig.from_hf(small_assets["model_config"])
    assert m["mfu"] == pytest.approx(training_flops(model, 32, 4) / m["iteration_s"] / 1e12 / 1e-3, rel=1e-9)
    assert m["tflops_per_gpu"] > m["mfu"] * 1e-3  # the throughput counts the recomputed forward, MFU does not
    assert f"MFU {m['mfu']:.1%}" in caplog.text
