"""Routed experts as two stacked weights and grouped GEMMs (``torch.nn.functional.grouped_mm``).

A drop-in for megatron-core's ``SequentialMLP`` in the ``experts`` slot of its ``MoELayer``: the same
forward contract (tokens already permuted and grouped by local expert, ``tokens_per_expert``, routing
probabilities applied after the activation), the same math (SwiGLU: ``fc2(silu(gate) * up)``), and the same
checkpoint keys (per expert, as ``SequentialMLP`` writes them), but one grouped GEMM per projection
instead of a Python loop over experts, and no Transformer Engine. This is the expert computation of the
``local`` backend on CPU and GPU.

Parameters (this rank): ``weight1`` [E_local, 2F/etp, H] (each expert's ``linear_fc1.weight``, [gate; up]
rows) and ``weight2`` [E_local, H, F/etp] (``linear_fc2.weight``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint
from torch import nn


# torch >= 2.10 exposes F.grouped_mm; 2.8/2.9 only the private op with the same contract
_grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


class GroupedGemmExperts(MegatronModule):
    """forward(x [T, H] grouped by expert, tokens_per_expert [E_local], probs [T]) -> ([T, H], None)."""

    def __init__(self, num_local_experts: int, config, submodules=None, pg_collection=None, name=None, **_):
        super().__init__(config=config)
        if not config.gated_linear_unit:
            raise ValueError("GroupedGemmExperts implements SwiGLU experts (gated_linear_unit=True)")
        self.num_local_experts = num_local_experts
        self.ep_group, self.tp_group, self.dp_group = pg_collection.ep, pg_collection.expt_tp, pg_collection.expt_dp
        etp = self.tp_group.size()
        ffn, hidden = config.moe_ffn_hidden_size, config.hidden_size
        if ffn % etp:
            raise ValueError(f"moe_ffn_hidden_size={ffn} is not divisible by expert_tensor_parallel={etp}")
        self.ffn_local = ffn // etp
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight1 = nn.Parameter(torch.empty(num_local_experts, 2 * self.ffn_local, hidden,
                                                dtype=config.params_dtype, device=device))
        self.weight2 = nn.Parameter(torch.empty(num_local_experts, hidden, self.ffn_local,
                                                dtype=config.params_dtype, device=device))
        for p, dim in ((self.weight1, 1), (self.weight2, 2)):
            p.allreduce = False  # expert parameter: reduced over the expert-data-parallel group
            p.tensor_model_parallel = etp > 1
            p.partition_dim = dim
            p.partition_stride = 1
        if config.perform_initialization:
            with torch.no_grad():
                for e in range(num_local_experts):
                    config.init_method(self.weight1[e])
                    config.output_layer_init_method(self.weight2[e])

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        x = permuted_local_hidden_states
        offs = torch.cumsum(tokens_per_expert.to(device=x.device), 0).to(torch.int32)
        h = _grouped_mm(x, self.weight1.transpose(1, 2), offs=offs)  # [T, 2F]
        gate, up = h.chunk(2, dim=-1)
        act = F.silu(gate) * up
        act = (act.float() * permuted_probs.unsqueeze(-1).float()).to(act.dtype)
        out = _grouped_mm(act, self.weight2.transpose(1, 2), offs=offs)  # [T, H]
        return out, None

    def expert_views(self) -> list[tuple[str, torch.Tensor]]:
        """(``local_experts.{e}.linear_fc{1,2}.weight``, view) per local expert: SequentialMLP's names."""
        out = []
        for e in range(self.num_local_experts):
            out.append((f"local_experts.{e}.linear_fc1.weight", self.weight1[e]))
            out.append((f"local_experts.{e}.linear_fc2.weight", self.weight2[e]))
        return out

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """The keys and layout ``SequentialMLP`` writes: one global [E, ...] tensor per projection."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        num_global = self.ep_group.size() * self.num_local_experts
        first = self.ep_group.rank() * self.num_local_experts
        out = {}
        for e in range(self.num_local_experts):
            local_prefix = f"{prefix}local_experts.{e}."
            offsets = (*sharded_offsets, (len(sharded_offsets), first + e, num_global))
            tensors = {"linear_fc1.weight": self.weight1[e], "linear_fc2.weight": self.weight2[e]}
            sd = make_sharded_tensors_for_checkpoint(
                tensors, local_prefix, {"linear_fc1.weight": 0, "linear_fc2.weight": 1}, offsets,
                tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
            key = f"{local_prefix}linear_fc1.weight"
            sd[key] = apply_swiglu_sharded_factory(sd[key], offsets, tp_group=self.tp_group,
                                                   dp_group=metadata["dp_cp_group"])
            replace_prefix_for_sharding(sd, local_prefix, f"{prefix}experts.")
            for sh in sd.values():
                sh.replica_id = (*sh.replica_id[:2], self.dp_group.rank())
            out.update(sd)
        return out
