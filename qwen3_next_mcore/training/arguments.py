"""Training options: a frozen, validated :class:`TrainConfig` and its argparse front end.

Option names follow Megatron-LM's (``--micro-batch-size``, ``--tensor-model-parallel-size``, ...), so a
Megatron-LM or Pai-Megatron-Patch command line maps onto ours nearly word for word; each field of
``TrainConfig`` is the option name with ``_`` for ``-``. Validation errors name the option and the value.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    model_validator,
)

from ..config import Qwen3NextConfig, get_preset


def option(field: str) -> str:
    """The command-line option of a ``TrainConfig`` field."""
    return "--" + field.replace("_", "-")


class TrainConfig(BaseModel):
    """Everything one training run needs; derived values are properties."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # model
    preset: str | None = None
    model_config_path: Path | None = None  # --model-config: a HF config.json (or its folder)
    hf_dir: Path | None = None  # initial weights (and the model config when no other is given)
    experts: Literal["sequential", "grouped"] = "grouped"
    experts_layout: Literal["grouped", "padded"] = "grouped"  # layers/moe.py: grouped or batched expert GEMMs
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    # data
    tokenizer: Path | None = None
    data_path: tuple[str, ...] = ()
    split: str = "99,1,0"
    sft: bool = False
    train_data: Path | None = None
    valid_data: Path | None = None
    sft_packing: bool = False
    # batch and schedule
    micro_batch_size: PositiveInt = 1
    global_batch_size: PositiveInt | None = None  # default: micro_batch_size * data-parallel size
    seq_length: PositiveInt = 1024
    train_iters: PositiveInt = 10
    exit_interval: PositiveInt | None = None
    lr: NonNegativeFloat = 1e-5
    min_lr: NonNegativeFloat = 0.0
    lr_warmup_iters: NonNegativeInt = 0
    lr_decay_iters: PositiveInt | None = None  # default: train_iters
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: NonNegativeFloat = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: NonNegativeFloat = 1.0
    seed: int = 1234
    # checkpoints and evaluation
    save: Path | None = None
    load: Path | None = None
    no_load_optim: bool = False  # --load restores the model (and progress) but not the optimizer/scheduler
    finetune: bool = False  # --load restores the model weights only and starts at iteration 0 (Megatron-LM)
    save_interval: PositiveInt | None = None
    eval_interval: PositiveInt | None = None
    eval_iters: NonNegativeInt = 0
    # parallelism
    tensor_model_parallel_size: PositiveInt = 1
    pipeline_model_parallel_size: PositiveInt = 1
    expert_model_parallel_size: PositiveInt = 1
    expert_tensor_parallel_size: PositiveInt = 1
    context_parallel_size: PositiveInt = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    optimizer_cpu_offload: bool = False
    optimizer_offload_fraction: NonNegativeFloat = 1.0
    # precision and memory
    bf16: bool = False
    fp16: bool = False
    fp8_format: Literal["e4m3", "hybrid"] | None = None  # FP8 GEMMs through Transformer Engine
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    recompute_granularity: Literal["full", "selective"] | None = None
    recompute_method: Literal["uniform", "block"] | None = None
    recompute_num_layers: PositiveInt | None = None
    cpu_offloading: bool = False  # offload the saved activations of the first layers to host memory
    cpu_offloading_num_layers: PositiveInt = 1
    # losses
    mtp_loss_scaling_factor: NonNegativeFloat = 0.1
    moe_aux_loss_coeff: NonNegativeFloat | None = None  # default: the model's router_aux_loss_coef
    # logging
    log_interval: PositiveInt = 1
    log_json: Path | None = None
    tensorboard_dir: Path | None = None  # TensorBoard scalars, written by the logging rank

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"{option(field)}={getattr(self, field)!r}: {why}")

        sources = [f for f in ("preset", "model_config_path") if getattr(self, f) is not None]
        if len(sources) > 1:
            raise ValueError("give one of --preset and --model-config, not both")
        if not sources and self.hf_dir is None:
            raise ValueError("no model: give --preset NAME, --model-config FILE or --hf-dir DIR")
        if self.global_batch_size is not None and self.global_batch_size % self.micro_batch_size:
            raise bad("global_batch_size", f"must be a multiple of --micro-batch-size={self.micro_batch_size}")
        if self.bf16 and self.fp16:
            raise ValueError("--bf16 and --fp16 are mutually exclusive")
        if self.fp8_format is not None:
            if not (self.bf16 or self.fp16):
                raise bad("fp8_format", "FP8 GEMMs run inside a bf16/fp16 model: add --bf16")
            if self.transformer_impl != "transformer_engine":
                raise bad("fp8_format", "FP8 needs Transformer Engine's layers: add --transformer-impl "
                          "transformer_engine")
        if self.min_lr > self.lr:
            raise bad("min_lr", f"must be <= --lr={self.lr}")
        if self.lr_warmup_iters > self.decay_iters:
            raise bad("lr_warmup_iters", f"must be <= the decay length ({self.decay_iters} iterations)")
        if self.sft:
            if self.train_data is None:
                raise ValueError("--sft needs --train-data (a JSON/JSONL file or an idxmap prefix)")
            if self.data_path:
                raise ValueError("--data-path is for pretraining; with --sft give --train-data/--valid-data")
        else:
            if not self.data_path:
                raise ValueError("pretraining needs --data-path (a .bin/.idx prefix or a weighted blend)")
            if self.train_data is not None or self.sft_packing:
                raise ValueError("--train-data/--sft-packing need --sft")
        if self.no_load_optim and self.load is None:
            raise ValueError("--no-load-optim needs --load DIR")
        if self.finetune and self.load is None:
            raise ValueError("--finetune needs --load DIR")
        if self.save_interval is not None and self.save is None:
            raise bad("save_interval", "needs --save DIR")
        if self.eval_iters and self.eval_interval is None:
            raise bad("eval_iters", "needs --eval-interval N")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if self.context_parallel_size > 1:
            raise bad("context_parallel_size", "context parallelism is not supported yet (Gated DeltaNet has "
                      "no context-parallel recurrence)")
        if self.recompute_method is not None and self.recompute_granularity != "full":
            raise bad("recompute_method", "needs --recompute-granularity full")
        if (self.recompute_method is None) != (self.recompute_num_layers is None) and \
                self.recompute_granularity == "full":
            raise ValueError("--recompute-granularity full needs both --recompute-method and --recompute-num-layers")
        if self.cpu_offloading and self.recompute_granularity is not None:
            raise ValueError("--cpu-offloading and --recompute-granularity are mutually exclusive (Megatron-LM's "
                             "rule: recomputed layers save nothing to offload)")
        if self.experts_layout == "padded" and (self.experts != "grouped" or self.expert_model_parallel_size > 1
                                                 or self.expert_tensor_parallel_size > 1):
            raise bad("experts_layout", "'padded' needs --experts grouped, --expert-model-parallel-size 1 and "
                      "--expert-tensor-parallel-size 1")
        if self.optimizer_offload_fraction > 1:
            raise bad("optimizer_offload_fraction", "must be in [0, 1]")
        if self.optimizer_cpu_offload and not self.use_distributed_optimizer:
            raise ValueError("--optimizer-cpu-offload needs --use-distributed-optimizer (megatron-core's rule)")
        return self

    # ----- derived -------------------------------------------------------------------------------
    @property
    def decay_iters(self) -> int:
        return self.lr_decay_iters or self.train_iters

    def stops_after(self, iteration: int) -> bool:
        """Whether the run ends after ``iteration``: at ``--train-iters``, or at a multiple of
        ``--exit-interval`` (Megatron-LM's rule, so a resumed run stops at the next multiple)."""
        return iteration >= self.train_iters or bool(self.exit_interval and iteration % self.exit_interval == 0)

    @property
    def model_world_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    def model(self) -> Qwen3NextConfig:
        """The architecture: the preset, the HF config file, or the config of ``--hf-dir``."""
        if self.preset is not None:
            return get_preset(self.preset)
        return Qwen3NextConfig.from_hf(self.model_config_path or self.hf_dir)


def _bool(flag):
    return {"action": "store_true", "default": None}


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add the training options to ``parser`` (a new one when None). Unset options keep
    ``TrainConfig``'s defaults (every option defaults to None here)."""
    p = parser or argparse.ArgumentParser(prog="qwen3-next-mcore train", description=__doc__)

    def add(group, field, **kw):
        kw.setdefault("default", None)
        group.add_argument(option(field) if "flags" not in kw else kw.pop("flags"), dest=field, **kw)

    g = p.add_argument_group("model")
    add(g, "preset", metavar="NAME", help="a model preset (see 'config list'), e.g. tiny, proxy")
    add(g, "model_config_path", flags="--model-config", metavar="FILE", help="a HF config.json (or its folder)")
    add(g, "hf_dir", metavar="DIR", help="initial weights from this HF checkpoint (its config.json is the "
        "model when neither --preset nor --model-config is given)")
    add(g, "experts", choices=["sequential", "grouped"], help="routed-expert implementation (default grouped)")
    add(g, "experts_layout", choices=["grouped", "padded"],
        help="rows handed to the grouped experts: 'grouped' (default; grouped GEMMs, no host read) or 'padded' "
             "(each expert's rows padded to the largest count, batched GEMMs: faster for small near-balanced "
             "groups; one host read per MoE layer; one expert-parallel and expert-tensor-parallel rank)")
    add(g, "transformer_impl", choices=["local", "transformer_engine"], help="layer backend (default local)")
    g = p.add_argument_group("data")
    add(g, "tokenizer", metavar="DIR", help="HF tokenizer folder (default: the bundled Qwen3 tokenizer)")
    add(g, "data_path", nargs="+", metavar="PATH", help="pretraining .bin/.idx prefix, or 'w1 p1 w2 p2 ...'")
    add(g, "split", help="train,valid,test weights over --data-path documents (default 99,1,0)")
    add(g, "sft", **_bool(True), help="supervised fine-tuning on --train-data")
    add(g, "train_data", metavar="PATH", help="SFT data: raw JSON/JSONL or an idxmap prefix")
    add(g, "valid_data", metavar="PATH", help="validation data: SFT JSON/idxmap, or a pretraining prefix/blend "
        "(then --data-path is all training data)")
    add(g, "sft_packing", **_bool(True), help="pack several SFT samples per row (raw JSON input)")
    g = p.add_argument_group("batch and schedule")
    for field in ("micro_batch_size", "global_batch_size", "seq_length", "train_iters", "exit_interval",
                  "lr_warmup_iters", "lr_decay_iters", "seed"):
        add(g, field, type=int)
    for field in ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad"):
        add(g, field, type=float)
    add(g, "lr_decay_style", choices=["cosine", "linear", "constant"])
    g = p.add_argument_group("checkpoints and evaluation")
    add(g, "save", metavar="DIR")
    add(g, "load", metavar="DIR")
    add(g, "no_load_optim", **_bool(True), help="with --load: restore the weights and progress only (fresh "
        "optimizer and LR schedule)")
    add(g, "finetune", **_bool(True), help="with --load: restore the weights only and start at iteration 0 "
        "(fresh optimizer, schedule and data position), e.g. SFT from a pretraining checkpoint")
    for field in ("save_interval", "eval_interval", "eval_iters"):
        add(g, field, type=int)
    g = p.add_argument_group("parallelism")
    for field in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
                  "expert_tensor_parallel_size", "context_parallel_size"):
        add(g, field, type=int)
    add(g, "sequence_parallel", **_bool(True))
    add(g, "use_distributed_optimizer", **_bool(True))
    add(g, "optimizer_cpu_offload", **_bool(True))
    add(g, "optimizer_offload_fraction", type=float)
    g = p.add_argument_group("precision, memory, losses, logging")
    add(g, "bf16", **_bool(True))
    add(g, "fp16", **_bool(True))
    add(g, "fp8_format", choices=["e4m3", "hybrid"], help="FP8 GEMMs through Transformer Engine (needs "
        "--transformer-impl transformer_engine and --bf16); the GDN recurrence and attention stay bf16")
    add(g, "fp8_recipe", choices=["delayed", "tensorwise", "blockwise", "mxfp8"], help="FP8 scaling recipe "
        "(default delayed)")
    add(g, "recompute_granularity", choices=["full", "selective"])
    add(g, "recompute_method", choices=["uniform", "block"])
    add(g, "recompute_num_layers", type=int)
    add(g, "cpu_offloading", **_bool(True), help="offload the activations saved for backward of the first "
        "--cpu-offloading-num-layers decoder layers (GDN, attention, MoE) to host memory")
    add(g, "cpu_offloading_num_layers", type=int, help="decoder layers whose activations are offloaded (default 1)")
    add(g, "mtp_loss_scaling_factor", type=float)
    add(g, "moe_aux_loss_coeff", type=float)
    add(g, "log_interval", type=int)
    add(g, "log_json", metavar="FILE", help="append one JSON line of metrics per iteration")
    add(g, "tensorboard_dir", metavar="DIR", help="write the metrics as TensorBoard scalars into DIR")
    return p


def config_from_namespace(ns: argparse.Namespace) -> TrainConfig:
    """A ``TrainConfig`` from parsed options (those left unset keep their defaults); ValueError naming
    the option and value when invalid."""
    fields = {k: v for k, v in vars(ns).items() if k in TrainConfig.model_fields and v is not None}
    if "data_path" in fields:
        fields["data_path"] = tuple(fields["data_path"])
    return make_config(**fields)


def make_config(**fields) -> TrainConfig:
    """``TrainConfig(**fields)`` with pydantic's errors rewritten to name the command-line option."""
    try:
        return TrainConfig(**fields)
    except ValidationError as e:
        parts = []
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["loc"]:
                field = str(err["loc"][0])
                name = "--model-config" if field == "model_config_path" else option(field)
                parts.append(f"{name}={err.get('input')!r}: {msg}")
            else:
                parts.append(msg)
        raise ValueError("; ".join(parts)) from None


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    return config_from_namespace(build_parser().parse_args(argv))
