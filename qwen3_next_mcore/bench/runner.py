"""Run benchmark cases: check every candidate against the reference, refuse to time a wrong one, time
forward and forward+backward, and write ``NAME.json`` plus a markdown table.

``run(names, ...)`` is the API; ``qwen3-next-mcore bench`` and ``python -m benchmarks.run`` call it.
"""

from __future__ import annotations

import datetime
import gc
import json
import logging
import platform
from pathlib import Path

import torch

from ..training.flops import dense_bf16_peak_tflops
from .cases import LAYER_CASES, Case, Shape, _Models
from .optimizer_step import run_optimizer_step
from .timing import (
    atomic_write_text,
    fwd_bwd_step,
    matmul_tflops,
    outputs,
    peak_memory_gb,
    profile_table,
    rel_error,
    reset_peak_memory,
    time_fwd_bwd,
    write_profile,
)
from .train_step import run_train_step

log = logging.getLogger(__name__)
CASES = (*LAYER_CASES, "optimizer-step", "train-step")


def environment(device: torch.device) -> dict:
    """Card and versions, for the report."""
    import importlib.metadata as md

    def v(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    env = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "host": platform.node(),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "flash-linear-attention", "tilelang", "megatron-core", "transformers", "causal-conv1d",
                 "transformer-engine"):
        env[name] = v(name)
    return env


def check(case: Case, seed: int = 0) -> tuple[dict, dict]:
    """Run the reference and every candidate once (forward + backward with the same output gradient).
    Returns ({candidate: {what: relative error}}, {candidate: reason refused})."""
    ref = case.reference
    ref.zero_grad()
    out_ref = outputs(ref.forward())
    gen = torch.Generator(device=out_ref[0].device).manual_seed(seed)
    grads = [torch.randn(o.shape, generator=gen, device=o.device, dtype=torch.float32) for o in out_ref]
    torch.autograd.backward(out_ref, [g.to(o.dtype) for g, o in zip(grads, out_ref)])

    def named(outs):  # "output", or "output_0", "output_1", ... for an op with several
        return {"output" if len(outs) == 1 else f"output_{i}": o.detach() for i, o in enumerate(outs)}

    want = {**named(out_ref), "d_input": ref.input_grad().detach()}
    want.update({f"d_{k}": p.grad.detach() for k, p in ref.params.items()})
    del out_ref
    errors, refused = {}, {}
    for cand in case.candidates:
        cand.zero_grad()
        out = outputs(cand.forward())
        torch.autograd.backward(out, [g.to(o.dtype) for g, o in zip(grads, out)])
        got = {**named(out), "d_input": cand.input_grad()}
        got.update({f"d_{k}": None if p.grad is None else p.grad.detach() for k, p in cand.params.items()})
        errs = {}
        for k, w in want.items():
            errs[k] = float("inf") if got.get(k) is None else rel_error(got[k], w)
        errors[cand.name] = errs
        bad = {k: e for k, e in errs.items() if not e <= case.tolerance}
        if bad:
            refused[cand.name] = "wrong: " + ", ".join(f"{k} rel error {e:.2e}" for k, e in bad.items()) + \
                f" > {case.tolerance:g}"
        cand.zero_grad()
        del out, got
    ref.zero_grad()
    return errors, refused


def time_candidate(cand, *, warmup: int, reps: int, device: torch.device) -> dict:
    reset_peak_memory(device)
    fwd, both = time_fwd_bwd(cand.forward, cand.zero_grad, warmup=warmup, reps=reps, device=device)
    return {"fwd_ms": fwd.median_ms, "fwd_bwd_ms": both.median_ms, "fwd_min_ms": fwd.min_ms,
            "fwd_bwd_min_ms": both.min_ms, "reps": reps, "peak_gb": peak_memory_gb(device)}


def profile_candidate(case: str, cand, profile_dir: Path, *, device: torch.device, steps: int = 3) -> None:
    """Write a torch.profiler table of ``steps`` forward+backward calls of ``cand`` to ``profile_dir``."""
    table = profile_table(fwd_bwd_step(cand.forward, cand.zero_grad), steps=steps, device=device)
    cand.zero_grad()
    write_profile(profile_dir, case, cand.name, f"{steps} forward+backward steps", table)


def run_layer_case(case: Case, *, warmup: int, reps: int, device: torch.device, matmul: float,
                   profile_dir: Path | None = None) -> dict:
    errors, refused = check(case)
    floor = case.floor(matmul) if case.floor is not None else None
    rows = []
    for cand in case.candidates:
        row = {"candidate": cand.name, "errors": errors[cand.name]}
        if cand.name in refused:
            row["refused"] = refused[cand.name]
            rows.append(row)
            continue
        t = time_candidate(cand, warmup=warmup, reps=reps, device=device)
        row.update(t)
        if profile_dir is not None:
            profile_candidate(case.name, cand, profile_dir, device=device)
        row["fwd_tflops"] = case.flops_fwd / (t["fwd_ms"] * 1e-3) / 1e12
        row["fwd_bwd_tflops"] = 3 * case.flops_fwd / (t["fwd_bwd_ms"] * 1e-3) / 1e12
        if case.bytes_fwd:
            row["fwd_gbps"] = case.bytes_fwd / (t["fwd_ms"] * 1e-3) / 1e9
        if floor is not None:
            row["fwd_vs_floor"] = t["fwd_ms"] / floor[0]
            row["fwd_bwd_vs_floor"] = t["fwd_bwd_ms"] / floor[1]
        rows.append(row)
    timed = {r["candidate"]: r for r in rows if "fwd_ms" in r}
    for r in timed.values():
        r["fwd_bwd_speedup"] = {other: o["fwd_bwd_ms"] / r["fwd_bwd_ms"] for other, o in timed.items()
                                if other != r["candidate"]}
    return {"rows": rows, "unavailable": case.unavailable, "tolerance": case.tolerance,
            "flops_fwd": case.flops_fwd, "bytes_fwd": case.bytes_fwd,
            "floor_ms": None if floor is None else {"fwd": floor[0], "fwd_bwd": floor[1]}, "info": case.info}


def run(names: list[str], *, out_dir: str | Path = "benchmarks/results", size: str = "full", warmup: int = 5,
        reps: int = 20, batch: int | None = None, seq: int | None = None, device: str | None = None,
        profile: bool = False, train_step_modes: tuple[str, ...] | None = None) -> dict:
    """Run the cases ``names`` (see :data:`CASES`) and write ``out_dir/bench_<size>.json`` and ``.md``.

    ``size``: ``full`` (80B widths, B=4 x T=4096 bf16 for the layers; train-step B=2 x T=4096 on the
    proxy preset) or ``small`` (toy widths in fp32: a CPU run of the runner itself). ``profile``: also
    write a torch.profiler table per timed candidate to ``out_dir/profile/CASE__CANDIDATE.txt``.
    ``train_step_modes``: our candidates timed by ``train-step``, keys of
    :data:`~qwen3_next_mcore.bench.train_step.RECOMPUTE_MODES` (default: none, selective, full, offload;
    "padded" on request; transformers always runs)."""
    from .. import parallel

    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; expected some of {', '.join(CASES)}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if size == "full":
        shape = Shape.full(batch or 4, seq or 4096)
    elif size == "small":
        shape = Shape.small(batch or 2, seq or 64)
    else:
        raise ValueError(f"size={size!r}: expected 'full' or 'small'")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 references are fp32
    parallel.initialize(seed=1234)
    env = environment(dev)
    matmul = matmul_tflops(dev, shape.dtype, 8192 if dev.type == "cuda" else 256)
    log.info("matmul rate (%s, %s): %.1f TFLOP/s", env["device"], shape.dtype, matmul)
    peak = dense_bf16_peak_tflops(env["device"]) if dev.type == "cuda" else None
    report = {"environment": env, "shape": shape.describe(), "matmul_tflops": matmul, "peak_tflops": peak,
              "warmup": warmup, "reps": reps, "cases": {}}
    models = None
    profile_dir = Path(out_dir) / "profile" if profile else None
    for name in names:
        log.info("benchmark %s", name)
        try:
            if name == "optimizer-step":
                models = None
                gc.collect()
                from ..config import get_preset

                preset = get_preset("tiny" if size == "small" else "proxy")
                report["cases"][name] = run_optimizer_step(preset.model_copy(update={"mtp_num_layers": 0}),
                                                           device=dev, warmup=warmup, reps=reps)
            elif name == "train-step":
                models = None  # free the layer cases' model: each candidate runs in its own process
                gc.collect()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                small = size == "small"
                report["cases"][name] = run_train_step(
                    "tiny" if small else "proxy", {"vocab_size": 1024} if small else {}, batch=batch or 2,
                    seq=shape.seq, dtype=shape.dtype, device=dev, warmup=max(warmup // 2, 2),
                    reps=max(reps // 2, 3), profile_dir=profile_dir,
                    on_progress=lambda partial, name=name: _write_report(
                        {**report, "cases": {**report["cases"], name: partial}}, Path(out_dir), size),
                    **({"modes": tuple(train_step_modes)} if train_step_modes else {}))
            else:
                if models is None and name not in ("gdn-kernel", "gdn-conv"):  # these need no model
                    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

                    destroy_moe_metrics_tracker()
                    models = _Models(shape, dev)
                case = LAYER_CASES[name](shape, dev, models)
                report["cases"][name] = run_layer_case(case, warmup=warmup, reps=reps, device=dev, matmul=matmul,
                                                       profile_dir=profile_dir)
                del case
        except Exception as e:
            log.exception("benchmark %s failed", name)
            report["cases"][name] = {"error": f"{type(e).__name__}: {e}"}
        gc.collect()
        _write_report(report, Path(out_dir), size)  # after every case: a run cut short keeps what it measured
    parallel.destroy()
    return report


def _write_report(report: dict, out: Path, size: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"bench_{size}.json", json.dumps(report, indent=1, default=str))
    atomic_write_text(out / f"bench_{size}.md", markdown(report))


def _f(x, fmt=".2f"):
    return "-" if x is None else format(x, fmt)


def markdown(report: dict) -> str:
    """The report as markdown tables (one per case)."""
    env = report["environment"]
    lines = [f"# Benchmarks ({env['device']}, {env['date']})", "",
             "versions: " + ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("date", "host", "device") and v),
             "", "shape: " + ", ".join(f"{k} {v}" for k, v in report["shape"].items()), "",
             (f"dense matmul rate measured in this run: {report['matmul_tflops']:.0f} TFLOP/s; "
             f"median of {report['reps']} timed repeats after {report['warmup']} warm-up"), ""]
    for name, res in report["cases"].items():
        lines += [f"## {name}", ""]
        if "error" in res:
            lines += [f"failed: {res['error']}", ""]
            continue
        if name == "optimizer-step":
            lines += [(f"AdamW over the model's {res['weights'] / 1e9:.2f} B weights ({res['tensors']} tensors): "
                       f"fp32 main weights, gradients and moments, bf16 model weights; floor {res['floor_ms']:.2f} ms "
                       f"= 30 bytes per weight at the copy bandwidth measured in this run "
                       f"({res['copy_gbps']:.0f} GB/s)"), "",
                      ("| candidate | step ms | GB/s (30 B/weight) | / floor | max rel error (fp32, bf16) | "
                       "speedup vs others |"), "|---|---|---|---|---|---|"]
            for r in res["rows"]:
                errs = f"{r['max_rel_error']:.1e}, {r['max_rel_error_bf16']:.1e}"
                if "refused" in r:
                    lines.append(f"| {r['candidate']} | not timed: {r['refused']} | | | {errs} | |")
                    continue
                sp = ", ".join(f"{v:.2f}x vs {k}" for k, v in r["speedup"].items())
                lines.append(f"| {r['candidate']} | {r['median_ms']:.2f} | {r['gbps']:.0f} | {r['vs_floor']:.2f} | "
                             f"{errs} | {sp} |")
        elif name == "train-step":
            c = res["config"]
            lines += [(f"{c['preset']}: {c['layers']} layers, {c['experts']} experts top-{c['top_k']}, batch "
                      f"{c['batch']} x {c['seq']}, {c['dtype']}; {res['flops_per_step'] / 1e12:.1f} TFLOP per step "
                      "(model FLOPs, training_flops)"), "",
                      ("| candidate | step ms | tokens/s | TFLOP/s/GPU (MFU count) | MFU | peak GB | speedup vs "
                      "transformers | first loss |"), "|---|---|---|---|---|---|---|---|"]
            peak = report.get("peak_tflops")
            for r in res["rows"]:
                mfu = None if peak is None or r.get("tflops_per_gpu") is None else 100 * r["tflops_per_gpu"] / peak
                lines.append(f"| {r['candidate']} | {_f(r['median_ms'], '.1f')} | {_f(r['tokens_per_s'], ',.0f')} | "
                             f"{_f(r['tflops_per_gpu'], '.0f')} | {'-' if mfu is None else f'{mfu:.1f}%'} | "
                             f"{_f(r['peak_gb'], '.1f')} | {_f(r.get('speedup_vs_transformers'))} | "
                             f"{r['loss_step0']:.4f} |")
            if peak is not None:
                lines += ["", f"MFU: TFLOP/s/GPU over this card's datasheet dense bf16 peak, {peak:.0f} TFLOP/s"]
        else:
            fl = res["floor_ms"]
            lines += [f"forward {res['flops_fwd'] / 1e9:.1f} GFLOP (model count); floor "
                      + (f"fwd {fl['fwd']:.2f} ms, fwd+bwd {fl['fwd_bwd']:.2f} ms ({res['info'].get('floor')})"
                         if fl else f"- ({res['info'].get('floor', 'none')})")
                      + f"; correctness tolerance {res['tolerance']:g} (relative, vs the fp32 reference)", "",
                      ("| candidate | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s | fwd GB/s | fwd+bwd / floor | "
                      "max rel error | fwd+bwd speedup vs others |"), "|---|---|---|---|---|---|---|---|"]
            for r in res["rows"]:
                err = max(r["errors"].values())
                if "refused" in r:
                    lines.append(f"| {r['candidate']} | not timed: {r['refused']} | | | | | {err:.1e} | |")
                    continue
                sp = ", ".join(f"{v:.2f}x vs {k}" for k, v in r["fwd_bwd_speedup"].items())
                lines.append(f"| {r['candidate']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | "
                             f"{r['fwd_bwd_tflops']:.0f} | {_f(r.get('fwd_gbps'), '.0f')} | "
                             f"{_f(r.get('fwd_bwd_vs_floor'))} | {err:.1e} | {sp} |")
        for k, v in res.get("info", {}).get("measured_ms", {}).items():
            fl = res.get("floor_ms")
            ratio = f" ({v['fwd_bwd'] / fl['fwd_bwd']:.2f}x the floor)" if fl else ""
            lines.append(f"\n- measured in this run: {k}: fwd {v['fwd']:.2f} ms, fwd+bwd {v['fwd_bwd']:.2f} ms{ratio}")
        for k, v in res.get("unavailable", {}).items():
            lines.append(f"\n- unavailable here: {k}: {v}")
        for k, v in res.get("refused", {}).items():
            lines.append(f"\n- not timed: {k}: {v}")
        lines.append("")
    return "\n".join(lines)
