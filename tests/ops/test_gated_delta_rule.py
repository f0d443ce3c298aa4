"""Chunked vs token-loop gated delta rule: outputs, final states and every gradient; plus transformers."""

from __future__ import annotations

import importlib
import importlib.util
from itertools import pairwise

import pytest
import torch

from qwen3_next_mcore.ops import backends as ops_backends
from qwen3_next_mcore.ops import chunk_gated_delta_rule, gated_delta_rule, naive_recurrent_gated_delta_rule

NAMES = ("q", "k", "v", "g", "beta", "h0")


def run(fn, q, k, v, g, beta, h0, **kwargs):
    o, s = fn(q, k, v, g=g, beta=beta, initial_state=h0, output_final_state=True, **kwargs)
    return o, s


def outputs_and_grads(fn, inputs, **kwargs):
    """o, final state, and the gradients of a random projection of both w.r.t. every input."""
    o, s = run(fn, *inputs, **kwargs)
    gen = torch.Generator().manual_seed(123)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o)
    ds = torch.randn(s.shape, generator=gen, dtype=torch.float64).to(s)
    leaves = [x for x in inputs if x is not None]
    grads = torch.autograd.grad((o * do).sum() + (s * ds).sum(), leaves)
    return o, s, dict(zip([n for n, x in zip(NAMES, inputs) if x is not None], grads))


def assert_close(rel, a, b, tol, what=""):
    oa, sa, ga = a
    ob, sb, gb = b
    errors = {"o": rel(oa, ob), "state": rel(sa, sb), **{f"d{n}": rel(ga[n], gb[n]) for n in gb}}
    assert ga.keys() == gb.keys()
    bad = {n: e for n, e in errors.items() if not e < tol}
    assert not bad, f"{what} relative errors above {tol}: {bad} (all: {errors})"


@pytest.mark.parametrize("T", [1, 7, 63, 64, 65, 130])
def test_chunk_matches_naive_odd_lengths_fp64(make_gdn_inputs, rel, T):
    inputs = make_gdn_inputs(2, T, 2, 4, 16, 8, seed=T)
    ref = outputs_and_grads(naive_recurrent_gated_delta_rule, inputs, use_qk_l2norm=True)
    out = outputs_and_grads(chunk_gated_delta_rule, inputs, use_qk_l2norm=True)
    assert_close(rel, out, ref, 1e-10, f"T={T}")


@pytest.mark.parametrize(
    "H, HV, K, V, l2norm, chunk_size",
    [
        (3, 3, 8, 12, False, 64),  # HV == H, K != V, no l2norm
        (2, 4, 12, 8, False, 16),  # grouped, several chunks
        (1, 4, 8, 8, True, 32),  # one key head for all value heads
    ],
)
def test_chunk_matches_naive_heads_and_dims_fp64(make_gdn_inputs, rel, H, HV, K, V, l2norm, chunk_size):
    inputs = make_gdn_inputs(2, 70, H, HV, K, V, seed=H * HV)
    ref = outputs_and_grads(naive_recurrent_gated_delta_rule, inputs, use_qk_l2norm=l2norm)
    out = outputs_and_grads(chunk_gated_delta_rule, inputs, use_qk_l2norm=l2norm, chunk_size=chunk_size)
    assert_close(rel, out, ref, 1e-10)


@pytest.mark.parametrize("decay", [0.02, 1.0, 8.0])
def test_chunk_matches_naive_fp32(make_gdn_inputs, rel, decay):
    inputs = make_gdn_inputs(1, 130, 2, 4, 32, 16, dtype=torch.float32, seed=7, decay=decay)
    ref = outputs_and_grads(naive_recurrent_gated_delta_rule, inputs, use_qk_l2norm=True)
    out = outputs_and_grads(chunk_gated_delta_rule, inputs, use_qk_l2norm=True)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    assert_close(rel, out, ref, 1e-5, f"decay={decay}")


def test_no_initial_state_and_custom_scale(make_gdn_inputs, rel):
    q, k, v, g, beta, _ = make_gdn_inputs(2, 33, 2, 2, 8, 8, h0=False)
    for fn in (naive_recurrent_gated_delta_rule, chunk_gated_delta_rule):
        o, s = fn(q, k, v, g=g, beta=beta, scale=0.3)
        assert s is None and o.shape == v.shape
    o1, s1 = naive_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, scale=0.3, output_final_state=True)
    o2, s2 = chunk_gated_delta_rule(q, k, v, g=g, beta=beta, scale=0.3, output_final_state=True, chunk_size=8)
    assert rel(o2, o1) < 1e-12 and rel(s2, s1) < 1e-12


def test_output_dtype_follows_v(make_gdn_inputs):
    q, k, v, g, beta, h0 = make_gdn_inputs(1, 20, 2, 4, 8, 8, dtype=torch.bfloat16, state_dtype=torch.float32)
    for fn in (naive_recurrent_gated_delta_rule, chunk_gated_delta_rule):
        o, s = run(fn, q, k, v, g, beta, h0)
        assert o.dtype == torch.bfloat16 and s.dtype == torch.float32


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_packed_sequences_equal_one_by_one(make_gdn_inputs, rel, index_dtype):
    bounds = [0, 1, 64, 64, 130, 200]  # a 1-token sequence, a chunk-sized one, an empty one, odd ones
    cu = torch.tensor(bounds, dtype=index_dtype)
    inputs = make_gdn_inputs(1, bounds[-1], 2, 4, 16, 8, n_states=len(bounds) - 1, seed=3)
    q, k, v, g, beta, h0 = inputs
    packed = outputs_and_grads(
        chunk_gated_delta_rule, inputs, use_qk_l2norm=True, cu_seqlens=cu, chunk_size=32
    )

    # the same leaves, one sequence at a time, with the same random projections of o and the states
    gen = torch.Generator().manual_seed(123)
    do = torch.randn(v.shape, generator=gen, dtype=torch.float64)
    ds = torch.randn(h0.shape, generator=gen, dtype=torch.float64)
    outs, states, loss = [], [], 0
    for n, (bos, eos) in enumerate(pairwise(bounds)):
        piece = [x[:, bos:eos] for x in (q, k, v, g, beta)] + [h0[n : n + 1]]
        o_n, s_n = run(chunk_gated_delta_rule, *piece, use_qk_l2norm=True, chunk_size=32)
        outs.append(o_n)
        states.append(s_n)
        loss = loss + (o_n * do[:, bos:eos]).sum() + (s_n * ds[n : n + 1]).sum()
    grads = dict(zip(NAMES, torch.autograd.grad(loss, inputs)))
    one_by_one = (torch.cat(outs, 1), torch.cat(states, 0), grads)
    assert_close(rel, packed, one_by_one, 1e-12, "packed vs one by one")

    ref = outputs_and_grads(naive_recurrent_gated_delta_rule, inputs, use_qk_l2norm=True, cu_seqlens=cu)
    assert_close(rel, packed, ref, 1e-10, "packed chunk vs packed naive")
    assert torch.equal(packed[1][2], h0[2]), "an empty sequence keeps its initial state"


def test_naive_matches_transformers_reference(make_gdn_inputs, rel):
    if importlib.util.find_spec("fla") is not None:
        pytest.skip("with fla installed, transformers routes its reference to fla kernels")
    hf = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    inputs = make_gdn_inputs(2, 50, 2, 4, 16, 8, dtype=torch.float32, seed=11)
    q, k, v, g, beta, h0 = inputs
    o_ref, s_ref = hf.torch_recurrent_gated_delta_rule(
        q, k, v, g=g, beta=beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True
    )
    for fn in (naive_recurrent_gated_delta_rule, chunk_gated_delta_rule):
        o, s = run(fn, *inputs, use_qk_l2norm=True)
        assert rel(o, o_ref) < 1e-5 and rel(s, s_ref) < 1e-5, fn.__name__


def test_dispatcher_on_cpu(make_gdn_inputs, rel):
    inputs = make_gdn_inputs(1, 40, 2, 4, 8, 8)
    ref = run(naive_recurrent_gated_delta_rule, *inputs)
    for backend in (None, "auto", "torch", "naive"):
        o, s = run(gated_delta_rule, *inputs, backend=backend)
        assert rel(o, ref[0]) < 1e-12 and rel(s, ref[1]) < 1e-12, backend
    with pytest.raises(RuntimeError, match="needs CUDA"):
        run(gated_delta_rule, *inputs, backend="fla")
    with pytest.raises(ValueError, match="backend must be"):
        run(gated_delta_rule, *inputs, backend="triton")


def test_dispatcher_refuses_cuda_without_fla(make_gdn_inputs, monkeypatch):
    """The wiring: a CUDA environment without fla raises before any kernel runs (no silent torch path)."""
    gdn = importlib.import_module("qwen3_next_mcore.ops.gated_delta_rule")  # the function shadows the name

    cuda = ops_backends.KernelEnv(device="cuda", capability=(9, 0), triton="3.6.0")
    monkeypatch.setattr(gdn, "env_for", lambda tensor: cuda)
    inputs = make_gdn_inputs(1, 8, 1, 1, 4, 4)
    with pytest.raises(RuntimeError, match=r"flash-linear-attention.*gpu.*backend='torch'"):
        run(gated_delta_rule, *inputs)
    o, _ = run(gated_delta_rule, *inputs, backend="torch")  # explicit torch is allowed anywhere
    assert o.shape == inputs[2].shape


@pytest.mark.parametrize(
    "change, match",
    [
        ({"k": torch.zeros(1, 5, 3, 4)}, "q and k"),
        ({"v": torch.zeros(1, 5, 3, 4)}, "multiple of key heads"),
        ({"g": torch.zeros(1, 5, 2)}, "g must be"),
        ({"initial_state": torch.zeros(2, 4, 4, 4)}, "initial_state"),
        ({"cu_seqlens": torch.tensor([0, 2, 4])}, "cu_seqlens must rise"),
    ],
)
def test_shape_errors(change, match):
    args = {
        "q": torch.zeros(1, 5, 2, 4),
        "k": torch.zeros(1, 5, 2, 4),
        "v": torch.zeros(1, 5, 4, 4),
        "g": torch.zeros(1, 5, 4),
        "beta": torch.zeros(1, 5, 4),
    }
    args.update(change)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    for fn in (naive_recurrent_gated_delta_rule, chunk_gated_delta_rule):
        with pytest.raises(ValueError, match=match):
            fn(q, k, v, **args)
