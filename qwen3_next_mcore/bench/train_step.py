"""``train-step``: one full optimizer step on the ``proxy`` preset (80B widths, 4 layers, 64 experts),
ours vs transformers' ``Qwen3NextForCausalLM``, same config, same initial weights, same batch.

Ours: the reference training loop's own parts (``training.loop._build``: megatron-core DDP with fp32
gradient buffers, ``get_megatron_optimizer`` Adam with fp32 main weights, our model in bf16), one
micro-batch of ``batch x seq`` tokens per step, once per memory mode (recompute none, selective, full;
activation offload) and, when asked for, with the padded experts layout (``layers/moe.py``).
transformers: bf16 parameters, ``torch.optim.AdamW`` (fused on CUDA), its fastest experts implementation,
SDPA attention; the loss from ``labels``. MTP is off in both (transformers has none); our MoE layers
also compute the load-balancing loss (transformers' forward does not unless asked).

Correctness first: the first-step losses of every candidate must agree with transformers' within
``tolerance`` (bf16), else the candidate is not timed. Timing: windows of four steps issued back to
back, no host read of the loss inside a window (our training loop reads each iteration's numbers after
issuing the next step; transformers' Trainer reads the loss at logging steps), the median window
time per step over ``reps`` windows. Tokens/s over timed steps (median step time),
TFLOP/s/GPU from :func:`qwen3_next_mcore.training.flops.training_flops` (the same count for both, with
the recompute mode's extra forward counted as work for ours' MFU but not for the tokens/s comparison),
and the peak memory of each.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import torch

from .timing import measure_steps, peak_memory_gb, profile_table, reset_peak_memory, write_profile

log = logging.getLogger(__name__)

STEPS_PER_WINDOW = 4  # steps issued back to back per timed window
# our candidates: the training options of each, and its label ("padded": no recompute, the opt-in padded
# experts layout; not in the default modes)
RECOMPUTE_MODES = {"none": {}, "selective": {"recompute_granularity": "selective"},
                   "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
                   "offload": {"cpu_offloading": True, "cpu_offloading_num_layers": 64},
                   "padded": {"experts_layout": "padded"}}
MODE_LABELS = {"none": "recompute none", "selective": "recompute selective", "full": "recompute full",
               "offload": "activation offload", "padded": "padded experts layout"}


def _batch(vocab: int, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0)).to(device)


def _ours_step(config, hf_state, ids, dtype, recompute: dict):
    from ..training.arguments import make_config
    from ..training.loop import _build, optimizer_step

    bf16 = dtype == torch.bfloat16
    cfg = make_config(preset="tiny", data_path=("unused",), bf16=bf16, micro_batch_size=ids.shape[0],
                      seq_length=ids.shape[1] - 1, lr=1e-5, moe_aux_loss_coeff=config.router_aux_loss_coef,
                      mtp_loss_scaling_factor=0.0, **recompute)
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker, get_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    destroy_moe_metrics_tracker()  # sized by the first model that records into it
    MoEAuxLossAutoScaler.main_loss_backward_scale = None  # a layer benchmark may have left a 0-d one
    # (the preset only satisfies the config's validation: the architecture is ``config``)
    _, ddp, optimizer, _ = _build(cfg, hf_weights=hf_state, model_config=config)

    tokens, labels = ids[:, :-1], ids[:, 1:]
    batch = {"tokens": tokens, "labels": labels, "loss_mask": torch.ones_like(tokens, dtype=torch.float32)}

    def step() -> torch.Tensor:
        out, _, _ = optimizer_step([ddp], optimizer, [batch])
        get_moe_metrics_tracker().clear()  # the training loop reads and clears it every iteration
        return out["lm loss"]  # on the device: the training loop reads it after issuing the next step

    return step, (ddp, optimizer)


def _hf_step(config, hf_state, ids, dtype, device):
    import transformers

    from .cases import _fastest_experts_implementation, hf_config

    errors = {}
    for impl in _fastest_experts_implementation(device):
        try:
            with torch.device(device):
                model = transformers.Qwen3NextForCausalLM(hf_config(config, impl))
            model.load_state_dict(hf_state)
            model = model.to(dtype=dtype).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.01, betas=(0.9, 0.95),
                                    fused=device.type == "cuda")
            def step(model=model, opt=opt, tokens=ids[:, :-1]) -> torch.Tensor:
                opt.zero_grad(set_to_none=True)
                loss = model(input_ids=tokens, labels=tokens).loss
                loss.backward()
                opt.step()
                return loss.detach()  # read by the caller when it needs it (the Trainer reads at logging)

            float(step())  # does this implementation run here? (also the first warm-up step)
            return step, (model, opt), impl, errors
        except Exception as e:  # noqa: BLE001 - reported, next implementation tried
            errors[impl] = f"{type(e).__name__}: {e}"
            gc.collect()
            torch.cuda.empty_cache() if device.type == "cuda" else None
    raise RuntimeError(f"no transformers experts implementation runs here: {errors}")


def _initial_hf_state(config, device: torch.device, seed: int = 0) -> dict:
    """Deterministic weights for the model (transformers' own initialisation), as a CPU state dict."""
    import transformers

    from .cases import hf_config

    torch.manual_seed(seed)
    with torch.device(device):  # initialising 2 B parameters on a CPU takes minutes
        model = transformers.Qwen3NextForCausalLM(hf_config(config, "eager"))
    with torch.no_grad():  # transformers 5.x creates its fused experts uninitialised
        gen = torch.Generator(device=device).manual_seed(seed)
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.copy_(torch.randn(p.shape, generator=gen, device=device) * config.initializer_range)
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    del model
    return state


def _candidate(rank: int, which: str, preset: str, overrides: dict, batch: int, seq: int, dtype: str,
               device_type: str, warmup: int, reps: int, reference_loss: float | None, tolerance: float,
               profile_dir: str | None = None) -> dict:
    """One candidate in its own process (so each peak memory is its own and nothing leaks into the next
    build): ``which`` is "transformers" or a recompute mode of ours. Returns its result row; with
    ``profile_dir``, also writes a torch.profiler table of two steps to ``train_step__CANDIDATE.txt`` there."""
    from .. import parallel
    from ..config import get_preset
    from ..training.flops import training_flops

    parallel.initialize(seed=1234)
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    torch_dtype = getattr(torch, dtype.removeprefix("torch."))
    config = get_preset(preset, **overrides).model_copy(update={"mtp_num_layers": 0})
    hf_state = _initial_hf_state(config, device)
    ids = _batch(config.vocab_size, batch, seq, device)
    reset_peak_memory(device)
    if which == "transformers":
        step, keep, impl, errors = _hf_step(config, hf_state, ids, torch_dtype, device)
        name, granularity, loss0 = f"transformers ({impl} experts, AdamW)", None, float(step())
    else:
        step, keep = _ours_step(config, hf_state, ids, torch_dtype, RECOMPUTE_MODES[which])
        name, granularity, errors = f"ours ({MODE_LABELS[which]})", RECOMPUTE_MODES[which].get("recompute_granularity"), {}
        loss0 = float(step())
    del hf_state
    row = {"candidate": name, "loss_step0": loss0, "unavailable": errors}
    if reference_loss is not None:
        row["loss_rel_error"] = err = abs(loss0 - reference_loss) / abs(reference_loss)
        if not err <= tolerance:
            row["refused"] = (f"first-step loss {loss0:.6f} vs transformers {reference_loss:.6f} "
                              f"(rel {err:.2e} > {tolerance})")
            parallel.destroy()
            return row
    t = measure_steps(step, warmup=warmup, reps=reps, steps_per_window=STEPS_PER_WINDOW, device=device)
    seconds = t.median_ms / 1e3
    row.update(t.as_dict(), tokens_per_s=batch * seq / seconds, peak_gb=peak_memory_gb(device),
               tflops_per_gpu=training_flops(config, seq, batch) / seconds / 1e12,
               hardware_tflops_per_gpu=training_flops(config, seq, batch, recompute=granularity) / seconds / 1e12)
    if profile_dir is not None:
        write_profile(profile_dir, "train-step", name, "2 optimizer steps", profile_table(step, steps=2, device=device))
    del step, keep
    parallel.destroy()
    return row


def run_train_step(preset: str, overrides: dict, *, batch: int, seq: int, dtype: torch.dtype, device: torch.device,
                   warmup: int, reps: int, tolerance: float = 2e-2,
                   modes=("none", "selective", "full", "offload"), profile_dir: Path | None = None,
                   on_progress=None) -> dict:
    """Time transformers, then ours per recompute mode, each in a fresh process; returns the case's
    result dict (see :mod:`qwen3_next_mcore.bench.runner`). ``profile_dir``: a profiler table per candidate;
    ``on_progress``: called with the result so far after every candidate (a run cut short keeps those)."""
    from ..config import get_preset
    from ..testing.distributed import run_distributed
    from ..training.flops import training_flops

    config = get_preset(preset, **overrides).model_copy(update={"mtp_num_layers": 0})
    common = (preset, overrides, batch, seq, str(dtype), device.type, warmup, reps)
    prof = None if profile_dir is None else str(profile_dir)
    hf_row = run_distributed(_candidate, 1, args=("transformers", *common, None, tolerance, prof))[0]
    result = {"rows": [hf_row], "refused": {},
              "unavailable": {f"transformers ({k} experts)": v for k, v in hf_row.pop("unavailable").items()},
              "flops_per_step": training_flops(config, seq, batch), "tokens_per_step": batch * seq,
              "config": {"preset": preset, "layers": config.num_hidden_layers, "experts": config.num_experts,
                         "top_k": config.num_experts_per_tok, "batch": batch, "seq": seq, "dtype": str(dtype)}}
    for mode in modes:
        if on_progress is not None:
            on_progress(result)
        row = run_distributed(_candidate, 1, args=(mode, *common, hf_row["loss_step0"], tolerance, prof))[0]
        if "refused" in row:
            result["refused"][row["candidate"]] = row["refused"]
        else:
            row["speedup_vs_transformers"] = hf_row["median_ms"] / row["median_ms"]
            result["rows"].append(row)
    return result
