"""The benchmark cases: each builds its candidates on identical inputs and weights, plus a float32
reference, and says how many FLOPs and bytes one forward is and what its floor is.

Cases (issue #7), at the real 80B widths by default (``Shape.full``: B=4, T=4096, bf16):

* ``gdn-kernel``: the gated delta rule alone: ours as dispatched, fla called directly, our torch chunked
  path. Reference: the torch chunked path in float32 on the same (bf16-rounded) inputs.
* ``gdn-layer``: our mixer vs transformers' ``Qwen3NextGatedDeltaNet`` vs megatron-core's ``GatedDeltaNet``
  (built without Transformer Engine from ColumnParallelLinear / WrappedTorchNorm / RowParallelLinear), all
  mixer-only (no input norm in any of them), identical weights. Reference: our layer in fp32 on the
  pure-torch ops (they match transformers' layer to 1e-6 in tests/model).
* ``attention-layer``: our gated attention (``Qwen3NextSelfAttention``, megatron-core's ``SelfAttention``)
  vs transformers' ``Qwen3NextAttention`` (SDPA). Reference: transformers' layer in fp32.
* ``moe-block``: megatron ``MoELayer`` with our grouped-GEMM experts vs transformers' sparse MoE block
  with its fastest experts implementation available. Reference: transformers' block in fp32 (eager experts).

The floor of a layer is its GEMM FLOPs at the matmul rate measured in the same run plus the time of
its non-GEMM kernel measured in the same run (the fla chunk kernel for GDN, SDPA's flash kernel for
attention; none for MoE, whose floor is its grouped GEMMs). Backward GEMMs count twice the forward.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..config import Qwen3NextConfig, get_preset
from ..model import load_hf_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    """Problem size and precision of a run."""

    batch: int
    seq: int
    dtype: torch.dtype
    config: Qwen3NextConfig

    @staticmethod
    def full(batch: int = 4, seq: int = 4096) -> Shape:
        """The real 80B layer widths (vocab cut: no case touches the embedding)."""
        return Shape(batch, seq, torch.bfloat16, get_preset("qwen3-next-80b-a3b", vocab_size=1024, mtp_num_layers=0))

    @staticmethod
    def small(batch: int = 2, seq: int = 64) -> Shape:
        """Toy widths in float32, for CPU runs of the runner itself (tests)."""
        return Shape(batch, seq, torch.float32, get_preset("tiny", vocab_size=1024, mtp_num_layers=0))

    def describe(self) -> dict:
        c = self.config
        return {"batch": self.batch, "seq": self.seq, "tokens": self.batch * self.seq, "dtype": str(self.dtype),
                "hidden": c.hidden_size, "gdn_heads": f"{c.linear_num_key_heads}x{c.linear_key_head_dim} k, "
                f"{c.linear_num_value_heads}x{c.linear_value_head_dim} v", "attention_heads":
                f"{c.num_attention_heads} q / {c.num_key_value_heads} kv x {c.head_dim}", "experts":
                f"{c.num_experts} top-{c.num_experts_per_tok} x {c.moe_intermediate_size} + shared "
                f"{c.shared_expert_intermediate_size}"}


@dataclass
class Candidate:
    """One implementation on the case's inputs.

    ``forward()`` returns the output in the case's common layout; ``input`` is the leaf whose gradient
    is compared (read through ``input_grad``, in the common layout); ``params`` maps common names to
    parameters whose gradients are compared too."""

    name: str
    forward: Callable[[], torch.Tensor]
    input: torch.Tensor
    input_grad: Callable[[], torch.Tensor]
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    modules: list[torch.nn.Module] = field(default_factory=list)
    note: str = ""

    def zero_grad(self) -> None:
        self.input.grad = None
        for m in self.modules:
            m.zero_grad(set_to_none=True)
        for p in self.params.values():
            p.grad = None


@dataclass
class Case:
    name: str
    reference: Candidate
    candidates: list[Candidate]
    unavailable: dict[str, str]  # candidate -> why it cannot run here
    flops_fwd: float  # model FLOPs of one forward (training: backward = 2x)
    bytes_fwd: float | None  # activation + weight bytes one forward must move at least
    floor: Callable[[float], tuple[float, float]] | None  # matmul TFLOP/s -> (fwd ms, fwd+bwd ms)
    tolerance: float
    info: dict = field(default_factory=dict)


# ----- construction helpers -----------------------------------------------------------------------

def fla_unavailable(device: torch.device) -> str | None:
    """Why fla's gated delta rule cannot run correctly on ``device`` (None when it can)."""
    if device.type != "cuda":
        return "needs CUDA"
    from ..ops.backends import detect_kernel_env, gdn_backend_report

    return gdn_backend_report(detect_kernel_env("cuda"), "fla")["error"]


def hf_config(config: Qwen3NextConfig, experts_implementation: str | None = None):
    import transformers

    hf = transformers.Qwen3NextConfig(**config.to_hf())
    hf._attn_implementation = "sdpa"
    if experts_implementation is not None:
        hf._experts_implementation = experts_implementation
    return hf


def _randomize(module: torch.nn.Module, generator: torch.Generator, std: float = 0.02) -> None:
    """Deterministic weights for a transformers module (its experts are created uninitialised):
    normal(std) for matrices, small noise around the module's own init for vectors (norm weights,
    dt_bias), A_log kept."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            if name.endswith("A_log"):
                continue
            if p.dim() >= 2:
                p.copy_(noise * std)
            else:
                p.add_(noise * 0.1)


class _Models:
    """Our one-decoder-layer-per-kind model (GDN layer 0, attention layer 1) in the run's dtype,
    built once and shared by the layer cases."""

    def __init__(self, shape: Shape, device: torch.device):
        from ..model import build_model

        cfg = shape.config.model_copy(update={"num_hidden_layers": 2,
                                              "layer_types": ("linear_attention", "full_attention")})
        self.config = cfg
        self.model = build_model(cfg, dtype=shape.dtype)
        self.model.to(device)
        self.gdn = self.model.decoder.layers[0].self_attention
        self.attention = self.model.decoder.layers[2].self_attention
        self.moe = self.model.decoder.layers[1].mlp


def _sbh_leaf(x_bth: torch.Tensor) -> torch.Tensor:
    return x_bth.transpose(0, 1).contiguous().requires_grad_(True)


def _ours_candidate(name: str, module, x_bth: torch.Tensor, call, params: dict, note: str = "") -> Candidate:
    x = _sbh_leaf(x_bth)
    return Candidate(name, lambda: call(module, x).transpose(0, 1), x, lambda: x.grad.transpose(0, 1),
                     params, [module], note)


def _hf_candidate(name: str, module, x_bth: torch.Tensor, call, params: dict, note: str = "") -> Candidate:
    x = x_bth.clone().requires_grad_(True)
    return Candidate(name, lambda: call(module, x), x, lambda: x.grad, params, [module], note)


# ----- gdn-kernel ---------------------------------------------------------------------------------

def gdn_kernel(shape: Shape, device: torch.device, models: _Models | None = None) -> Case:
    from ..ops.gated_delta_rule import gated_delta_rule
    from ..training.flops import forward_flops

    c = shape.config
    B, T, H, HV, K, V = shape.batch, shape.seq, c.linear_num_key_heads, c.linear_num_value_heads, \
        c.linear_key_head_dim, c.linear_value_head_dim
    gen = torch.Generator().manual_seed(0)

    base = [torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen),
            torch.randn(B, T, HV, V, generator=gen),
            torch.nn.functional.logsigmoid(torch.randn(B, T, HV, generator=gen) + 4),
            torch.rand(B, T, HV, generator=gen)]
    base = [t.to(device) if i == 3 else t.to(device, shape.dtype) for i, t in enumerate(base)]  # g stays fp32

    def candidate(name, fn, dtype):
        q, k, v, g, beta = (t.to(dtype if i != 3 else torch.float32).clone().requires_grad_(True)
                            for i, t in enumerate(base))
        return Candidate(name, lambda: fn(q, k, v, g, beta), v, lambda: v.grad,
                         {"dq": q, "dk": k, "dg": g, "dbeta": beta})

    def ours(backend):
        return lambda q, k, v, g, beta: gated_delta_rule(q, k, v, g=g, beta=beta, use_qk_l2norm=True,
                                                          backend=backend)[0]

    reference = candidate("reference (torch chunked, fp32)", ours("torch"), torch.float32)
    cands, unavailable = [candidate("ours (dispatched)", ours(None), shape.dtype)], {}
    why_not_fla = fla_unavailable(device)
    if why_not_fla is None:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        cands.append(candidate("fla direct", lambda q, k, v, g, beta: chunk_gated_delta_rule(
            q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)[0], shape.dtype))
        r = HV // H
        cands.append(candidate("fla direct (q/k repeated)", lambda q, k, v, g, beta: chunk_gated_delta_rule(
            q.repeat_interleave(r, 2), k.repeat_interleave(r, 2), v, g=g, beta=beta,
            use_qk_l2norm_in_kernel=True)[0], shape.dtype))
    else:
        unavailable["fla direct"] = why_not_fla
    cands.append(candidate("torch chunked", ours("torch"), shape.dtype))
    flops = forward_flops(c.model_copy(update={"num_hidden_layers": 1, "layer_types": ("linear_attention",)}),
                          T)["gdn_recurrence"] * B
    elt = torch.finfo(shape.dtype).bits // 8
    nbytes = B * T * (2 * H * K + 2 * HV * V) * elt + B * T * HV * (4 + elt)
    return Case("gdn-kernel", reference, cands, unavailable, flops, nbytes, None, 5e-2,
                {"floor": "the fla kernel itself (ratio to floor = ratio to 'fla direct')"})


# ----- gdn-conv -----------------------------------------------------------------------------------

def gdn_conv(shape: Shape, device: torch.device, models: _Models | None = None) -> Case:
    """The GDN short conv with the split of the projection into q, k, v, z (ops/gdn_conv_split.py): our
    fused kernels against the unfused ops (split, a causal conv, copies) with fla's and Dao-AILab's conv
    and with the torch conv; reference: the unfused torch ops in fp32. Floor: the bytes the op must move
    (forward: read the projection, write q, k, v, z; backward: read their gradients and the conv channels
    of the projection, write the projection's gradient) at the copy bandwidth measured here."""
    from ..ops.backends import detect_kernel_env
    from ..ops.gdn_conv_split import conv_split_qkvz
    from ..training.flops import forward_flops
    from .timing import measure

    c = shape.config
    B, T, G = shape.batch, shape.seq, c.linear_num_key_heads
    dk, dv, r, W = c.linear_key_head_dim, c.linear_value_head_dim, \
        c.linear_num_value_heads // c.linear_num_key_heads, c.linear_conv_kernel_dim
    C, CC = 2 * dk + 2 * r * dv, 2 * dk + r * dv
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, T, G, C, generator=gen).to(device)
    w0 = (0.5 * torch.randn(G * CC, W, generator=gen)).to(device)

    def candidate(name, backend, dtype):
        x = x0.to(dtype).clone().requires_grad_(True)  # each candidate its own leaves
        w = w0.to(dtype).clone().requires_grad_(True)
        return Candidate(name, lambda: conv_split_qkvz(x, w, dk=dk, dv=dv, r=r, backend=backend), x,
                         lambda: x.grad, {"conv_weight": w})

    reference = candidate("reference (unfused torch ops, fp32)", "torch", torch.float32)
    cands, unavailable = [], {}
    env = detect_kernel_env("cuda") if device.type == "cuda" else None
    if device.type == "cuda":
        cands.append(candidate("ours (fused conv + split)", "triton", shape.dtype))
    else:
        unavailable["ours (fused conv + split)"] = "needs CUDA (the tests run it under Triton's interpreter)"
    for name, backend, version in (("fla conv, unfused split", "fla", getattr(env, "fla", None)),
                                   ("causal-conv1d, unfused split", "causal_conv1d",
                                    getattr(env, "causal_conv1d", None))):
        if version is not None:
            cands.append(candidate(name, backend, shape.dtype))
        else:
            unavailable[name] = "needs CUDA and the package installed"
    cands.append(candidate("torch conv, unfused split", "torch", shape.dtype))
    flops = forward_flops(c.model_copy(update={"num_hidden_layers": 1, "layer_types": ("linear_attention",)}),
                          T)["gdn_conv"] * B
    elt = torch.finfo(shape.dtype).bits // 8
    n = B * T * G * C * elt  # the projection's bytes
    fwd_bytes, bwd_bytes = 2 * n, 2 * n + B * T * G * CC * elt
    src = x0.to(shape.dtype)
    dst = torch.empty_like(src)
    copy_ms = measure(lambda: dst.copy_(src), warmup=3, reps=10, device=device).median_ms  # moves 2 n bytes

    def floor(_matmul_tflops: float) -> tuple[float, float]:
        return copy_ms * fwd_bytes / (2 * n), copy_ms * (fwd_bytes + bwd_bytes) / (2 * n)

    return Case("gdn-conv", reference, cands, unavailable, flops, fwd_bytes, floor, 5e-2,
                {"floor": f"bytes moved at the copy bandwidth measured in this run ({2 * n / copy_ms / 1e6:.0f} GB/s)"})


# ----- gdn-layer ----------------------------------------------------------------------------------

def _gdn_gemm_flops(c: Qwen3NextConfig, tokens: int) -> float:
    h = c.hidden_size
    out = 2 * c.linear_num_key_heads * c.linear_key_head_dim + 2 * c.linear_num_value_heads * c.linear_value_head_dim
    return 2.0 * tokens * h * (out + 2 * c.linear_num_value_heads + c.linear_num_value_heads * c.linear_value_head_dim)


def _megatron_gdn(models: _Models, hf_state: dict, device: torch.device):
    """megatron-core's GatedDeltaNet (no TE) with the HF layer's weights."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    c = models.config
    tc = dataclasses.replace(models.model.config, layernorm_zero_centered_gamma=False)
    pgs = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
    layer = GatedDeltaNet(tc, GatedDeltaNetSubmodules(in_proj=ColumnParallelLinear, out_norm=WrappedTorchNorm,
                                                      out_proj=RowParallelLinear), layer_number=1,
                          pg_collection=pgs).to(device)
    kh, vh, dk, dv = c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim
    r, hid = vh // kh, c.hidden_size
    qkvz = hf_state["in_proj_qkvz.weight"].view(kh, 2 * dk + 2 * r * dv, hid)
    ba = hf_state["in_proj_ba.weight"].view(kh, 2 * r, hid)
    in_proj = torch.cat([qkvz[:, :dk].reshape(-1, hid), qkvz[:, dk:2 * dk].reshape(-1, hid),
                         qkvz[:, 2 * dk:2 * dk + r * dv].reshape(-1, hid), qkvz[:, 2 * dk + r * dv:].reshape(-1, hid),
                         ba[:, :r].reshape(-1, hid), ba[:, r:].reshape(-1, hid)])
    with torch.no_grad():
        layer.in_proj.weight.copy_(in_proj)
        layer.conv1d.weight.copy_(hf_state["conv1d.weight"])
        layer.dt_bias.copy_(hf_state["dt_bias"])
        layer.A_log.copy_(hf_state["A_log"])
        layer.out_norm.weight.copy_(hf_state["norm.weight"])
        layer.out_proj.weight.copy_(hf_state["out_proj.weight"])
    return layer


def _gdn_twin(gdn, device: torch.device, dtype: torch.dtype, backend: dict):
    """A copy of our GDN module ``gdn`` (same weights) in ``dtype`` with op ``backend`` choices."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from ..layers.gated_deltanet import GatedDeltaNetSubmodules, Qwen3NextGatedDeltaNet
    from ..layers.norms import GatedRMSNorm

    tc = dataclasses.replace(gdn.config, params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=False)
    sub = GatedDeltaNetSubmodules(in_proj_qkvz=ColumnParallelLinear, in_proj_ba=ColumnParallelLinear,
                                  out_norm=GatedRMSNorm, out_proj=RowParallelLinear, backend=backend)
    twin = Qwen3NextGatedDeltaNet(tc, sub, layer_number=1).to(device)
    state = {k: v if k in ("A_log", "dt_bias") else v.to(dtype) for k, v in gdn.state_dict().items()
             if not k.endswith("_extra_state")}
    twin.load_state_dict(state, strict=False)
    return twin


def gdn_layer(shape: Shape, device: torch.device, models: _Models) -> Case:
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextGatedDeltaNet

    from ..training.flops import forward_flops

    c = models.config
    B, T = shape.batch, shape.seq
    gen = torch.Generator().manual_seed(1)
    ref_layer = Qwen3NextGatedDeltaNet(hf_config(c), 0)
    _randomize(ref_layer, gen)
    hf_state = {k: v.detach().clone() for k, v in ref_layer.state_dict().items()}
    load_hf_weights(models.model, {f"model.layers.0.linear_attn.{k}": v for k, v in hf_state.items()},
                    only=("decoder.layers.0.self_attention.",))
    x = torch.randn(B, T, c.hidden_size, generator=gen).to(device)

    def hf_call(m, x):
        return m(x)

    def ours_call(m, x):
        return m(x)[0]

    hf_layer = Qwen3NextGatedDeltaNet(hf_config(c), 0)
    hf_layer.load_state_dict(hf_state)
    hf_layer = hf_layer.to(device=device, dtype=shape.dtype)
    for p in (hf_layer.A_log, hf_layer.dt_bias):  # as released: float32 decay parameters
        p.data = p.data.float()
    del ref_layer
    # reference: our layer in float32 on the pure-torch ops (conv, chunked recurrence), which match
    # transformers' layer to 1e-6 on CPU (tests/model); transformers' own float32 layer would run fla's
    # float32 kernels, minutes of extra Triton autotuning for no extra evidence
    ref_mod = _gdn_twin(models.gdn, device, torch.float32, {"gdn": "torch", "conv": "torch"})
    reference = _ours_candidate("reference (ours on torch ops, fp32)", ref_mod, x, ours_call,
                                {"out_proj": ref_mod.out_proj.weight})
    xs = x.to(shape.dtype)
    cands = [
        _ours_candidate("ours", models.gdn, xs, ours_call, {"out_proj": models.gdn.out_proj.weight}),
        _hf_candidate("transformers", hf_layer, xs, hf_call, {"out_proj": hf_layer.out_proj.weight}),
    ]
    rep = _gdn_twin(models.gdn, device, shape.dtype, {"gva": "repeat"})
    cands.insert(1, _ours_candidate("ours (q/k repeated)", rep, xs, ours_call, {"out_proj": rep.out_proj.weight}))
    fused = _gdn_twin(models.gdn, device, shape.dtype, {"gate": "fused"})
    cands.insert(2, _ours_candidate("ours (gating in kernel)", fused, xs, ours_call,
                                    {"out_proj": fused.out_proj.weight}))  # dA_log: tests/ops/test_ops_gpu.py
    unavailable = {}
    why = fla_unavailable(device)
    if why is None:  # the conv + split as separate ops with fla's conv (our default before the fused kernel)
        unfused = _gdn_twin(models.gdn, device, shape.dtype, {"conv": "fla"})
        cands.insert(3, _ours_candidate("ours (fla conv, unfused split)", unfused, xs, ours_call,
                                        {"out_proj": unfused.out_proj.weight}))
    else:
        unavailable["ours (fla conv, unfused split)"] = f"needs CUDA and fla ({why})"
    if why is None:
        mg = _megatron_gdn(models, hf_state, device).to(shape.dtype)
        cands.append(_ours_candidate("megatron-core GatedDeltaNet", mg, xs, lambda m, x: m(x, None)[0],
                                     {"out_proj": mg.out_proj.weight}))
    else:
        unavailable["megatron-core GatedDeltaNet"] = f"needs CUDA and fla ({why})"
    fl = forward_flops(c.model_copy(update={"num_hidden_layers": 1, "layer_types": ("linear_attention",)}), T)
    flops = B * (fl["gdn_proj"] + fl["gdn_conv"] + fl["gdn_recurrence"])
    gemm = _gdn_gemm_flops(c, B * T)
    kernel = _kernel_times(gdn_kernel(shape, device), "fla direct", device) if why is None else None
    elt = torch.finfo(shape.dtype).bits // 8
    nbytes = 2 * B * T * c.hidden_size * elt + gemm / (2 * B * T) * elt
    return Case("gdn-layer", reference, cands, unavailable, flops, nbytes, _floor(gemm, kernel), 5e-2,
                {"floor": "GEMMs (in_proj_qkvz, in_proj_ba, out_proj) at the matmul rate + the fla chunk kernel "
                 "(l2norm in kernel) timed in this run", "kernel_ms": kernel})


def _kernel_times(case: Case, name: str, device: torch.device, reps: int = 20) -> tuple[float, float] | None:
    """(fwd ms, fwd+bwd ms) of one candidate of ``case`` (used for floors)."""
    from .timing import time_fwd_bwd

    cand = next((c for c in case.candidates if c.name == name), None)
    if cand is None:
        return None
    fwd, both = time_fwd_bwd(cand.forward, cand.zero_grad, warmup=3, reps=reps, device=device)
    return fwd.median_ms, both.median_ms


def _floor(gemm_flops: float, kernel: tuple[float, float] | None):
    def floor(tflops: float) -> tuple[float, float]:
        k_f, k_fb = kernel or (0.0, 0.0)
        return gemm_flops / (tflops * 1e12) * 1e3 + k_f, 3 * gemm_flops / (tflops * 1e12) * 1e3 + k_fb
    return floor


# ----- attention-layer ----------------------------------------------------------------------------

def attention_layer(shape: Shape, device: torch.device, models: _Models) -> Case:
    from transformers.models.qwen3_next.modeling_qwen3_next import (
        Qwen3NextAttention,
        Qwen3NextRotaryEmbedding,
    )

    from ..training.flops import forward_flops

    c = models.config
    B, T = shape.batch, shape.seq
    gen = torch.Generator().manual_seed(2)
    hfc = hf_config(c)
    ref_layer = Qwen3NextAttention(hfc, 1)
    _randomize(ref_layer, gen)
    hf_state = {k: v.detach().clone() for k, v in ref_layer.state_dict().items()}
    load_hf_weights(models.model, {f"model.layers.1.self_attn.{k}": v for k, v in hf_state.items()},
                    only=("decoder.layers.2.self_attention.",))
    ref_layer = ref_layer.to(device=device, dtype=torch.float32)
    hf_layer = Qwen3NextAttention(hfc, 1)
    hf_layer.load_state_dict(hf_state)
    hf_layer = hf_layer.to(device=device, dtype=shape.dtype)
    x = torch.randn(B, T, c.hidden_size, generator=gen).to(device)
    rotary = Qwen3NextRotaryEmbedding(hfc).to(device)
    pos = torch.arange(T, device=device).unsqueeze(0).expand(B, T)
    cos32, sin32 = rotary(x, pos)
    cos16, sin16 = cos32.to(shape.dtype), sin32.to(shape.dtype)
    rope = models.model.rotary_pos_emb(T)

    def hf_call(pe):
        return lambda m, x: m(x, position_embeddings=pe, attention_mask=None)[0]

    def ours_call(m, x):
        return m(x, attention_mask=None, rotary_pos_emb=rope)[0]

    xs = x.to(shape.dtype)
    reference = _hf_candidate("reference (transformers, fp32)", ref_layer, x, hf_call((cos32, sin32)),
                              {"o_proj": ref_layer.o_proj.weight})
    cands = [
        _ours_candidate("ours", models.attention, xs, ours_call, {"o_proj": models.attention.linear_proj.weight}),
        _hf_candidate("transformers (sdpa)", hf_layer, xs, hf_call((cos16, sin16)), {"o_proj": hf_layer.o_proj.weight}),
    ]
    fl = forward_flops(c.model_copy(update={"num_hidden_layers": 1, "layer_types": ("full_attention",)}), T)
    flops = B * (fl["attn_proj"] + fl["attn_core"])
    h, nh, kvh, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    gemm = 2.0 * B * T * h * (2 * nh * hd + 2 * kvh * hd + nh * hd)
    kernel = _sdpa_times(B, T, nh, kvh, hd, shape.dtype, device) if device.type == "cuda" else None
    elt = torch.finfo(shape.dtype).bits // 8
    nbytes = 2 * B * T * h * elt + gemm / (2 * B * T) * elt
    return Case("attention-layer", reference, cands, {}, flops, nbytes, _floor(gemm, kernel), 5e-2,
                {"floor": "GEMMs (q+gate, k, v, o) at the matmul rate + causal SDPA (flash) on the same q/k/v "
                 "timed in this run", "kernel_ms": kernel})


def _sdpa_times(B, T, nh, kvh, hd, dtype, device, reps: int = 20) -> tuple[float, float]:
    from .timing import time_fwd_bwd

    q = torch.randn(B, nh, T, hd, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, kvh, T, hd, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(B, kvh, T, hd, device=device, dtype=dtype, requires_grad=True)

    def zero_grad():
        q.grad = k.grad = v.grad = None

    fwd, both = time_fwd_bwd(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        zero_grad, warmup=3, reps=reps, device=device)
    return fwd.median_ms, both.median_ms


# ----- moe-block ----------------------------------------------------------------------------------

def _fastest_experts_implementation(device: torch.device) -> list[str]:
    return ["grouped_mm", "batched_mm", "eager"] if device.type == "cuda" else ["eager"]


def moe_block(shape: Shape, device: torch.device, models: _Models) -> Case:
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextSparseMoeBlock

    from ..training.flops import forward_flops

    c = models.config
    B, T = shape.batch, shape.seq
    gen = torch.Generator().manual_seed(3)
    ref_block = Qwen3NextSparseMoeBlock(hf_config(c, "eager"))
    _randomize(ref_block, gen)
    with torch.no_grad():  # well-separated router logits: bf16 rounding must not change the top-k picks
        ref_block.gate.weight.mul_(10)
    hf_state = {k: v.detach().clone() for k, v in ref_block.state_dict().items()}
    load_hf_weights(models.model, {f"model.layers.0.mlp.{k}": v for k, v in hf_state.items()},
                    only=("decoder.layers.1.mlp.",))
    ref_block = ref_block.to(device=device, dtype=torch.float32)
    x = torch.randn(B, T, c.hidden_size, generator=gen).to(device)

    def hf_call(m, x):
        out = m(x)
        return out[0] if isinstance(out, tuple) else out

    def ours_call(m, x):
        return m(x)[0]

    xs = x.to(shape.dtype)
    reference = _hf_candidate("reference (transformers, fp32, eager experts)", ref_block, x, hf_call,
                              {"shared_down": ref_block.shared_expert.down_proj.weight})
    ours = models.moe
    cands = [_ours_candidate("ours (grouped GEMM experts)", ours, xs, ours_call,
                             {"shared_down": ours.shared_experts.linear_fc2.weight})]

    def padded_call(m, x):  # the padded experts layout: batched GEMMs (layers/moe.py)
        m.token_dispatcher.experts_layout = "padded"
        try:
            return m(x)[0]
        finally:
            m.token_dispatcher.experts_layout = "grouped"

    cands.append(_ours_candidate("ours (padded layout, batched GEMMs)", ours, xs, padded_call,
                                 {"shared_down": ours.shared_experts.linear_fc2.weight}))
    unavailable = {}
    autotuned = _autotuned_experts_candidate(ours, xs, device)
    if isinstance(autotuned, str):
        unavailable["ours (autotuned grouped GEMMs)"] = autotuned
    else:
        cands.append(autotuned)
    impls = _fastest_experts_implementation(device)
    for impl in impls:
        try:
            blk = Qwen3NextSparseMoeBlock(hf_config(c, impl))
            blk.load_state_dict(hf_state)
            blk = blk.to(device=device, dtype=shape.dtype)
            with torch.no_grad():
                hf_call(blk, xs[:, :8].contiguous())  # does this implementation run here?
        except Exception as e:  # noqa: BLE001 - reported, next implementation tried
            unavailable[f"transformers ({impl} experts)"] = f"{type(e).__name__}: {e}"
            continue
        cands.append(_hf_candidate(f"transformers ({impl} experts)", blk, xs, hf_call,
                                   {"shared_down": blk.shared_expert.down_proj.weight}))
        break
    fl = forward_flops(c.model_copy(update={"num_hidden_layers": 1, "layer_types": ("linear_attention",)}), T)
    flops = B * (fl["router"] + fl["routed_experts"] + fl["shared_expert"])
    elt = torch.finfo(shape.dtype).bits // 8
    weights = (3 * c.num_experts * c.moe_intermediate_size + 3 * c.shared_expert_intermediate_size
               + c.num_experts + 1) * c.hidden_size * elt
    nbytes = 2 * B * T * c.hidden_size * elt + weights
    return Case("moe-block", reference, cands, unavailable, flops, nbytes, _floor(flops, None), 5e-2,
                {"floor": "router + routed top-k + shared expert GEMM FLOPs at the matmul rate (grouped-GEMM floor)",
                 "transformers_experts_tried": impls,
                 "measured_ms": {"torch's grouped GEMMs alone (the routed experts' two GEMMs and their four "
                                 "backward GEMMs, at this input's routing)": _grouped_gemms_alone(ours, xs, device)}})


def _autotuned_experts_candidate(moe, xs: torch.Tensor, device: torch.device):
    """Our block with its experts' grouped GEMMs on the opt-in "autotune" backend (Inductor's choice among
    its Triton grouped-GEMM templates and torch's kernel, tuned per shape), as a candidate; or why it
    cannot run here (the backend's rule, or the error of a first forward+backward, which also tunes)."""
    from ..ops.backends import detect_kernel_env, grouped_gemm_backend_report

    why = grouped_gemm_backend_report(detect_kernel_env(device.type), "autotune")["error"]
    if why is not None:
        return why

    def call(m, x):
        m.experts.gemm_backend = "autotune"  # (the backward keeps the backend its forward ran with)
        try:
            return m(x)[0]
        finally:
            m.experts.gemm_backend = None

    cand = _ours_candidate("ours (autotuned grouped GEMMs)", moe, xs, call,
                           {"shared_down": moe.shared_experts.linear_fc2.weight})
    try:
        cand.forward().float().sum().backward()
    except Exception as e:  # noqa: BLE001 - reported as unavailable, the case goes on
        return f"{type(e).__name__}: {e}"
    finally:
        cand.zero_grad()
    return cand


def _grouped_gemms_alone(moe, x: torch.Tensor, device: torch.device, reps: int = 20) -> dict:
    """{"fwd": ms, "fwd_bwd": ms} of the six grouped GEMMs of ``moe``'s routed experts (forward: fc1, fc2;
    backward: each one's input and weight gradient) at the routing ``moe``'s router gives ``x``
    [B, T, H], on random activations of those shapes: what the block's time would be if everything but
    torch's grouped GEMM were free."""
    from ..layers.grouped_experts import grouped_gemm
    from .timing import measure

    def gemm(a, b):
        return grouped_gemm(a, b, offs, backend="torch")

    experts = moe.experts
    w1, w2 = experts.weight1.detach(), experts.weight2.detach()  # [E, 2F, H], [E, H, F]
    with torch.no_grad():
        _, routing_map = moe.router(x)
        offs = torch.cumsum(routing_map.sum(0), 0).to(torch.int32)
    rows, (F2, H) = int(routing_map.sum()), w1.shape[1:]
    gen = torch.Generator(device=device).manual_seed(4)
    h_in, g1 = (torch.randn(rows, n, device=device, generator=gen).to(w1.dtype) for n in (H, F2))
    a_in, g2 = (torch.randn(rows, n, device=device, generator=gen).to(w1.dtype) for n in (F2 // 2, H))

    def fwd():
        return gemm(h_in, w1.transpose(1, 2)), gemm(a_in, w2.transpose(1, 2))

    def fwd_bwd():
        fwd()
        return gemm(g1, w1), gemm(g1.t(), h_in), gemm(g2, w2), gemm(g2.t(), a_in)

    with torch.no_grad():
        return {"fwd": measure(fwd, warmup=3, reps=reps, device=device).median_ms,
                "fwd_bwd": measure(fwd_bwd, warmup=3, reps=reps, device=device).median_ms}


LAYER_CASES = {"gdn-kernel": gdn_kernel, "gdn-conv": gdn_conv, "gdn-layer": gdn_layer, "attention-layer": attention_layer,
               "moe-block": moe_block}
