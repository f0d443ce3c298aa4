"""Our dropless token permutation against megatron-core's ``permute``/``unpermute`` (fp64, CPU)."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import permute, unpermute

from qwen3_next_mcore.ops.token_permutation import permute_tokens, sort_by_expert, unpermute_tokens


def _routing(T, E, k, seed):
    g = torch.Generator().manual_seed(seed)
    p, idx = torch.randn(T, E, generator=g).softmax(-1).topk(k)
    routing_map = torch.zeros(T, E, dtype=torch.bool).scatter_(1, idx, True)
    return routing_map, torch.zeros(T, E, dtype=torch.float64).scatter_(1, idx, p.double())


@pytest.mark.parametrize("T,E,k", [(37, 16, 3), (64, 8, 1), (5, 4, 4)])
def test_same_rows_order_and_gradients_as_megatron(T, E, k):
    routing_map, probs = _routing(T, E, k, seed=T)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(T * k, 6, generator=g, dtype=torch.float64)  # stands in for the expert computation
    dy = torch.randn(T, 6, generator=g, dtype=torch.float64)

    rows_ref, probs_ref, sorted_ref, _, _ = permute(x, routing_map, probs=probs, num_out_tokens=T * k)
    y_ref = unpermute(rows_ref * w, sorted_ref, x.shape, routing_map=routing_map)
    (dx_ref,) = torch.autograd.grad((y_ref * dy).sum(), x)

    rows, row_probs, perm = permute_tokens(x, routing_map, probs, k)
    y = unpermute_tokens(rows * w, perm)
    (dx,) = torch.autograd.grad((y * dy).sum(), x)

    assert torch.equal(rows, rows_ref) and torch.equal(row_probs, probs_ref)
    assert torch.equal(perm.sorted_tokens, sorted_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-15, atol=1e-15)
    # each token's k rows hold that token
    assert torch.equal(perm.sorted_tokens[perm.slot_rows], torch.arange(T).unsqueeze(1).expand(T, k))


def test_bf16_combine_rounds_once():
    """The combine sums a token's copies in fp32 and rounds once: within one bf16 rounding of the fp64
    sum, and never further from it than megatron-core's bf16 scatter_add (equal on CPU; CUDA's bf16
    atomics round after every add)."""
    T, E, k = 256, 64, 10
    routing_map, _ = _routing(T, E, k, seed=3)
    rows = torch.randn(T * k, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    perm, _ = sort_by_expert(routing_map, k)
    exact = unpermute_tokens(rows.double(), perm)
    ours = unpermute_tokens(rows, perm)
    ref = unpermute(rows, perm.sorted_tokens, torch.Size((T, 128)))
    err = lambda y: float((y.double() - exact).norm() / exact.norm())
    assert ours.dtype == torch.bfloat16 and err(ours) < 2**-8
    assert err(ours) <= err(ref), (err(ours), err(ref))


@pytest.mark.parametrize("T,E,k,capacity", [(37, 16, 3, 16), (64, 8, 1, 32), (5, 4, 4, 5), (9, 6, 2, 7)])
def test_padded_layout_holds_the_grouped_rows_and_zeros(T, E, k, capacity):
    """Expert e's rows at ``e * capacity`` onwards, in the grouped layout's order, zeros after; the same
    combine and gradients as the grouped layout (fp64, exact)."""
    routing_map, probs = _routing(T, E, k, seed=T + capacity)
    counts = routing_map.sum(0)
    capacity = max(capacity, int(counts.max()))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(T, 6, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(T, 6, generator=g, dtype=torch.float64)
    rows, row_probs, perm = permute_tokens(x, routing_map, probs, k)
    prows, pprobs, pperm = permute_tokens(x, routing_map, probs, k, capacity=capacity, tokens_per_expert=counts)
    assert prows.shape == (E * capacity, 6) and pprobs.shape == (E * capacity,) and pperm.capacity == capacity
    start = 0
    for e in range(E):
        n = int(counts[e])
        assert torch.equal(prows[e * capacity:e * capacity + n], rows[start:start + n])
        assert torch.equal(pprobs[e * capacity:e * capacity + n], row_probs[start:start + n])
        assert not prows[e * capacity + n:(e + 1) * capacity].any() and not pprobs[e * capacity + n:(e + 1) * capacity].any()
        start += n
    w = torch.randn(T * k, 6, generator=g, dtype=torch.float64)  # stands in for the experts, row by row
    pw = torch.zeros(E * capacity, 6, dtype=torch.float64).index_copy(0, pperm.slot_rows.reshape(-1),
                                                                      w[perm.slot_rows.reshape(-1)])
    y = unpermute_tokens(rows * w, perm)
    py = unpermute_tokens(prows * pw, pperm)
    assert torch.equal(py, y)
    (dx,) = torch.autograd.grad((y * dy).sum(), x)
    (pdx,) = torch.autograd.grad((py * dy).sum(), x)
    assert torch.equal(pdx, dx)
    # the combine's backward gives the padding rows zeros (the experts' backward reads them)
    r = prows.detach().requires_grad_()
    (drows,) = torch.autograd.grad((unpermute_tokens(r, pperm) * dy).sum(), r)
    real = torch.zeros(E * capacity, dtype=torch.bool).index_fill_(0, pperm.slot_rows.reshape(-1), True)
    assert not drows[~real].any() and torch.equal(drows[pperm.slot_rows.reshape(-1)], dy.repeat_interleave(k, 0))
    with pytest.raises(ValueError, match="tokens_per_expert"):
        permute_tokens(x, routing_map, probs, k, capacity=capacity)


def test_bad_routing_map():
    with pytest.raises(ValueError, match="bool tensor"):
        sort_by_expert(torch.zeros(4, 3), 1)



@pytest.mark.parametrize("backend", ["torch", "compile"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_sum_copies_matches_the_gather_then_sum_reference(dtype, backend):
    """embedding_bag (CPU default) and the compiled gather-sum (CUDA default; Inductor's C++ here)."""
    from qwen3_next_mcore.ops.token_permutation import sum_copies, sum_copies_reference

    T, E, k = 300, 32, 10
    routing_map, _ = _routing(T, E, k, seed=5)
    perm, _ = sort_by_expert(routing_map, k)
    rows = torch.randn(T * k, 40, generator=torch.Generator().manual_seed(3)).to(dtype)
    got = sum_copies(rows, perm.slot_rows, backend=backend)
    want = sum_copies_reference(rows, perm.slot_rows)
    assert got.dtype == want.dtype == dtype and got.shape == (T, 40)
    if dtype == torch.bfloat16:  # both round once; the fp32 partial sums may differ in order
        torch.testing.assert_close(got, want, rtol=8e-3, atol=1e-2)
    else:
        tol = 1e-12 if dtype == torch.float64 else 1e-6  # same terms, summed in another order
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
