"""The benchmark runner on CPU (toy widths, fp32): every available candidate passes its correctness
check against the reference and is timed; a wrong candidate is refused and not timed; the report files
are written. GPU numbers come from `qwen3-next-mcore bench` on a GPU (docs/performance.md)."""

from __future__ import annotations

import json
import re

import torch

from qwen3_next_mcore.testing.distributed import run_distributed


def _run_small(rank, out_dir):
    from qwen3_next_mcore.bench import run

    return run(["gdn-kernel", "gdn-conv", "gdn-layer", "attention-layer", "moe-block"], out_dir=out_dir, size="small",
               warmup=0, reps=1, profile=True)


def test_small_run_checks_and_times_every_available_candidate(tmp_path):
    report = run_distributed(_run_small, 1, args=(str(tmp_path),))[0]
    expected = {"gdn-kernel": {"ours (dispatched)", "torch chunked"}, "gdn-conv": {"torch conv, unfused split"},
                "gdn-layer": {"ours", "ours (q/k repeated)", "ours (gating in kernel)", "transformers"},
                "attention-layer": {"ours", "transformers (sdpa)"},
                "moe-block": {"ours (grouped GEMM experts)", "ours (padded layout, batched GEMMs)",
                              "transformers (eager experts)"}}
    for name, cands in expected.items():
        res = report["cases"][name]
        assert "error" not in res, res
        rows = {r["candidate"]: r for r in res["rows"]}
        assert set(rows) == cands, rows
        for r in rows.values():
            # fp32 against the fp32 reference: agreement to rounding, not to the bf16 tolerance
            assert max(r["errors"].values()) < 1e-4, (name, r)
            assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and "refused" not in r
    assert "fla direct" in report["cases"]["gdn-kernel"]["unavailable"]
    assert "megatron-core GatedDeltaNet" in report["cases"]["gdn-layer"]["unavailable"]
    assert "ours (fused conv + split)" in report["cases"]["gdn-conv"]["unavailable"]
    conv = report["cases"]["gdn-conv"]["rows"][0]
    # an op with four outputs (q, k, v, z): each compared, and the projection's and the weight's gradients
    assert {"output_0", "output_3", "d_input", "d_conv_weight"} <= set(conv["errors"]), conv
    saved = json.loads((tmp_path / "bench_small.json").read_text())
    assert set(saved["cases"]) == set(expected)
    md = (tmp_path / "bench_small.md").read_text()
    assert "## gdn-layer" in md and "| ours |" in md
    # the routed experts' grouped GEMMs alone, at the block's own routing, beside the block
    [(label, gemms)] = report["cases"]["moe-block"]["info"]["measured_ms"].items()
    assert 0 < gemms["fwd"] < gemms["fwd_bwd"] and "grouped GEMMs alone" in label
    assert re.search(r"measured in this run: torch's grouped GEMMs alone .*: fwd [0-9.]+ ms, fwd\+bwd [0-9.]+ ms "
                     r"\([0-9.]+x the floor\)", md)
    assert not list(tmp_path.glob("*.tmp"))
    # one profiler table per timed candidate, naming the operators that ran
    tables = {p.name: p.read_text() for p in (tmp_path / "profile").glob("*.txt")}
    assert len(tables) == sum(len(c) for c in expected.values()), sorted(tables)
    assert "aten::mm" in tables["moe_block__ours__grouped_GEMM_experts.txt"]
    header = re.search(r"per step \(under the profiler\): wall ([0-9.]+) ms, host \(self CPU\) ([0-9.]+) ms",
                       tables["moe_block__ours__grouped_GEMM_experts.txt"])
    assert header and float(header[1]) > 0 and float(header[1]) >= 0.5 * float(header[2])


def test_optimizer_step_case_on_cpu(tmp_path):
    """The torch AdamW candidates against the float64 reference on the tiny model's weight shapes (our
    Triton kernel is CUDA-only: listed as unavailable), and the markdown table."""
    from qwen3_next_mcore.bench.optimizer_step import OURS
    from qwen3_next_mcore.bench.runner import markdown, run_optimizer_step
    from qwen3_next_mcore.config import get_preset

    res = run_optimizer_step(get_preset("tiny"), device=torch.device("cpu"), warmup=0, reps=1)
    rows = {r["candidate"]: r for r in res["rows"]}
    assert len(rows) == 2 and OURS in res["unavailable"]
    for r in rows.values():
        assert "refused" not in r and r["max_rel_error"] < 1e-6 and r["max_rel_error_bf16"] <= 2**-8
        assert r["median_ms"] > 0 and r["gbps"] > 0
    assert res["weights"] > 1e5 and res["floor_ms"] > 0
    md = markdown({"environment": {"device": "cpu", "date": "now"}, "shape": {}, "matmul_tflops": 1.0, "reps": 1,
                   "warmup": 0, "cases": {"optimizer-step": res}})
    assert "## optimizer-step" in md and "torch fused AdamW + bf16 copy |" in md


def test_a_wrong_candidate_is_refused_and_not_timed():
    from qwen3_next_mcore.bench.cases import Candidate, Case
    from qwen3_next_mcore.bench.runner import run_layer_case

    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))

    def candidate(name, scale):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        p = w.clone().requires_grad_(True)
        return Candidate(name, lambda: (x @ p) * scale, x, lambda: x.grad, {"w": p})

    case = Case("toy", candidate("reference", 1.0), [candidate("right", 1.0), candidate("wrong", 1.2)], {},
                flops_fwd=2 * 4 * 8 * 8, bytes_fwd=None, floor=None, tolerance=5e-2)
    res = run_layer_case(case, warmup=0, reps=2, device=torch.device("cpu"), matmul=1.0)
    rows = {r["candidate"]: r for r in res["rows"]}
    assert rows["right"]["fwd_ms"] >= 0 and "refused" not in rows["right"]
    assert rows["wrong"]["refused"].startswith("wrong: output rel error 2.00e-01")
    assert "fwd_ms" not in rows["wrong"]
    assert rows["wrong"]["errors"]["d_w"] > 0.1 and rows["wrong"]["errors"]["d_input"] > 0.1


def test_load_hf_weights_takes_a_state_dict(tmp_path):
    """load_hf_weights(model, hf_model.state_dict()) (fused experts, in memory) fills the model exactly as
    the saved folder does: what the benchmarks use to give every candidate the same weights."""
    run_distributed(_state_dict_vs_folder, 1, args=(str(tmp_path),))


def _state_dict_vs_folder(rank, tmp):
    from qwen3_next_mcore import parallel
    from qwen3_next_mcore.config import get_preset
    from qwen3_next_mcore.model import build_model, load_hf_weights
    from qwen3_next_mcore.testing.tiny_hf import make_hf_checkpoint

    parallel.initialize()
    cfg = get_preset("tiny", vocab_size=256)
    hf = make_hf_checkpoint(cfg, tmp, seed=5)
    a, b = build_model(cfg), build_model(cfg)
    load_hf_weights(a, tmp)
    state = hf.state_dict()
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)  # the fused 5.x layout
    state.update(hf.mtp_state)
    report = load_hf_weights(b, state)
    assert report["tensors"] > 0
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        if isinstance(p, torch.Tensor):
            assert torch.equal(p, q), n
    # only=: one layer's parameters from that layer's HF tensors alone; the rest keep their values
    c = build_model(cfg)
    before = {n: p.clone() for n, p in c.named_parameters()}
    layer0 = {k: v for k, v in state.items() if k.startswith("model.layers.0.linear_attn.")}
    assert load_hf_weights(c, layer0, only=("decoder.layers.0.self_attention.",))["tensors"] == 7
    for n, p in c.named_parameters():
        want = dict(a.named_parameters())[n] if n.startswith("decoder.layers.0.self_attention.") else before[n]
        assert torch.equal(p, want), n
    parallel.destroy()


def _run_train_step_small(rank, out: str) -> dict:
    from qwen3_next_mcore.bench import run

    return run(["train-step"], out_dir=out, size="small", warmup=0, reps=2, profile=True,
               train_step_modes=("none", "offload", "padded"))


def test_train_step_runs_each_candidate_in_its_own_process(tmp_path):
    """train-step on the tiny preset (fp32, CPU) through the runner: transformers and ours start from the
    same weights, so their first losses agree (ours predicts one more position per row: a 1/T difference
    at most), ours the same in each memory mode and experts layout; the report and a profiler table per
    candidate are written."""
    res = run_distributed(_run_train_step_small, 1, args=(str(tmp_path),))[0]["cases"]["train-step"]
    rows = {r["candidate"]: r for r in res["rows"]}
    assert set(rows) == {"transformers (eager experts, AdamW)", "ours (recompute none)",
                         "ours (activation offload)", "ours (padded experts layout)"}, res
    assert not res["refused"]
    ours, offload = rows["ours (recompute none)"], rows["ours (activation offload)"]
    assert ours["loss_rel_error"] < 1 / 64 and ours["loss_step0"] == offload["loss_step0"]
    padded = rows["ours (padded experts layout)"]["loss_step0"]
    assert abs(padded - ours["loss_step0"]) < 1e-6 * abs(ours["loss_step0"])  # (batched vs grouped GEMM sums)
    assert all(r["tokens_per_s"] > 0 and r["tflops_per_gpu"] > 0 for r in rows.values())
    saved = json.loads((tmp_path / "bench_small.json").read_text())
    assert [r["candidate"] for r in saved["cases"]["train-step"]["rows"]] == [r["candidate"] for r in res["rows"]]
    assert "| ours (recompute none) |" in (tmp_path / "bench_small.md").read_text()
    tables = {p.name: p.read_text() for p in (tmp_path / "profile").glob("*.txt")}
    assert sorted(tables) == ["train_step__ours__activation_offload.txt", "train_step__ours__padded_experts_layout.txt",
                              "train_step__ours__recompute_none.txt",
                              "train_step__transformers__eager_experts__AdamW.txt"], sorted(tables)
    assert "aten::mm" in tables["train_step__ours__recompute_none.txt"]
    # our optimizer step is torch's fused AdamW kernel (training/fused_adam.py), transformers' the foreach one
    assert "aten::_fused_adamw_" in tables["train_step__ours__recompute_none.txt"]


def test_train_step_table_gives_mfu_against_the_cards_datasheet_peak():
    from qwen3_next_mcore.bench.runner import markdown
    from qwen3_next_mcore.training.flops import dense_bf16_peak_tflops

    assert dense_bf16_peak_tflops("NVIDIA H200") == 989.4
    assert dense_bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert dense_bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert dense_bf16_peak_tflops("NVIDIA GH200 480GB") == 989.4
    assert dense_bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert dense_bf16_peak_tflops("AMD EPYC") is None
    row = {"candidate": "ours (recompute none)", "median_ms": 87.1, "tokens_per_s": 94006.0, "tflops_per_gpu": 339.0,
           "peak_gb": 39.0, "speedup_vs_transformers": 1.58, "loss_step0": 12.3251}
    report = {"environment": {"device": "NVIDIA H200", "date": "d", "host": "h"}, "shape": {}, "matmul_tflops": 774.0,
              "peak_tflops": 989.4, "warmup": 2, "reps": 4,
              "cases": {"train-step": {"config": {"preset": "proxy", "layers": 4, "experts": 64, "top_k": 10,
                                                  "batch": 2, "seq": 4096, "dtype": "torch.bfloat16"},
                                       "flops_per_step": 29.5e12, "rows": [row]}}}
    text = markdown(report)
    assert "| ours (recompute none) | 87.1 | 94,006 | 339 | 34.3% | 39.0 | 1.58 | 12.3251 |" in text, text
    assert "datasheet dense bf16 peak, 989 TFLOP/s" in text
    report["peak_tflops"] = None  # a card not in the table (or CPU): no MFU column value
    assert "| 339 | - | 39.0 |" in markdown(report)


def test_gdn_conv_case_in_bf16_checks_each_candidate_on_its_own_leaves():
    """bf16 candidates against the fp32 reference (as on a GPU): every output and both gradients reach
    each candidate (the fp32 reference's input is not the bf16 candidates' leaf)."""
    import torch

    from qwen3_next_mcore.bench.cases import Shape, gdn_conv
    from qwen3_next_mcore.bench.runner import check

    small = Shape.small()
    errors, refused = check(gdn_conv(Shape(small.batch, small.seq, torch.bfloat16, small.config), torch.device("cpu")))
    assert not refused, refused
    errs = errors["torch conv, unfused split"]
    assert set(errs) == {"output_0", "output_1", "output_2", "output_3", "d_input", "d_conv_weight"}
    assert 0 < max(errs.values()) < 1e-2, errs  # one bf16 rounding of inputs and outputs


def test_idle_gaps_take_the_union_of_overlapping_kernels():
    from qwen3_next_mcore.bench.timing import idle_gaps

    kernels = [("c", 30.0, 35.0), ("a", 0.0, 10.0), ("b", 2.0, 12.0),  # a and b overlap (two streams)
               ("d", 33.0, 40.0), ("e", 41.5, 50.0), ("f", 44.0, 45.0)]  # f inside e
    idle, gaps = idle_gaps(kernels)
    assert idle == 18.0 + 1.5  # 12 -> 30 and 40 -> 41.5
    assert gaps == [(18.0, "b", "c"), (1.5, "d", "e")]
    assert idle_gaps(kernels, top=1)[1] == [(18.0, "b", "c")]
    assert idle_gaps([]) == (0.0, [])
