"""The reference training loop, built from megatron-core parts.

``train(cfg)``: parallel state -> model (optional HF weights) -> megatron-core ``DistributedDataParallel``
-> ``get_megatron_optimizer`` (Adam) + ``OptimizerParamScheduler`` -> data -> for each iteration: zero
the gradient buffers, run the forward/backward schedule over ``global / (micro * dp)`` micro-batches,
``finalize_model_grads`` (data-parallel and replicated-weight reductions), ``optimizer.step()`` (clips,
returns the grad norm), ``scheduler.step()``; log; checkpoint. Returns one metrics dict per iteration.

Metrics (docs/training.md lists them) are collected by the small ``_take_*``/``_memory_gb`` helpers and
written by the last rank: the log line, ``--log-json`` and ``--tensorboard-dir`` (``SummaryWriter``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint
from .arguments import TrainConfig
from .batches import MicroBatches
from .flops import dense_bf16_peak_tflops, training_flops
from .step import forward_backward

log = logging.getLogger(__name__)


class TrainingDiverged(FloatingPointError):
    """The loss or the gradient norm became NaN or infinite."""


def _dtype(cfg: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else torch.float32


def _check_runtime(cfg: TrainConfig, dp: int) -> int:
    """Checks that need the world size; returns the global batch size."""
    gbs = cfg.global_batch_size or cfg.micro_batch_size * dp
    if gbs % (cfg.micro_batch_size * dp):
        raise ValueError(f"--global-batch-size={gbs} must be a multiple of --micro-batch-size * data-parallel "
                         f"size = {cfg.micro_batch_size} * {dp}")
    if not torch.cuda.is_available() and (cfg.use_distributed_optimizer or cfg.bf16 or cfg.fp16):
        raise ValueError("on CPU only fp32 with the plain optimizer runs: megatron-core's distributed and "
                         "fp16/bf16 optimizers require CUDA tensors (drop --use-distributed-optimizer, "
                         "--bf16, --fp16)")
    return gbs


def _transformer_overrides(cfg: TrainConfig, model_cfg) -> dict:
    out: dict = {"mtp_loss_scaling_factor": cfg.mtp_loss_scaling_factor}
    if cfg.moe_aux_loss_coeff is not None:
        out["moe_aux_loss_coeff"] = cfg.moe_aux_loss_coeff
        out["moe_router_load_balancing_type"] = "aux_loss" if cfg.moe_aux_loss_coeff > 0 else "none"
    if cfg.fp8_format is not None:
        out["fp8"] = cfg.fp8_format
        out["fp8_recipe"] = cfg.fp8_recipe
    if cfg.recompute_granularity is not None:
        out["recompute_granularity"] = cfg.recompute_granularity
        if cfg.recompute_granularity == "full":
            out["recompute_method"] = cfg.recompute_method
            out["recompute_num_layers"] = cfg.recompute_num_layers
    return out


def _build(cfg: TrainConfig, hf_weights=None, model_config=None):
    """(model config, DDP-wrapped model, optimizer, scheduler). The architecture is ``model_config``
    if given, else ``cfg.model()``; initial weights: ``hf_weights`` (a HF state dict or folder, see
    ``load_hf_weights``) if given, else ``--hf-dir`` unless resuming."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from ..model import build_model, load_hf_weights
    from .fused_adam import use_fused_adam
    from .multi_tensor import keep_chained_grad_norm_on_device, use_foreach_multi_tensor_ops
    from .wgrad_fusion import use_wgrad_accumulation_fusion

    model_cfg = model_config or cfg.model()
    backend = "te" if cfg.transformer_impl == "transformer_engine" else "local"
    model = build_model(model_cfg, dtype=_dtype(cfg), backend=backend, sequence_parallel=cfg.sequence_parallel,
                        experts=cfg.experts, **_transformer_overrides(cfg, model_cfg))
    if cfg.experts_layout != "grouped":
        from ..layers.moe import set_experts_layout

        set_experts_layout(model, cfg.experts_layout)
    if cfg.cpu_offloading:
        from ..layers.activation_offload import enable_activation_offload

        enable_activation_offload(model, min(cfg.cpu_offloading_num_layers, len(model.decoder.layers) // 2))
    if hf_weights is not None:
        load_hf_weights(model, hf_weights)
    elif cfg.hf_dir is not None and checkpoint.latest_iteration(cfg.load) is None:
        load_hf_weights(model, cfg.hf_dir)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=cfg.use_distributed_optimizer)
    ddp = DistributedDataParallel(model.config, ddp_config, model)
    use_wgrad_accumulation_fusion(ddp)  # CUDA: the dense wgrad GEMMs add into the fp32 main grads
    opt_config = OptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps, clip_grad=cfg.clip_grad,
        bf16=cfg.bf16, fp16=cfg.fp16, params_dtype=_dtype(cfg),
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        optimizer_cpu_offload=cfg.optimizer_cpu_offload,
        optimizer_offload_fraction=cfg.optimizer_offload_fraction if cfg.optimizer_cpu_offload else 0.0,
    )
    use_foreach_multi_tensor_ops()  # megatron-core's TE/Apex-less grad norm synchronised once per tensor
    optimizer = get_megatron_optimizer(opt_config, [ddp], use_gloo_process_groups=not torch.cuda.is_available())
    use_fused_adam(optimizer)  # megatron-core's torch fallback would run the multi-pass foreach Adam
    keep_chained_grad_norm_on_device(optimizer)  # the dense + expert optimizers' norms combined on the GPU
    # steps are counted in iterations (Megatron-LM counts samples; the schedule is the same)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr, lr_warmup_steps=cfg.lr_warmup_iters,
        lr_decay_steps=cfg.decay_iters, lr_decay_style=cfg.lr_decay_style, start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay, wd_incr_steps=cfg.train_iters, wd_incr_style="constant",
    )
    ddp.config.grad_scale_func = optimizer.scale_loss  # the schedule scales each micro-batch's loss (fp16)
    return model_cfg, ddp, optimizer, scheduler


def _datasets(cfg: TrainConfig, model_cfg, gbs: int):
    """(train dataset, validation dataset or None, shuffle?, packed?)"""
    from ..data import (
        build_pretrain_datasets,
        build_sft_dataset,
        check_vocab,
        default_tokenizer_dir,
        load_tokenizer,
    )

    tok_dir = cfg.tokenizer or default_tokenizer_dir()
    if cfg.sft:
        template = None if cfg.tokenizer else "qwen3_next_instruct"  # the bundled tokenizer has Qwen3's template
        tok = load_tokenizer(tok_dir, chat_template=template)
        check_vocab(tok, model_cfg.vocab_size)
        ds = build_sft_dataset(cfg.train_data, tok, cfg.seq_length, packing=cfg.sft_packing)
        valid = None
        if cfg.valid_data is not None and cfg.eval_iters:
            valid = build_sft_dataset(cfg.valid_data, tok, cfg.seq_length, packing=cfg.sft_packing)
        return ds, valid, True, cfg.sft_packing
    tok = load_tokenizer(tok_dir)
    check_vocab(tok, model_cfg.vocab_size)
    split = build_pretrain_datasets(
        list(cfg.data_path), tokenizer=tok, seq_length=cfg.seq_length, global_batch_size=gbs,
        train_iters=cfg.train_iters, eval_iters=cfg.eval_iters, eval_interval=cfg.eval_interval,
        split=cfg.split, seed=cfg.seed, is_built_on_rank=lambda: True,
        valid_data_path=str(cfg.valid_data) if cfg.valid_data is not None else None)
    valid = split.valid if cfg.eval_iters and split.valid is not None and len(split.valid) else None
    if cfg.eval_iters and valid is None:
        log.warning("--eval-iters %d: the split %r leaves no validation samples; not evaluating",
                    cfg.eval_iters, cfg.split)
    return split.train, valid, False, False


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _global_loss_tensor(local: dict) -> torch.Tensor:
    """The LM loss averaged over data-parallel replicas, as a 0-d float64 tensor on every rank's device (the
    last pipeline stage computes it; TP ranks hold copies, so only TP rank 0 contributes). Collective."""
    from megatron.core import parallel_state as ps

    mine = "lm loss" in local and ps.get_tensor_model_parallel_rank() == 0
    device = _device()
    loss = torch.as_tensor(local["lm loss"] if mine else 0.0, dtype=torch.float64, device=device)
    t = torch.stack([loss.reshape(()), torch.tensor(1.0 if mine else 0.0, dtype=torch.float64, device=device)])
    dist.all_reduce(t)
    return t[0] / t[1]


def _global_loss(local: dict) -> float:
    """:func:`_global_loss_tensor` read as a float."""
    return float(_global_loss_tensor(local))


def _take_mtp_loss(num_micro: int) -> dict:
    """This rank's MTP loss of the last schedule run ({'lm loss': mean over MTP layers and micro-batches, a
    0-d device tensor}, {} when the model has none here), read from and then cleared in megatron-core's
    MTP tracker."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    values = MTPLossLoggingHelper.tracker.get("loss_values")
    if values is None:
        return {}
    out = {"lm loss": values.sum() / values.numel() / num_micro}
    values.zero_()
    return out


def _take_moe_aux_loss(tc, num_micro: int) -> torch.Tensor:
    """The load-balancing loss of the last schedule run as megatron-core's routers record it (``E * sum_e
    f_e P_e`` before the coefficient; 1.0 for uniform routing): mean over the MoE layers (MTP included)
    and micro-batches, reduced over pipeline stages and averaged over data-parallel replicas, the same on
    every rank. Collective: every rank calls it. Clears megatron-core's MoE metrics tracker."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    totals: dict = {}
    # megatron hybrid layers alternate mixer and MoE block: the MoE pattern sums to the decoder layers
    moe_pattern = [0, 1] * (tc.num_layers // 2)
    get_moe_metrics_tracker().report(loss_scale=1 / num_micro, iteration=0, track_names=["load_balancing_loss"],
                                     force_initialize=True, num_layers=tc.num_layers,
                                     moe_layer_freq=moe_pattern, mtp_num_layers=tc.mtp_num_layers,
                                     total_loss_dict=totals)
    return torch.as_tensor(totals["load_balancing_loss"])  # a 0-d device tensor (megatron-core's sum)


class _StepMetrics:
    """One iteration's loss, MTP loss, MoE aux loss and grad norm (None where absent), reduced on the device
    and copied to the host without waiting: the copy is queued behind the iteration's own work, so the
    training loop can issue the next iteration first and read these after (the GPU then never idles while
    the host prepares the next step, as it does after every blocking read)."""

    def __init__(self, loss: torch.Tensor, mtp, aux, grad_norm):
        device = loss.device
        present = [x is not None for x in (mtp, aux, grad_norm)]
        values = [loss] + [torch.as_tensor(x, device=device) for x in (mtp, aux, grad_norm) if x is not None]
        stacked = torch.stack([v.reshape(()).to(torch.float64) for v in values])
        self._present, self._event = present, None
        if device.type == "cuda":
            self._host = torch.empty(stacked.shape, dtype=torch.float64, pin_memory=True)
            self._host.copy_(stacked, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = stacked

    def read(self) -> tuple[float, float | None, float | None, float | None]:
        """(loss, mtp, aux, grad norm) as floats; waits for this iteration's work only."""
        if self._event is not None:
            self._event.synchronize()
        values = iter(self._host.tolist())
        loss = next(values)
        mtp, aux, grad_norm = (next(values) if here else None for here in self._present)
        return loss, mtp, aux, grad_norm


def _memory_gb() -> tuple[float, float]:
    """(allocated, peak) in GB (1e9 bytes): the CUDA caching allocator's ``memory_allocated`` and
    ``max_memory_allocated`` (peak since the run started) on GPU; on CPU the process's resident set size
    and its peak over the process's life (``psutil``, ``resource``)."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 1e9, torch.cuda.max_memory_allocated() / 1e9
    import resource
    import sys

    import psutil

    rss = psutil.Process().memory_info().rss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return rss / 1e9, max(rss, peak) / 1e9  # the kernel updates the high-water mark lazily


# metrics written to TensorBoard (tag = metric key) when present and not None
_SCALARS = ("lm_loss", "mtp_loss", "moe_aux_loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu", "mfu",
            "mem_allocated_gb", "mem_peak_gb", "valid_lm_loss")


def _peak_tflops() -> float | None:
    """This GPU's datasheet dense bf16 peak (TFLOP/s), the denominator of MFU; None on CPU or a card not listed."""
    return dense_bf16_peak_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None


def _log_line(cfg: TrainConfig, m: dict) -> None:
    def opt(key: str, fmt: str) -> str:
        return "-" if m.get(key) is None else format(m[key], fmt)

    log.info("iteration %6d/%d | lm loss %.6f | mtp loss %s | aux loss %s | lr %.3e | grad norm %.4f | "
             "%.0f tokens/s | %.4g TFLOP/s/GPU | MFU %s | mem %.2f GB (peak %.2f) | %.2f s", m["iteration"],
             cfg.train_iters, m["lm_loss"], opt("mtp_loss", ".6f"), opt("moe_aux_loss", ".4f"), m["lr"],
             m["grad_norm"] or 0.0, m["tokens_per_s"], m["tflops_per_gpu"], opt("mfu", ".1%"), m["mem_allocated_gb"],
             m["mem_peak_gb"], m["iteration_s"])


def _open_outputs(cfg: TrainConfig, stack: ExitStack):
    """(JSON-lines file or None, TensorBoard SummaryWriter or None), closed by ``stack``."""
    json_file = writer = None
    if cfg.log_json is not None:
        Path(cfg.log_json).parent.mkdir(parents=True, exist_ok=True)
        json_file = stack.enter_context(open(cfg.log_json, "a"))  # noqa: SIM115 (closed by the stack)
    if cfg.tensorboard_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(cfg.tensorboard_dir))
        stack.callback(writer.close)
    return json_file, writer


def _write(m: dict, json_file, writer) -> None:
    if json_file is not None:
        json_file.write(json.dumps(m) + "\n")
        json_file.flush()
    if writer is not None:
        for key in _SCALARS:
            if m.get(key) is not None:
                writer.add_scalar(key, m[key], m["iteration"])
        writer.flush()


def optimizer_step(chunks, optimizer, micro_batches) -> tuple[dict, bool, float | torch.Tensor | None]:
    """One training iteration's compute: clear the gradient buffers, forward/backward over the
    micro-batches, ``finalize_model_grads``, the optimizer step (clipping included). Returns (this
    rank's losses of the schedule, whether the step was applied, the grad norm). The loss (and, with the
    norm kept on the device, the grad norm) are device tensors: in bf16 and fp32 nothing here waits for the
    GPU, so the host issues the optimizer step while the GPU still runs the backward; read them afterwards.
    (fp16's loss scaling reads its overflow flag on the host, megatron-core's design.)"""
    from megatron.core.distributed import finalize_model_grads

    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    local = forward_backward(chunks, micro_batches, loss_on_device=True)
    finalize_model_grads(chunks)
    ok, grad_norm, _ = optimizer.step()
    return local, ok, grad_norm


def evaluate(cfg: TrainConfig, chunks, dataset, *, num_micro: int, dp_rank: int, dp: int, packed: bool) -> float:
    """The LM loss over ``--eval-iters`` global batches of ``dataset``, always from its first sample (so
    successive evaluations are comparable; Megatron-LM instead walks on through the validation set)."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    batches = MicroBatches(dataset, consumed=0, micro_batch_size=cfg.micro_batch_size, dp_rank=dp_rank,
                           dp_size=dp, shuffle=False, seed=cfg.seed, packed=packed)
    for c in chunks:
        c.eval()
    try:
        with torch.no_grad():
            losses = []
            for _ in range(cfg.eval_iters):
                losses.append(_global_loss(forward_backward(chunks, batches.take(num_micro), forward_only=True)))
                _take_mtp_loss(num_micro)
                get_moe_metrics_tracker().clear()  # routers record nothing in eval mode; keep it that way
    finally:
        for c in chunks:
            c.train()
    return sum(losses) / len(losses)


def train(cfg: TrainConfig) -> list[dict]:
    """Run the training described by ``cfg``; returns the metrics of every iteration run."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    from .. import parallel
    from .fused_adam import use_fused_adam

    parallel.initialize(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size,
                        cfg.expert_model_parallel_size, cfg.expert_tensor_parallel_size,
                        cfg.context_parallel_size, seed=cfg.seed)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    gbs = _check_runtime(cfg, dp)
    num_micro = gbs // (cfg.micro_batch_size * dp)
    model_cfg, ddp, optimizer, scheduler = _build(cfg)
    chunks = [ddp]
    destroy_moe_metrics_tracker()  # a fresh tracker: no entries bound to an earlier run's process groups
    aux_coeff = model_cfg.router_aux_loss_coef if cfg.moe_aux_loss_coeff is None else cfg.moe_aux_loss_coeff
    step_flops = training_flops(model_cfg, cfg.seq_length, gbs, recompute=cfg.recompute_granularity)
    model_flops = training_flops(model_cfg, cfg.seq_length, gbs)  # MFU counts no recompute
    peak_tflops = _peak_tflops()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    iteration, consumed = 0, 0
    if cfg.load is not None:
        progress = checkpoint.load(cfg.load, chunks, optimizer, scheduler, load_optimizer=not cfg.no_load_optim,
                                   finetune=cfg.finetune)
        use_fused_adam(optimizer)  # loading took the saved parameter groups' implementation flags
        if progress is not None:
            iteration, consumed = progress["iteration"], progress["consumed_samples"]
    dataset, valid, shuffle, packed = _datasets(cfg, model_cfg, gbs)
    batches = MicroBatches(dataset, consumed=consumed, micro_batch_size=cfg.micro_batch_size, dp_rank=dp_rank,
                           dp_size=dp, shuffle=shuffle, seed=cfg.seed, packed=packed)
    is_logger = dist.get_rank() == dist.get_world_size() - 1  # a last-stage rank, as Megatron-LM logs
    metrics: list[dict] = []
    json_file = writer = None

    # when an iteration's work is done: on a GPU when its numbers can be read (the read waits for them),
    # on CPU when its step returns (the work ran inside it; its numbers are read after the next step ran)
    synchronous = _device().type != "cuda"

    def _finish(p: dict, since: float) -> float:
        """Read iteration ``p``'s numbers (waiting for its work), evaluate and save if ``p`` says so, log,
        check for divergence; returns the time the iteration's work ended (the iteration time is the interval
        between two such ends), or the time after its evaluation or checkpoint."""
        loss, mtp, aux, grad_norm = p["metrics"].read()
        end = p["issued"] if synchronous else time.perf_counter()
        elapsed = end - since
        it = p["iteration"]
        mem, peak = _memory_gb()
        m = {"iteration": it, "lm_loss": loss, "mtp_loss": mtp, "moe_aux_loss": aux, "lr": p["lr"],
             "grad_norm": grad_norm, "consumed_samples": p["consumed"], "tokens_per_s": gbs * cfg.seq_length / elapsed,
             "tflops_per_gpu": step_flops / elapsed / dist.get_world_size() / 1e12,
             "mfu": None if peak_tflops is None else model_flops / elapsed / dist.get_world_size() / 1e12 / peak_tflops,
             "mem_allocated_gb": mem, "mem_peak_gb": peak, "iteration_s": elapsed, "skipped": not p["ok"]}
        if p["evaluates"]:
            m["valid_lm_loss"] = evaluate(cfg, chunks, valid, num_micro=num_micro, dp_rank=dp_rank, dp=dp,
                                          packed=packed)
        metrics.append(m)
        if is_logger and it % cfg.log_interval == 0:
            _log_line(cfg, m)
            if "valid_lm_loss" in m:
                log.info("validation after iteration %d | lm loss %.6f", it, m["valid_lm_loss"])
            _write(m, json_file, writer)
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            raise TrainingDiverged(f"iteration {it}: lm loss {loss}, grad norm {grad_norm}; "
                                   "stopping (lower --lr, check the data, or use --bf16 instead of --fp16)")
        if p["saves"]:
            checkpoint.save(Path(cfg.save), it, chunks, optimizer, scheduler, consumed_samples=p["consumed"])
        # evaluation and checkpointing are not part of the next iteration's time
        return time.perf_counter() if p["evaluates"] or p["saves"] else end

    with ExitStack() as outputs:
        json_file, writer = _open_outputs(cfg, outputs) if is_logger else (None, None)
        done = iteration >= cfg.train_iters
        pending = None
        last_read = time.perf_counter()
        while not done:
            local, ok, grad_norm = optimizer_step(chunks, optimizer, batches.take(num_micro))
            step_metrics = _StepMetrics(
                _global_loss_tensor(local),
                _global_loss_tensor(_take_mtp_loss(num_micro)) if model_cfg.mtp_num_layers else None,
                _take_moe_aux_loss(ddp.module.config, num_micro) if aux_coeff > 0 else None, grad_norm)
            iteration += 1
            consumed += gbs
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step(increment=1)
            done = cfg.stops_after(iteration)
            issued = time.perf_counter()
            # the previous iteration's numbers are read now, with this one already queued on the GPU
            if pending is not None:
                last_read = _finish(pending, last_read)
            evaluates = valid is not None and (iteration % cfg.eval_interval == 0 or done)
            saves = cfg.save is not None and bool((cfg.save_interval and iteration % cfg.save_interval == 0) or done)
            pending = {"iteration": iteration, "consumed": consumed, "lr": lr, "ok": ok, "metrics": step_metrics,
                       "evaluates": evaluates, "saves": saves, "issued": issued}
            if evaluates or saves or done:  # these need this iteration finished before the next one starts
                last_read = _finish(pending, last_read)
                pending = None
    return metrics
