"""training/wgrad_fusion.py: weight gradients added straight into the fp32 main grads: the dense linears'
by the GEMM (megatron-core's gradient-accumulation fusion, its apex GEMM supplied by
torch.addmm(out_dtype); CUDA only) and the word embedding's by one sorted index_put_ of the looked-up rows
(any device).

The embedding's row sums against float64 with repeated ids. The tiny model under megatron-core's DDP over
two micro-batches, run as built and again with every fusion undone (one process): on CPU (fp32) the
embedding's main grad equals the plain path's (dense gradient, then added) to fp32 summation order and
every other one bit for bit; on a GPU (bf16) the fused linears' main grads equal the plain path's to
within the bf16 rounding the plain path makes, the rest to 1e-4; fused modules leave no ``param.grad``.
The fused GEMM against float64 on a GPU."""

from __future__ import annotations

import pytest
import torch

from qwen3_next_mcore.testing.distributed import run_distributed
from qwen3_next_mcore.training.wgrad_fusion import (
    embedding_rows_into_main_grad,
    fused_wgrad_unavailable,
    wgrad_gemm_accum_fp32,
)

_gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _model_and_grads(rank, mtp_layers: int = 0, layout: str = "grouped"):
    """Build the tiny model under DDP (CPU or CUDA as available) and run forward/backward over two
    micro-batches twice: as built, then with every fusion undone. Returns (the names of the modules fused
    as built, {name: main_grad} as built, the same undone, {name: grad left} as built, {name: whether
    its backward marked the main grad as already added} as built). ``layout``: the MoE layers' experts
    layout ("grouped" or "padded", layers/moe.py)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

    from qwen3_next_mcore import parallel
    from qwen3_next_mcore.bench.train_step import _batch, _initial_hf_state
    from qwen3_next_mcore.config import get_preset
    from qwen3_next_mcore.layers.grouped_experts import GroupedGemmExperts
    from qwen3_next_mcore.layers.moe import set_experts_layout
    from qwen3_next_mcore.training.arguments import make_config
    from qwen3_next_mcore.training.loop import _build
    from qwen3_next_mcore.training.step import forward_backward

    parallel.initialize(seed=0)
    # a small vocabulary: a placeholder gradient allocated uninitialised then holds old values, not fresh zeros
    config = get_preset("tiny", vocab_size=1024, mtp_num_layers=mtp_layers)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = make_config(preset="tiny", data_path=("unused",), micro_batch_size=2, seq_length=32, lr=1e-3,
                      bf16=device.type == "cuda")
    # (transformers' model has no MTP weights: megatron-core's initialisation then)
    hf = None if mtp_layers else _initial_hf_state(config, torch.device("cpu"))
    _, ddp, _, _ = _build(cfg, hf_weights=hf, model_config=config)
    assert set_experts_layout(ddp.module, layout) == 4 + mtp_layers
    linears = {n: m for n, m in ddp.module.named_modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))}
    on = sorted(n for n, m in linears.items() if m.gradient_accumulation_fusion)
    embeddings = {n: m for n, m in ddp.module.named_modules() if isinstance(m, VocabParallelEmbedding)}
    on += sorted(n for n, m in embeddings.items() if type(m) is not VocabParallelEmbedding)
    experts = {n: m for n, m in ddp.module.named_modules() if isinstance(m, GroupedGemmExperts)}
    on += sorted(n for n, m in experts.items() if m.wgrad_into_main_grad)
    batches = []
    for seed in (1, 2):
        ids = _batch(config.vocab_size, 2, 32, torch.device("cpu")).roll(seed, dims=1)
        batches.append({"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(2, 32)})

    def grads():
        ddp.zero_grad_buffer()
        forward_backward([ddp], batches)
        return {n: p.main_grad.detach().double().cpu() for n, p in ddp.module.named_parameters()}

    as_built = grads()
    left = {n: p.grad is not None for n, p in ddp.module.named_parameters()}
    marked = {n: p.grad_added_to_main_grad for n, p in ddp.module.named_parameters()}
    for m in linears.values():
        m.gradient_accumulation_fusion = False
    for m in embeddings.values():
        m.__class__ = VocabParallelEmbedding
    for m in experts.values():
        m.wgrad_into_main_grad = False
    plain = grads()
    parallel.destroy()
    return on, as_built, plain, left, marked


def test_embedding_rows_into_main_grad_sums_repeated_ids():
    g = torch.Generator().manual_seed(0)
    main = torch.randn(50, 24, generator=g)
    ids = torch.tensor([[3, 7, 3, 0], [49, 3, 7, 11]])  # 3 three times, 7 twice
    grad = torch.randn(2, 4, 24, generator=g).to(torch.bfloat16)
    want = main.double().index_add(0, ids.reshape(-1), grad.reshape(-1, 24).double())
    embedding_rows_into_main_grad(main, ids, grad)
    assert float((main.double() - want).abs().max()) < 1e-6
    assert torch.equal(main[1], want[1].float())  # rows not looked up are untouched


# MTP looks the embedding up again; the padded experts layout runs the batched-GEMM autograd function
@pytest.mark.parametrize("mtp_layers,layout", [(0, "grouped"), (1, "grouped"), (1, "padded")],
                         ids=["no-mtp", "mtp", "mtp-padded-experts"])
def test_cpu_fuses_the_embedding_and_experts_and_matches_the_plain_path(mtp_layers, layout):
    assert "needs CUDA" in fused_wgrad_unavailable(torch.device("cpu"))
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the linears are fused too (see the GPU test)")
    on, as_built, plain, left, marked = run_distributed(_model_and_grads, 1, args=(mtp_layers, layout))[0]
    experts = sorted(n for n in on if n.endswith(".mlp.experts"))
    assert len(experts) == 4 + mtp_layers, on  # the tiny model's four MoE layers and MTP's
    assert on == ["embedding.word_embeddings", *experts]
    # DDP's hook would add the backward's placeholder gradient on top (uninitialised memory)
    assert sorted({n.rsplit(".", 1)[0] for n, m in marked.items() if m}) == sorted(on)  # (experts: two weights)
    for name, g in plain.items():
        if name.rsplit(".", 1)[0] in on:  # the same fp32 sums, maybe in another order
            assert g.abs().max() > 0
            assert float((as_built[name] - g).abs().max() / g.abs().max()) < 1e-6, name
        else:  # nothing else changed: bit for bit
            assert torch.equal(as_built[name], g) and torch.isfinite(g).all(), name
    assert not any(left.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_gemm_accumulates_in_fp32():
    g = torch.Generator().manual_seed(0)
    acc = torch.randn(384, 256, generator=g, dtype=torch.float64)
    x, dy = (torch.randn(4096, n, generator=g, dtype=torch.float64).to(torch.bfloat16) for n in (256, 384))
    want = acc + dy.double().t() @ x.double()
    got = acc.float().cuda()
    wgrad_gemm_accum_fp32(x.cuda(), dy.cuda(), got)
    plain = acc.float().cuda() + (dy.cuda().t() @ x.cuda()).float()  # the unfused path: bf16 wgrad, then add
    err = float((got.double().cpu() - want).abs().max() / want.abs().max())
    err_plain = float((plain.double().cpu() - want).abs().max() / want.abs().max())
    assert err < 1e-5 and err < err_plain / 10, (err, err_plain)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layout", ["grouped", "padded"])
def test_main_grads_match_the_plain_path_under_ddp(layout):
    on, fused, plain, left, marked = run_distributed(_model_and_grads, 1, args=(0, layout))[0]
    assert sorted({n.rsplit(".", 1)[0] for n, m in marked.items() if m}) == sorted(on)  # (experts: two weights)
    assert len(on) >= 5 and "output_layer" in on  # the GDN and attention projections, the output layer
    assert "embedding.word_embeddings" in on and sum(n.endswith(".mlp.experts") for n in on) == 4
    for name, g in plain.items():
        if name.rsplit(".", 1)[0] in on:  # the plain path rounds the wgrad to bf16, the fused one does not
            rel = float((fused[name] - g).norm() / g.norm().clamp_min(1e-30))
            assert rel < 2e-2, (name, rel)
        else:  # norms, experts, router: their gradients do not go through a fused path (equal
            # but for the order of sums in GPU kernels that may use atomics)
            rel = float((fused[name] - g).norm() / g.norm().clamp_min(1e-30))
            assert rel < 1e-4, (name, rel)
    assert not any(left.values())  # DDP cleared every param.grad (the fused linears' dummies included)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_experts_compiled_main_grad_add_and_copy_equal_torch():
    from qwen3_next_mcore.layers.grouped_experts import add_into_main_grad

    g = torch.Generator(device="cuda").manual_seed(0)
    for shape in ((8, 1024, 256), (8, 256, 512)):  # both expert weights' shapes: one compiled graph each
        main = torch.randn(shape, device="cuda", generator=g)
        grad = torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16)
        want = main.clone().add_(grad)
        add_into_main_grad(main, grad)  # CUDA default: the compiled kernel
        assert torch.equal(main, want)  # one fp32 add per element either way
        add_into_main_grad(main, grad, first=True)  # the step's first gradient: a copy
        assert torch.equal(main, grad.float())


@pytest.mark.parametrize("rows", [[3, 0, 5], [0, 0, 0]], ids=["an-empty-expert", "no-rows"])
def test_experts_gemm_backward_into_main_grad_copies_then_adds(rows):
    """The grouped experts' autograd function alone: its weight gradient against float64 per-expert
    products, copied into the main grad on the step's first backward (DDP's flag False) and added on the
    next; an expert without rows, or no rows at all, gets zeros."""
    from qwen3_next_mcore.layers.grouped_experts import _ExpertsGemm

    g = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(3, 16, 8, generator=g))  # [E, out, in]
    weight.main_grad = torch.full((3, 16, 8), 7.0)  # stale values: the first backward must overwrite them
    weight.grad_added_to_main_grad = False
    offs = torch.tensor(rows).cumsum(0).to(torch.int32)
    x = torch.randn(sum(rows), 8, generator=g, requires_grad=True)
    dy = torch.randn(sum(rows), 16, generator=g)
    want = torch.zeros(3, 16, 8, dtype=torch.float64)
    start = 0
    for e, n in enumerate(rows):
        want[e] = dy[start:start + n].double().t() @ x[start:start + n].double()
        start += n
    for expected in (want, 2 * want):  # first backward: a copy; the second: an add
        _ExpertsGemm.apply(x, weight, offs, None, True).backward(dy)
        assert weight.grad_added_to_main_grad
        assert float((weight.main_grad.double() - expected).abs().max()) < 1e-5
    if rows[1] == 0:
        assert torch.equal(weight.main_grad[1], torch.zeros(16, 8))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=_gpu)])
def test_experts_bmm_backward_into_main_grad_copies_then_adds(device):
    """The padded layout's batched-GEMM autograd function alone: its weight gradient against float64
    per-expert products (CUDA: accumulated by the GEMM in fp32, from bf16 operands), copied into the main
    grad on the step's first backward (DDP's flag False) and added on the next; its input gradient
    against torch's bmm; the padding rows (zeros) add nothing."""
    from qwen3_next_mcore.layers.grouped_experts import _ExpertsBmm

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    E, C, n_in, n_out = 3, 40, 64, 48
    weight = torch.nn.Parameter(torch.randn(E, n_out, n_in, generator=g).to(device, dtype))
    weight.main_grad = torch.full((E, n_out, n_in), 7.0, device=device)  # stale: the first backward overwrites
    weight.grad_added_to_main_grad = False
    x = torch.randn(E, C, n_in, generator=g)
    x[:, 33:] = 0  # padding rows
    x = x.to(device, dtype).requires_grad_()
    dy = torch.randn(E, C, n_out, generator=g).to(device, dtype)
    want = torch.einsum("eco,eci->eoi", dy.double(), x.double())
    for expected in (want, 2 * want):  # first backward: a copy; the second: an add
        x.grad = None
        _ExpertsBmm.apply(x, weight, True).backward(dy)
        assert weight.grad_added_to_main_grad
        err = float((weight.main_grad.double() - expected).abs().max() / expected.abs().max())
        assert err < (1e-5 if device == "cpu" else 2e-5), err  # CUDA: fp32 sums of exact bf16 products
        assert torch.equal(x.grad, torch.bmm(dy, weight.detach()))
