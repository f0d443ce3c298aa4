"""The Gated DeltaNet mixer of Qwen3-Next as a megatron-core module (spec section 3.4).

Layout legend: ``*_sb*`` tensors are megatron's sequence-first ``[S, B, ...]``; ``*_bt*`` tensors are
fla's batch-first ``[B, T, ...]`` (T == S).

Tensor-parallel layout (independent of the TP size, unlike megatron-core's fused ``in_proj``):
``in_proj_qkvz`` and ``in_proj_ba`` keep the Hugging Face row order, which is grouped by key head
(per group ``[q, k, v (r heads), z (r heads)]`` and ``[b (r), a (r)]``, r = value heads per key head),
so splitting the rows into contiguous blocks gives each TP rank whole key-head groups. The depthwise
conv weight is stored group-major (per group ``[q, k, v]`` channels), the same order the projection
produces, so it too splits contiguously and needs no runtime reordering. ``dt_bias``/``A_log`` are per
value head (contiguous per group). Only the output norm weight is replicated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint, sharded_state_dict_default
from torch import nn

from ..ops.gated_delta_rule import gated_delta_rule, gdn_gate
from ..ops.gdn_conv_split import conv_split_qkvz
from .norms import GatedRMSNorm


@dataclass
class GatedDeltaNetSubmodules:
    """Slots of :class:`Qwen3NextGatedDeltaNet`: projections, output norm, output projection."""

    in_proj_qkvz: ModuleSpec | type = ColumnParallelLinear
    in_proj_ba: ModuleSpec | type = ColumnParallelLinear
    out_norm: ModuleSpec | type = GatedRMSNorm
    out_proj: ModuleSpec | type = RowParallelLinear
    # op backends: {"gdn": ..., "conv": ...} ("conv": "triton" fused conv + split, or a causal_conv1d
    # backend for the unfused ops); "gva": "repeat" repeats q/k to the value heads instead of
    # fla's native grouped value heads; "gate": "fused" lets fla's kernel compute the decay and beta from
    # the raw projections (same math; both kept to benchmark them)
    backend: dict = field(default_factory=dict)


class Qwen3NextGatedDeltaNet(MegatronModule):
    """Gated DeltaNet mixer. forward(x [S, B, H]) -> (out [S, B, H], None), S split when sequence parallel.

    Parameters (this rank's share): ``in_proj_qkvz`` [G*(2dk+2r*dv), H], ``in_proj_ba`` [G*2r, H],
    ``conv1d_weight`` [G*(2dk+r*dv), 1, W] (group-major), ``dt_bias``/``A_log`` [G*r] (fp32 kept in
    fp32 when ``keep_decay_fp32``), ``out_norm.weight`` [dv], ``out_proj`` [H, G*r*dv], with G the
    key-head groups of this rank.
    """

    def __init__(
        self,
        config,
        submodules: GatedDeltaNetSubmodules,
        layer_number: int | None = None,
        pg_collection: ProcessGroupCollection | None = None,
        **_: object,
    ):
        super().__init__(config)
        if config.context_parallel_size > 1:
            raise ValueError(
                "Gated DeltaNet with context_parallel > 1 is not supported yet (the recurrence would need "
                "an all-to-all from sequence- to head-parallel); use context_parallel=1"
            )
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        tp = self.tp_group.size()
        self.layer_number = layer_number
        self.backend = dict(submodules.backend)

        self.num_k_heads = config.linear_num_key_heads
        self.num_v_heads = config.linear_num_value_heads
        self.dk = config.linear_key_head_dim
        self.dv = config.linear_value_head_dim
        self.r = self.num_v_heads // self.num_k_heads
        self.groups = self.num_k_heads // tp
        self.kernel = config.linear_conv_kernel_dim
        self.eps = config.layernorm_epsilon
        group_qkvz = 2 * self.dk + 2 * self.r * self.dv
        self.group_conv = 2 * self.dk + self.r * self.dv
        hidden = config.hidden_size

        linear_kwargs = dict(config=config, init_method=config.init_method, bias=False, skip_bias_add=True,
                             gather_output=False, is_expert=False, tp_group=self.tp_group)
        self.in_proj_qkvz = build_module(submodules.in_proj_qkvz, hidden, self.num_k_heads * group_qkvz,
                                         **linear_kwargs, tp_comm_buffer_name="gdn_qkvz")
        self.in_proj_ba = build_module(submodules.in_proj_ba, hidden, self.num_k_heads * 2 * self.r,
                                       **linear_kwargs, tp_comm_buffer_name="gdn_ba")

        dtype = config.params_dtype
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        self.conv1d_weight = nn.Parameter(
            torch.empty(self.groups * self.group_conv, 1, self.kernel, dtype=dtype, device=device))
        hv_local = self.groups * self.r
        # decay parameters stay fp32 (spec 3.7): exp/softplus of bf16 values loses the small decays
        self.dt_bias = nn.Parameter(torch.ones(hv_local, dtype=torch.float32, device=device))
        self.A_log = nn.Parameter(torch.empty(hv_local, dtype=torch.float32, device=device))
        for p in (self.conv1d_weight, self.dt_bias, self.A_log):
            set_tensor_model_parallel_attributes(p, is_parallel=True, dim=0, stride=1)
        if config.perform_initialization:
            with torch.no_grad():
                config.init_method(self.conv1d_weight)
                self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0.01, 16).log())
        self.out_norm = build_module(submodules.out_norm, config=config, hidden_size=self.dv, eps=self.eps,
                                     tp_group=self.tp_group)
        self.out_proj = build_module(
            submodules.out_proj, hv_local * tp * self.dv, hidden, config=config, init_method=config.output_layer_init_method,
            bias=False, skip_bias_add=True, input_is_parallel=True, is_expert=False, tp_group=self.tp_group,
            tp_comm_buffer_name="gdn_out")

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        inference_context=None,
        packed_seq_params: PackedSeqParams | None = None,
        **_: object,
    ):
        if inference_context is not None:
            raise NotImplementedError("Qwen3NextGatedDeltaNet: inference with a cache is not supported")
        # Without sequence parallelism the projections' row order is free, so they run batch-first: the
        # narrow input is transposed once ([S, B, H], H = 2048 at 80B) instead of the wide projections
        # (G*(2dk+2r*dv) = 12288) and their gradients; the output is transposed back the same way.
        # Under sequence parallelism the linears gather/scatter along S, which must stay first.
        batch_first = not self.config.sequence_parallel
        if batch_first:
            x_bth = hidden_states.transpose(0, 1).contiguous()
            qkvz_bt, _ = self.in_proj_qkvz(x_bth)  # [B, S, G*(2dk+2r*dv)]
            ba_bt, _ = self.in_proj_ba(x_bth)  # [B, S, G*2r]
        else:
            qkvz_bt = self.in_proj_qkvz(hidden_states)[0].transpose(0, 1)  # S gathered under SP
            ba_bt = self.in_proj_ba(hidden_states)[0].transpose(0, 1)
        B, S = qkvz_bt.shape[:2]
        G, r, dk, dv = self.groups, self.r, self.dk, self.dv
        cu_seqlens = None
        if packed_seq_params is not None:
            if B != 1:
                raise ValueError(f"packed sequences need micro-batch 1 in the thd layout, got batch {B}")
            cu_seqlens = packed_seq_params.cu_seqlens_q

        # the conv over each group's q, k, v channels and the split into q, k, v, z: one fused kernel each
        # way on CUDA (ops/gdn_conv_split.py), the plain ops on CPU
        q_bthk, k_bthk, v_bthv, z_bt = conv_split_qkvz(
            qkvz_bt.view(B, S, G, 2 * dk + 2 * r * dv), self.conv1d_weight.squeeze(1), dk=dk, dv=dv, r=r,
            cu_seqlens=cu_seqlens, backend=self.backend.get("conv"))
        b_bt, a_bt = torch.split(ba_bt.view(B, S, G, 2 * r), [r, r], dim=-1)
        b_bt, a_bt = b_bt.reshape(B, S, G * r), a_bt.reshape(B, S, G * r)

        if self.backend.get("gva") == "repeat" and r > 1:  # one q/k head per value head (benchmarks)
            q_bthk, k_bthk = (x.repeat_interleave(r, dim=2) for x in (q_bthk, k_bthk))
        if self.backend.get("gate") == "fused":  # decay and beta computed inside the recurrence kernel
            o_bthv, _ = gated_delta_rule(q_bthk, k_bthk, v_bthv, g=a_bt, beta=b_bt, A_log=self.A_log,
                                         dt_bias=self.dt_bias, beta_is_logit=True, use_qk_l2norm=True,
                                         cu_seqlens=cu_seqlens, backend=self.backend.get("gdn"))
        else:
            beta = b_bt.sigmoid()
            g = gdn_gate(a_bt, self.A_log, self.dt_bias)
            o_bthv, _ = gated_delta_rule(q_bthk, k_bthk, v_bthv, g=g, beta=beta, use_qk_l2norm=True,
                                         cu_seqlens=cu_seqlens, backend=self.backend.get("gdn"))
        o_bthv = self.out_norm(o_bthv, z_bt)
        if batch_first:
            out_bth, bias = self.out_proj(o_bthv.reshape(B, S, G * r * dv))
            return out_bth.transpose(0, 1).contiguous(), bias
        o_sb = o_bthv.reshape(B, S, G * r * dv).transpose(0, 1).contiguous()  # one copy, not one per GEMM
        out, bias = self.out_proj(o_sb)
        return out, bias

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
                           ) -> ShardedStateDict:
        own = {name: p for name, p in self.named_parameters(recurse=False)}
        sharded = make_sharded_tensors_for_checkpoint(
            own, prefix, {"conv1d_weight": 0, "dt_bias": 0, "A_log": 0}, sharded_offsets)
        for name, module in self.named_children():
            sharded.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata,
                                                      tp_group=self.tp_group))
        return sharded
