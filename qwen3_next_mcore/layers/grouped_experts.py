"""Routed experts as two stacked weights and grouped GEMMs (``torch.nn.functional.grouped_mm``).

A drop-in for megatron-core's ``SequentialMLP`` in the ``experts`` slot of its ``MoELayer``: the same
forward contract (tokens already permuted and grouped by local expert, ``tokens_per_expert``, routing
probabilities applied after the activation), the same math (SwiGLU: ``fc2(silu(gate) * up)``), and the same
checkpoint keys (per expert, as ``SequentialMLP`` writes them), but one grouped GEMM per projection
instead of a Python loop over experts, and no Transformer Engine. This is the expert computation of the
``local`` backend on CPU and GPU.

The SwiGLU and the routing-probability scaling run as :func:`~qwen3_next_mcore.ops.moe_swiglu.weighted_swiglu`:
on CUDA our Triton kernels (one pass forward, one backward for both gradients; only the [rows, 2F]
projection saved for the backward), on CPU plain torch ops (``activation_backend`` overrides, e.g.
"compile" for megatron-core's fused ``weighted_bias_swiglu_impl``; the choice is logged like every op
backend).

Parameters (this rank): ``weight1`` [E_local, 2F/etp, H] (each expert's ``linear_fc1.weight``, [gate; up]
rows) and ``weight2`` [E_local, H, F/etp] (``linear_fc2.weight``).

Under megatron-core's DDP (``wgrad_into_main_grad``, set by
:func:`qwen3_next_mcore.training.wgrad_fusion.use_wgrad_accumulation_fusion`) the backward adds each
weight gradient into the fp32 ``main_grad`` itself, as megatron-core's fused linears do, with one
compiled kernel on CUDA (:func:`add_into_main_grad`): DDP's hook would add the bf16 gradient with torch's
mixed-dtype ``add_``, which CUDA runs unvectorised (on an H200, 201 M values: 0.71 ms against 0.47 ms
compiled, 2.8 vs 4.3 TB/s; 4 proxy layers: 1 ms per step). The step's first gradient of a weight is
copied instead (DDP zeroed the buffer; nothing else writes these main grads), reading no fp32 values.

Padded layout (``padded_capacity`` C, set per forward by ``layers.moe.Qwen3NextMoELayer`` when its
dispatcher's ``experts_layout`` is "padded"): the rows arrive as ``[E * C, H]``, expert e's at
``e*C .. e*C + count - 1``, zeros after, and every GEMM is a batched GEMM (``torch.bmm``, cuBLAS) over
``[E, C, *]``. Why: torch's grouped GEMM runs at about half the dense rate for Qwen3-Next's ~320-row groups
(H200, 16k tokens x top-10 of 512 experts: the six GEMMs 8.4 ms, 366 TFLOP/s), cuBLAS's batched GEMM
on the same rows padded to the largest count 6.0 ms (511 TFLOP/s of real work;
``benchmarks/grouped_gemm_shapes.py``). The padding rows cost GEMM work and memory in proportion to
E * C / rows, and the capacity is a host read, so the whole layer is not faster there (12.55 against
12.18 ms, ``benchmarks/moe_layouts.py``): the layout is opt-in. Zero rows give zero activations, so
they add nothing to the weight gradients; under DDP (``wgrad_into_main_grad``) the weight gradient is
accumulated into the fp32 main grad by the GEMM itself on CUDA (``baddbmm`` with an fp32 output).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
from torch import nn

from ..ops.backends import code_copy, compiled, compiled_op_backend, env_for, grouped_gemm_backend
from ..ops.moe_swiglu import weighted_swiglu

_EXTRA = "local_experts.{e}.{lin}._extra_state"

# torch >= 2.10 exposes F.grouped_mm; 2.8/2.9 only the private op with the same contract
_grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


def add_into_main_grad(main_grad: torch.Tensor, grad: torch.Tensor, *, first: bool = False,
                       backend: str | None = None) -> None:
    """``main_grad += grad`` in place (``first``: ``main_grad = grad``, for the first gradient since the
    buffer was zeroed: 6 bytes moved per value instead of 10): main_grad fp32, grad the same shape in any
    float dtype. backend None/"auto": "compile" on CUDA (one vectorised kernel), "torch" on CPU."""
    if compiled_op_backend("add_into_main_grad", env_for(grad), backend) == "compile":
        compiled(_copy_ if first else _add_)(main_grad, grad)  # (in place: the arguments as they are)
    elif first:
        main_grad.copy_(grad)
    else:
        main_grad.add_(grad)


def _add_(main_grad: torch.Tensor, grad: torch.Tensor) -> None:
    main_grad.add_(grad)


def _copy_(main_grad: torch.Tensor, grad: torch.Tensor) -> None:
    main_grad.copy_(grad)


def grouped_gemm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``torch.nn.functional.grouped_mm(a, b, offs=offs)`` (its contract: a [rows, K] with rows grouped by
    ``offs`` and b [G, K, N] -> [rows, N]; or a [M, rows], b [rows, N] -> [G, M, N]), bf16/fp32 (bf16/fp16
    for "autotune").

    backend None/"torch": torch's kernel. "autotune" (opt-in, CUDA sm90+): Inductor under max-autotune
    benchmarks its Triton grouped-GEMM templates and torch's kernel for each shape and keeps the fastest;
    one compiled copy per shape and layout (the first call of each tunes: seconds to minutes), so it suits
    fixed shapes (a fixed micro-batch at one expert-parallel rank), not row counts that change every step.
    The choice is logged once; "autotune" where it cannot run raises."""
    if grouped_gemm_backend(env_for(a), backend) == "autotune":
        if a.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"grouped_gemm backend 'autotune' takes bf16/fp16 operands (Inductor's grouped GEMM), "
                             f"got {a.dtype}")
        return _autotuned_grouped_mm((a.shape, a.stride(), b.shape, b.stride(), a.dtype, offs.shape))(a, b, offs)
    return _grouped_mm(a, b, offs=offs)


def _plain_grouped_mm(a, b, offs):
    return _grouped_mm(a, b, offs=offs)


@functools.cache
def _autotuned_grouped_mm(signature: tuple):
    """``torch.compile`` (max-autotune, whole graph) of one grouped GEMM, a copy per ``signature`` with its own
    code object: dynamo counts recompilations per code object and past its limit would run eagerly."""
    return torch.compile(code_copy(_plain_grouped_mm), mode="max-autotune-no-cudagraphs", dynamic=False,
                         fullgraph=True)


def _first_gradient_this_step(weight: torch.Tensor) -> bool:
    """Whether this backward writes ``weight.main_grad`` first in the step, so it may overwrite it: DDP zeroes
    the main grads and sets ``grad_added_to_main_grad`` False before each step, and only the experts'
    backward writes these weights' main grads. A weight without DDP's flag is always added to."""
    return getattr(weight, "grad_added_to_main_grad", None) is False


class _ExpertsGemm(torch.autograd.Function):
    """x [T, in] rows grouped by expert (``offs``: the groups' ends), weight [E, out, in] -> [T, out],
    ``x[rows of e] @ weight[e].T`` per expert, every GEMM through :func:`grouped_gemm` with ``backend``.
    With ``into_main_grad`` the backward adds the weight gradient into ``weight.main_grad``
    (:func:`add_into_main_grad`) and marks it added for DDP's hook; otherwise it returns it."""

    @staticmethod
    def forward(ctx, x, weight, offs, backend, into_main_grad):
        ctx.save_for_backward(x, offs)
        ctx.weight, ctx.backend, ctx.into_main_grad = weight, backend, into_main_grad
        return grouped_gemm(x, weight.transpose(1, 2), offs, backend=backend)

    @staticmethod
    def backward(ctx, grad):
        x, offs = ctx.saved_tensors
        weight, backend = ctx.weight, ctx.backend
        grad_x = grouped_gemm(grad, weight, offs, backend=backend) if ctx.needs_input_grad[0] else None
        if not (ctx.into_main_grad or ctx.needs_input_grad[1]):
            return grad_x, None, None, None, None
        if x.shape[0]:  # [E, out, in], sums over each expert's rows
            grad_w = grouped_gemm(grad.t(), x, offs, backend=backend)
        else:  # no rows at all (an expert-parallel rank no token was routed to): CUDA's grouped GEMM
            # rejects a zero-length contraction, and every expert's gradient is zero
            grad_w = torch.zeros(weight.shape, dtype=grad.dtype, device=grad.device)
        if not ctx.into_main_grad:
            return grad_x, grad_w, None, None, None
        add_into_main_grad(weight.main_grad, grad_w, first=_first_gradient_this_step(weight))
        weight.grad_added_to_main_grad = True
        if getattr(weight, "zero_out_wgrad", False):  # (megatron-core's contract for shared weights)
            grad_w.zero_()
        # returned only as autograd's placeholder: DDP's hook sees grad_added_to_main_grad and drops it
        return grad_x, grad_w, None, None, None


class _ExpertsBmm(torch.autograd.Function):
    """x [E, C, in] (each expert's rows, padded), weight [E, out, in] -> [E, C, out] = ``x[e] @ weight[e].T``
    (``torch.bmm``). With ``into_main_grad`` the backward puts the weight gradient into ``weight.main_grad``
    and marks it added for DDP's hook: on CUDA (bf16/fp16) inside the GEMM (``baddbmm`` with an fp32
    output: fp32 sums, no bf16 rounding, no separate pass; the step's first gradient overwrites, later
    ones add), elsewhere a ``bmm`` then :func:`add_into_main_grad`."""

    @staticmethod
    def forward(ctx, x, weight, into_main_grad):
        ctx.save_for_backward(x)
        ctx.weight, ctx.into_main_grad = weight, into_main_grad
        return torch.bmm(x, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        weight = ctx.weight
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        if not ctx.into_main_grad:
            return grad_x, torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[1] else None, None
        from ..training.wgrad_fusion import main_grad_placeholder

        first = _first_gradient_this_step(weight)
        main = weight.main_grad
        if grad.is_cuda and grad.dtype in (torch.bfloat16, torch.float16):
            torch.baddbmm(main, grad.transpose(1, 2), x, beta=0 if first else 1, out_dtype=torch.float32, out=main)
        else:
            add_into_main_grad(main, torch.bmm(grad.transpose(1, 2), x), first=first)
        weight.grad_added_to_main_grad = True
        return grad_x, main_grad_placeholder(weight), None


class GroupedGemmExperts(MegatronModule):
    """forward(x [T, H] grouped by expert, tokens_per_expert [E_local], probs [T]) -> ([T, H], None).

    ``activation_backend``: :func:`~qwen3_next_mcore.ops.moe_swiglu.weighted_swiglu`'s (None: automatic,
    our Triton kernels on CUDA, eager torch on CPU; "compile": megatron-core's fused SwiGLU; "torch"). ``gemm_backend``: :func:`grouped_gemm`'s (None: torch's kernel; "autotune":
    Inductor's autotuned choice, opt-in, CUDA sm90+)."""

    activation_backend: str | None = None
    gemm_backend: str | None = None  # grouped_gemm's backend: None/"torch", or "autotune" (opt-in)
    wgrad_into_main_grad: bool = False  # see the module docstring
    padded_capacity: int | None = None  # the padded layout's rows per expert, for this forward (see above)

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
        E, C = self.num_local_experts, self.padded_capacity
        if C is not None:
            if x.shape[0] != E * C:
                raise ValueError(f"GroupedGemmExperts: the padded layout has {E} experts x {C} rows, got "
                                 f"{x.shape[0]} rows")
            offs = None
            h = self._bmm(x.view(E, C, -1), self.weight1).view(E * C, -1)  # [E*C, 2F]
        else:
            offs = torch.cumsum(tokens_per_expert.to(device=x.device), 0).to(torch.int32)
            h = self._gemm(x, self.weight1, offs)  # [T, 2F]
        act = weighted_swiglu(h, permuted_probs, backend=self.activation_backend)  # [rows, F]
        if C is not None:
            return self._bmm(act.view(E, C, -1), self.weight2).view(E * C, -1), None
        out = self._gemm(act, self.weight2, offs)  # [T, H]
        return out, None

    def _bmm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [E, C, in] -> [E, C, out]: the padded layout's batched GEMM. With gradients always through
        :class:`_ExpertsBmm`, whose weight gradient comes out in the weight's own [E, out, in] layout (torch's
        autograd of ``bmm(x, weight.transpose(1, 2))`` gives it transposed, and accumulating that into
        ``weight.grad`` is a strided copy: 4.9 ms per fc1 weight at 512 experts on an H200)."""
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _ExpertsBmm.apply(x, weight, self.wgrad_into_main_grad and weight.requires_grad)
        return torch.bmm(x, weight.transpose(1, 2))

    def _gemm(self, x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        backend = self.gemm_backend
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            if self.wgrad_into_main_grad and weight.requires_grad:
                return _ExpertsGemm.apply(x, weight, offs, backend, True)
            if grouped_gemm_backend(env_for(x), backend) != "torch":
                return _ExpertsGemm.apply(x, weight, offs, backend, False)
            return _grouped_mm(x, weight.transpose(1, 2), offs=offs)  # (torch's own autograd)
        return grouped_gemm(x, weight.transpose(1, 2), offs, backend=backend)

    def expert_views(self) -> list[tuple[str, torch.Tensor]]:
        """(``local_experts.{e}.linear_fc{1,2}.weight``, view) per local expert: SequentialMLP's names."""
        out = []
        for e in range(self.num_local_experts):
            out.append((f"local_experts.{e}.linear_fc1.weight", self.weight1[e]))
            out.append((f"local_experts.{e}.linear_fc2.weight", self.weight2[e]))
        return out

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """``SequentialMLP``'s keys and global tensors ([E, 2F, H] for fc1 as [gate; up], [E, H, F] for
        fc2), with this rank's stacked parameters as the chunks, so optimizer state maps by identity and
        checkpoints interchange with ``SequentialMLP`` models at any layout."""
        from megatron.core.dist_checkpointing.mapping import (
            ShardedObject,
            ShardedTensor,
            ShardedTensorFactory,
        )

        if sharded_offsets:
            raise ValueError("GroupedGemmExperts does not support extra sharded offsets (virtual pipeline)")
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        ep_rank, ep = self.ep_group.rank(), self.ep_group.size()
        etp_rank, etp = self.tp_group.rank(), self.tp_group.size()
        replica_id = (0, 0, self.dp_group.rank())
        fc1_key, fc2_key = f"{prefix}experts.linear_fc1.weight", f"{prefix}experts.linear_fc2.weight"

        def build_fc1(key, t, replica, flattened_range):
            w, v = torch.chunk(t, 2, dim=1)  # [gate; up] halves of this rank's rows
            return [ShardedTensor.from_rank_offsets(key, w, (0, ep_rank, ep), (1, etp_rank, 2 * etp), replica_id=replica),
                    ShardedTensor.from_rank_offsets(key, v, (0, ep_rank, ep), (1, etp + etp_rank, 2 * etp),
                                                    replica_id=replica)]

        def merge_fc1(parts):
            return torch.cat(parts, dim=1)

        out = {
            f"{prefix}weight1": ShardedTensorFactory(fc1_key, self.weight1, build_fc1, merge_fc1, replica_id),
            f"{prefix}weight2": ShardedTensor.from_rank_offsets(fc2_key, self.weight2, (0, ep_rank, ep),
                                                                (2, etp_rank, etp), replica_id=replica_id),
        }
        # SequentialMLP's linears also write an (empty) extra state per expert; write the same objects so
        # its models find them in our checkpoints
        first, num_global = ep_rank * self.num_local_experts, ep * self.num_local_experts
        for e in range(self.num_local_experts):
            for lin in ("linear_fc1", "linear_fc2"):
                out[f"{prefix}{_EXTRA.format(e=e, lin=lin)}"] = ShardedObject(
                    f"{prefix}experts.{lin}._extra_state", None, (num_global,), (first + e,),
                    (0, etp_rank, self.dp_group.rank()))
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the per-expert extra states above carry nothing for this module
        for key in [k for k in state_dict if k.startswith(f"{prefix}local_experts.")]:
            state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
