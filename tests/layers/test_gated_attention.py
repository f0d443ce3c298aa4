"""layers/gated_attention.py: our gated attention against megatron-core's ``SelfAttention`` running on the
same module (same weights, same submodules): output and every gradient bit for bit in fp32 on CPU, with
the gate heads left a view of the fused projection (the copy the subclass exists to avoid);
ops/output_gate.py: the compiled gate (Inductor on CPU here, CUDA's default) against the eager one."""

from __future__ import annotations

import pytest
import torch

from qwen3_next_mcore.ops.output_gate import sigmoid_gate


def test_same_numbers_as_megatron_self_attention_without_the_copies():
    from megatron.core.transformer.attention import SelfAttention

    from qwen3_next_mcore import parallel
    from qwen3_next_mcore.config import get_preset
    from qwen3_next_mcore.layers.gated_attention import Qwen3NextSelfAttention
    from qwen3_next_mcore.model import build_model

    parallel.initialize(seed=3)
    try:
        model = build_model(get_preset("tiny", vocab_size=128, mtp_num_layers=0))
        ours = next(m for m in model.modules() if isinstance(m, Qwen3NextSelfAttention))
        with torch.no_grad():
            for p in ours.parameters():  # norm weights start at 0: make every parameter matter
                p.add_(torch.randn_like(p) * 0.1)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(11, 2, model.config.hidden_size, generator=g)
        rope = model.rotary_pos_emb(11)

        q, _, _, gate = ours.get_query_key_value_tensors(x, output_gate=True)
        assert gate.dim() == 5 and gate._base is not None and not gate.is_contiguous()  # a view, not a copy
        assert q.is_contiguous() and q.shape[2] == ours.num_attention_heads_per_partition

        out = {}
        for name, cls in (("ours", Qwen3NextSelfAttention), ("megatron", SelfAttention)):
            ours.__class__ = cls  # the same module (weights, submodules) run by megatron-core's own code
            xi = x.clone().requires_grad_()
            y, _ = ours(xi, attention_mask=None, rotary_pos_emb=rope)
            y.backward(torch.ones_like(y) + y.detach())
            out[name] = (y.detach(), xi.grad, {n: p.grad.clone() for n, p in ours.named_parameters()})
            ours.zero_grad(set_to_none=True)
        ours.__class__ = Qwen3NextSelfAttention
        (y, dx, grads), (ref_y, ref_dx, ref_grads) = out["ours"], out["megatron"]
        assert torch.equal(y, ref_y) and torch.equal(dx, ref_dx)
        assert grads.keys() == ref_grads.keys() and len(grads) >= 4
        for n in grads:
            assert torch.equal(grads[n], ref_grads[n]), n
    finally:
        parallel.destroy()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
def test_compiled_gate_reads_the_strided_view_like_eager(dtype, tol):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(7, 2, 2 * 3 * 16, generator=g).to(dtype)
    proj0 = (torch.randn(7, 2, 2, 8, 16, generator=g) * 3).to(dtype)  # per group [q x3, gate x3, k, v]
    dy = torch.randn(7, 2, 2 * 3 * 16, generator=g).to(dtype)
    outs = {}
    for backend in ("torch", "compile"):
        x, proj = x0.clone().requires_grad_(), proj0.clone().requires_grad_()
        gate = torch.split(proj, [3, 3, 1, 1], dim=-2)[1]
        y = sigmoid_gate(x, gate, backend=backend)
        y.backward(dy)
        outs[backend] = (y.detach(), x.grad, proj.grad)
    want = (x0.float() * torch.sigmoid(proj0[..., 3:6, :].float()).reshape(7, 2, -1)).to(dtype)
    assert torch.equal(outs["torch"][0], want)
    for a, b in zip(outs["compile"], outs["torch"]):
        assert a.dtype == b.dtype == dtype
        assert float((a.float() - b.float()).norm() / b.float().norm()) < tol
    assert outs["compile"][2][..., [0, 1, 2, 6, 7], :].abs().max() == 0  # only the gate heads get gradient


def test_gate_shape_errors_name_both_shapes():
    with pytest.raises(ValueError, match=r"x must be contiguous .* got x \[4, 2, 6\] .* gate \[4, 2, 5\]"):
        sigmoid_gate(torch.zeros(4, 2, 6), torch.zeros(4, 2, 5))
