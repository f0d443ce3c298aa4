"""GroupedGemmExperts and megatron's SequentialMLP write interchangeable dist checkpoints."""

from __future__ import annotations

import torch

from qwen3_next_mcore.testing.distributed import run_distributed


def _save_load(rank, workdir, save_experts, load_experts, save_layout, load_layout):
    from megatron.core import dist_checkpointing

    from qwen3_next_mcore import parallel
    from qwen3_next_mcore.config import get_preset
    from qwen3_next_mcore.model import build_model
    from qwen3_next_mcore.model.hf_weights import global_param_names, named_weight_tensors

    cfg = get_preset("tiny", vocab_size=128)

    def weights(model):
        names = global_param_names(model)
        return {names[n]: t.detach().clone() for n, t in named_weight_tensors(model).items()}

    parallel.initialize(**save_layout, seed=7)
    model = build_model(cfg, experts=save_experts, sequence_parallel=save_layout.get("tensor_parallel", 1) > 1)
    saved = weights(model)
    dist_checkpointing.save(model.sharded_state_dict(), workdir)
    # same torch.distributed group, new megatron layout; different init, so loading must overwrite everything
    parallel.initialize(**load_layout, seed=99)
    other = build_model(cfg, experts=load_experts, sequence_parallel=load_layout.get("tensor_parallel", 1) > 1)
    other.load_state_dict(dist_checkpointing.load(other.sharded_state_dict(), workdir))
    return saved, weights(other)


def _check(results):
    saved = {k: v for s, _ in results for k, v in s.items()}
    loaded = {k: v for _, l in results for k, v in l.items()}
    experts = [k for k in loaded if ".local_experts." in k]
    assert experts
    for k in experts:
        # compare expert weights where both sides hold the full tensor (no expert TP in these layouts)
        assert torch.equal(saved[k], loaded[k]), k


def test_grouped_to_sequential(tmp_path):
    _check(run_distributed(_save_load, 1, args=(str(tmp_path), "grouped", "sequential", {}, {})))


def test_sequential_to_grouped_at_expert_parallel_2(tmp_path):
    res = run_distributed(_save_load, 2, args=(str(tmp_path), "sequential", "grouped", {}, {"expert_parallel": 2}))
    _check(res)


def test_grouped_ep2_to_grouped_single(tmp_path):
    res = run_distributed(_save_load, 2, args=(str(tmp_path), "grouped", "grouped", {"expert_parallel": 2}, {}))
    _check(res)
