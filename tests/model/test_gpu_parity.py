"""GPU parity: our model on the fla/tilelang path (bf16 and fp32) against transformers on the same GPU.

transformers itself uses fla's kernels when fla is importable, so the float32 reference runs on the GPU
too. TF32 is disabled for torch's matmuls, but fla's Triton and TileLang kernels still multiply float32 in
TF32 (10-bit mantissa), so per-parameter gradients of the two float32 runs differ by up to a few 1e-3:
those are judged against a float64 run of transformers on the CPU, ours at most FP32_RATIO times
transformers' own float32 error. Tolerances and measured values: docs/numerics.md.
"""

from __future__ import annotations

import copy

import pytest
import torch

from qwen3_next_mcore.config import get_preset

from parity_helpers import grads_to_hf_names, hf_reference, make_batch, rel

pytestmark = pytest.mark.gpu

# bf16 is judged against transformers' own bf16 run: both are compared with the fp32 reference and our
# error may be at most BF16_RATIO times transformers' bf16 error (plus a small floor), for logits, MTP
# logits, loss and the median gradient. Measured values and why: docs/numerics.md.
BF16_RATIO, BF16_FLOOR = 1.5, 1e-3
FP32_LOGITS, FP32_LOSS, FP32_GRAD = 1e-4, 1e-5, 1e-3
# float32 per-parameter gradients: our worst against float64 <= FP32_RATIO x transformers' worst + floor.
FP32_RATIO, FP32_FLOOR = 1.5, 1e-4
DECAY = ("linear_attn.A_log", "linear_attn.dt_bias")  # sums of cancelling terms: docs/numerics.md


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from qwen3_next_mcore import parallel
    from qwen3_next_mcore.testing.tiny_hf import make_hf_checkpoint

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    parallel.initialize()
    cfg = get_preset("tiny", vocab_size=512, router_aux_loss_coef=0.0, hidden_size=128, head_dim=32,
                     linear_key_head_dim=32, linear_value_head_dim=32)
    d = tmp_path_factory.mktemp("gpu_ckpt")
    hf = make_hf_checkpoint(cfg, d, seed=11)
    ids = torch.randint(0, cfg.vocab_size, (2, 200), generator=torch.Generator().manual_seed(0))
    hf64 = copy.deepcopy(hf).double()
    hf64.config._experts_implementation = "eager"  # torch's grouped GEMM has no float64
    ref64 = hf_reference(hf64, {k: v.double() for k, v in hf.mtp_state.items()}, ids)
    del hf64
    hf = hf.cuda()
    hf.mtp_state = {k: v.cuda() for k, v in hf.mtp_state.items()}
    ids = ids.cuda()
    ref = hf_reference(hf, hf.mtp_state, ids)
    hf16 = hf.to(torch.bfloat16)
    ref16 = hf_reference(hf16, {k: v.bfloat16() for k, v in hf.mtp_state.items()}, ids)
    yield cfg, d, ids, ref, ref16, ref64
    parallel.destroy()


def _ours(cfg, d, ids, dtype):
    from qwen3_next_mcore.model import build_model, full_logits, load_hf_weights
    from qwen3_next_mcore.training import forward_backward

    model = build_model(cfg, dtype=dtype)
    load_hf_weights(model, d)
    logits, mtp = full_logits(model, ids, with_mtp=True)
    model.zero_grad(set_to_none=True)
    loss = forward_backward(model, [make_batch(ids)])["lm loss"]
    from qwen3_next_mcore.model.hf_weights import expert_view_grads, global_param_names

    names = global_param_names(model)
    grads = {names[n]: g.float().cpu() for n, g in expert_view_grads(model).items()}
    return logits.float(), mtp[0].float(), loss, grads_to_hf_names(cfg, grads)


def _errors(result, ref):
    logits, mtp, loss, grads = result
    ref_logits, ref_mtp, ref_loss, ref_grads = ref
    errs = {k: rel(grads[k].cpu(), ref_grads[k].cpu()) for k in grads}
    return dict(logits=rel(logits.cpu(), ref_logits.cpu()), mtp=rel(mtp.cpu(), ref_mtp.cpu()),
                loss=abs(loss - ref_loss) / ref_loss, grad=sorted(errs.values())[len(errs) // 2], grads=errs)


def _worst(errs: dict[str, float], n: int = 1) -> list[tuple[float, str]]:
    return sorted(((v, k) for k, v in errs.items() if not k.endswith(DECAY)), reverse=True)[:n]


def test_gpu_parity_fp32(setup):
    cfg, d, ids, ref, _, ref64 = setup
    result = _ours(cfg, d, ids, torch.float32)
    e = _errors(result, ref)
    print(f"\n[fp32] vs transformers fp32: logits {e['logits']:.2e} mtp {e['mtp']:.2e} loss {e['loss']:.2e} "
          f"median grad {e['grad']:.2e}; largest: " + ", ".join(f"{k} {v:.2e}" for v, k in _worst(e["grads"], 3)))
    assert e["logits"] <= FP32_LOGITS and e["mtp"] <= FP32_LOGITS and e["loss"] <= FP32_LOSS
    assert e["grad"] <= FP32_GRAD
    ours, theirs = _errors(result, ref64)["grads"], _errors(ref, ref64)["grads"]
    (ours_max, ours_name), (theirs_max, theirs_name) = _worst(ours)[0], _worst(theirs)[0]
    print(f"[fp32] largest gradient error vs float64: ours {ours_max:.2e} ({ours_name}), "
          f"transformers {theirs_max:.2e} ({theirs_name})")
    assert ours_max <= FP32_RATIO * theirs_max + FP32_FLOOR


def test_gpu_parity_bf16(setup):
    cfg, d, ids, ref, ref16, _ = setup
    ours = _errors(_ours(cfg, d, ids, torch.bfloat16), ref)
    theirs = _errors(ref16, ref)
    for key in ("logits", "mtp", "loss", "grad"):
        print(f"\n[bf16] {key}: ours {ours[key]:.2e} transformers-bf16 {theirs[key]:.2e}")
        assert ours[key] <= BF16_RATIO * theirs[key] + BF16_FLOOR, key
