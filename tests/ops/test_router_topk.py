"""The router's row top-k (ops/router_topk.py): the Triton kernel (on CPU under Triton's interpreter, and on
CUDA) against a stable descending sort; the backend rule and its errors."""

from __future__ import annotations

import pytest
import torch

from qwen3_next_mcore.ops.backends import KernelEnv, router_topk_backend_report
from qwen3_next_mcore.ops.router_topk import row_topk_indices, row_topk_reference

# name: (rows, experts, k, how the scores are made); every case compared index for index
_CASES = """
import json
import torch
from qwen3_next_mcore.ops.router_topk import row_topk_indices, row_topk_reference

gen = torch.Generator().manual_seed(0)
def scores(n, e, kind):
    if kind == "normal":
        return torch.randn(n, e, generator=gen)
    if kind == "ties":  # few distinct values: ties everywhere, decided by column
        return torch.randint(-3, 3, (n, e), generator=gen).float()
    if kind == "infinities":
        x = torch.randn(n, e, generator=gen)
        x[0] = float("-inf"); x[1, 3:9] = float("inf"); x[2, ::2] = float("-inf"); x[3] = 0.0; x[3, 1::3] = -0.0
        return x
    if kind == "bf16":
        return torch.randn(n, e, generator=gen).bfloat16()
    raise ValueError(kind)

cases = {"512 experts top-10": (37, 512, 10, "normal"), "ties": (19, 512, 10, "ties"),
         "infinities and signed zeros": (5, 64, 12, "infinities"), "bf16 scores": (9, 64, 3, "bf16"),
         "experts not a power of two, k = 1": (7, 40, 1, "normal"), "k = all experts": (6, 24, 24, "ties")}
out = {}
for name, (n, e, k, kind) in cases.items():
    x = scores(n, e, kind)
    got = row_topk_indices(x, k, backend="triton")
    out[name] = {"equal": bool(torch.equal(got, row_topk_reference(x, k))), "dtype": str(got.dtype),
                 "shape": list(got.shape)}
x = torch.randn(8, 32, generator=gen)[:, ::2]  # a strided view (copied to rows of unit stride)
out["strided view"] = {"equal": bool(torch.equal(row_topk_indices(x, 4, backend="triton"), row_topk_reference(x, 4))),
                       "dtype": "torch.int64", "shape": [8, 4]}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreted(run_interpreted):
    return run_interpreted(_CASES)


@pytest.mark.parametrize("case", ["512 experts top-10", "ties", "infinities and signed zeros", "bf16 scores",
                                  "experts not a power of two, k = 1", "k = all experts", "strided view"])
def test_kernel_under_the_interpreter_equals_the_stable_sort(case, interpreted):
    assert interpreted[case]["equal"], interpreted[case]
    assert interpreted[case]["dtype"] == "torch.int64"


def test_reference_orders_ties_by_column_and_matches_torch_topk_without_ties():
    x = torch.tensor([[1.0, 3.0, 3.0, -1.0, 3.0]])
    assert row_topk_reference(x, 3).tolist() == [[1, 2, 4]]
    y = torch.randn(50, 512, generator=torch.Generator().manual_seed(1))
    assert torch.equal(row_topk_reference(y, 10), torch.topk(y, 10, dim=1).indices)
    assert torch.equal(row_topk_indices(y, 10), torch.topk(y, 10, dim=1).indices)  # CPU: torch.topk


def test_few_experts_keep_torch_topk_by_default(monkeypatch):
    """Below TRITON_MIN_EXPERTS the automatic choice is torch.topk (faster there on an H200), even where the
    kernel would run; asked for, the kernel runs."""
    from qwen3_next_mcore.ops import router_topk

    asked = []
    monkeypatch.setattr(router_topk, "router_topk_backend",
                        lambda env, backend, interpreted: asked.append(backend) or "torch")
    router_topk.row_topk_indices(torch.randn(4, router_topk.TRITON_MIN_EXPERTS - 1), 2)
    router_topk.row_topk_indices(torch.randn(4, router_topk.TRITON_MIN_EXPERTS), 2)
    router_topk.row_topk_indices(torch.randn(4, 64), 2, backend="triton")
    assert asked == ["torch", None, "triton"]


def test_backend_rule_and_errors():  # (the rule shared with the other Triton ops: tests/ops/test_gdn_backends.py)
    gpu = KernelEnv(device="cuda", capability=(9, 0), triton="3.6.0")
    assert router_topk_backend_report(gpu, "torch")["backend"] == "torch"
    with pytest.raises(ValueError, match=r"k=0 must be in 1\.\.8"):
        row_topk_indices(torch.zeros(2, 8), 0)
    with pytest.raises(ValueError, match=r"\[tokens, experts\]"):
        row_topk_indices(torch.zeros(2, 3, 8), 2)


@pytest.mark.gpu
def test_kernel_on_cuda_equals_the_stable_sort():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for n, e, k, dtype in ((16384, 512, 10, torch.float32), (8192, 64, 10, torch.float32),
                           (1000, 512, 10, torch.bfloat16), (3, 160, 8, torch.float32)):
        x = torch.randn(n, e, device="cuda", generator=gen).to(dtype)
        assert torch.equal(row_topk_indices(x, k, backend="triton"), row_topk_reference(x, k)), (n, e, k, dtype)
    ties = torch.randint(-2, 2, (4096, 512), device="cuda", generator=gen).float()
    assert torch.equal(row_topk_indices(ties, 10), row_topk_reference(ties, 10))  # (512 experts: the kernel)
