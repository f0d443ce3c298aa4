"""Two gloo processes train exactly like one: TP=2 with sequence parallelism, EP=2 (which makes the
dense weights data-parallel over 2 ranks), and PP=2 (1F1B schedule, MTP on the last stage). Initial weights come from one HF checkpoint, so they do not
depend on the layout (megatron's random initialisation does)."""

from __future__ import annotations

import pytest

from qwen3_next_mcore.testing.distributed import run_distributed

from .helpers import make_hf_weights, train_on_rank


@pytest.fixture(scope="module")
def reference(small_assets, tmp_path_factory):
    hf = make_hf_weights(small_assets["model_config"], tmp_path_factory.mktemp("hf"))
    fields = {"model_config_path": str(small_assets["model_config"]), "tokenizer": str(small_assets["tokenizer"]),
                  "data_path": (str(small_assets["data"]),), "hf_dir": str(hf), "micro_batch_size": 1, "global_batch_size": 4,
                  "seq_length": 32, "train_iters": 4, "lr": 3e-3, "lr_warmup_iters": 1}
    # the one-process run goes through the same launcher (a fresh process, like the others)
    [single] = run_distributed(train_on_rank, 1, args=(fields,))
    return fields, {"lm": [m["lm_loss"] for m in single], "mtp": [m["mtp_loss"] for m in single]}


@pytest.mark.parametrize("layout", [
    {"tensor_model_parallel_size": 2, "sequence_parallel": True},
    {"expert_model_parallel_size": 2},
    {"pipeline_model_parallel_size": 2},
], ids=["tp2-sp", "ep2", "pp2"])
def test_two_processes_match_one(reference, layout):
    fields, single = reference
    results = run_distributed(train_on_rank, 2, args=(fields | layout,))
    for rank_metrics in results:
        assert [m["lm_loss"] for m in rank_metrics] == pytest.approx(single["lm"], rel=0, abs=1e-5)
        assert [m["mtp_loss"] for m in rank_metrics] == pytest.approx(single["mtp"], rel=0, abs=1e-5)
    assert single["lm"][-1] < single["lm"][0]


def test_checkpoint_resumes_at_another_layout(reference, tmp_path):
    """A checkpoint written by one process resumes at TP=2 + SP (two sub-optimizers: dense and expert
    parameters then have different data-parallel groups) with the uninterrupted run's losses;
    ``--no-load-optim`` at EP=2 restores the weights only (the first loss still matches)."""
    fields, single = reference
    save = tmp_path / "ckpt"
    run_distributed(train_on_rank, 1, args=(fields | {"save": str(save), "exit_interval": 2},))
    tp = run_distributed(train_on_rank, 2, args=(fields | {"load": str(save), "tensor_model_parallel_size": 2,
                                                           "sequence_parallel": True},))
    assert [m["iteration"] for m in tp[0]] == [3, 4]
    assert [m["lm_loss"] for m in tp[0]] == pytest.approx(single["lm"][2:], rel=0, abs=1e-5)
    ep = run_distributed(train_on_rank, 2, args=(fields | {"load": str(save), "no_load_optim": True,
                                                           "expert_model_parallel_size": 2},))
    assert ep[0][0]["lm_loss"] == pytest.approx(single["lm"][2], rel=0, abs=1e-5)
