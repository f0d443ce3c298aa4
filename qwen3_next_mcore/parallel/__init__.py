"""Process groups: ``initialize`` torch.distributed and megatron-core's parallel state, ``destroy`` them.

Usage::

    from qwen3_next_mcore import parallel
    parallel.initialize(tensor_parallel=2)   # under torchrun, or a single local process
    ...
    parallel.destroy()

gloo on CPU, NCCL on GPU. Without torchrun's environment (``RANK``/``WORLD_SIZE``), or with a world of
one process, the group is a single local process over an in-process store (no port).
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from ..config.parallel import ParallelConfig

log = logging.getLogger(__name__)

__all__ = ["ParallelConfig", "current_layout", "destroy", "device", "initialize", "is_initialized", "seed"]

_LAYOUT: ParallelConfig | None = None


def device() -> torch.device:
    """The device this rank computes on: its CUDA device, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_initialized() -> bool:
    return _LAYOUT is not None


def current_layout() -> ParallelConfig:
    """The layout :func:`initialize` set up; raises RuntimeError before that."""
    if _LAYOUT is None:
        raise RuntimeError("qwen3_next_mcore.parallel.initialize() has not been called")
    return _LAYOUT


def initialize(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    expert_parallel: int = 1,
    expert_tensor_parallel: int = 1,
    context_parallel: int = 1,
    *,
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> ParallelConfig:
    """Initialise torch.distributed (if needed) and megatron-core's model-parallel state.

    Idempotent: calling again with the same sizes does nothing; different sizes re-create megatron's
    groups (the torch.distributed group is kept). Seeds megatron's RNG tracker with ``seed``.
    Returns the layout. Raises ValueError when the world size is not a multiple of the model-parallel
    sizes.
    """
    global _LAYOUT
    layout = ParallelConfig(
        tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel,
        expert_parallel=expert_parallel,
        expert_tensor_parallel=expert_tensor_parallel,
        context_parallel=context_parallel,
    )
    if _LAYOUT == layout:
        return layout
    on_gpu = torch.cuda.is_available()
    if not dist.is_initialized():
        single = "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or os.environ["WORLD_SIZE"] == "1"
        if single:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"))
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl" if on_gpu else "gloo"
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if single:  # an in-process store: no port to find free and then lose to another process
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    world = dist.get_world_size()
    mp = tensor_parallel * pipeline_parallel * context_parallel
    if world % mp:
        raise ValueError(
            f"world size {world} is not a multiple of tensor_parallel*pipeline_parallel*context_parallel={mp}"
        )
    dp = world // mp
    if (dp * context_parallel * tensor_parallel) % (expert_parallel * expert_tensor_parallel):
        raise ValueError(
            f"expert_parallel*expert_tensor_parallel={expert_parallel * expert_tensor_parallel} must divide "
            f"data_parallel*context_parallel*tensor_parallel={dp * context_parallel * tensor_parallel}"
        )
    from megatron.core import parallel_state

    from . import cpu_support

    cpu_support.apply()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        **layout.megatron_sizes(),
        create_gloo_process_groups=not on_gpu,
        distributed_timeout_minutes=timeout_minutes,
    )
    _LAYOUT = layout
    globals()["seed"](seed)
    log.info("parallel state: world=%d %s backend=%s", world, layout, dist.get_backend())
    return layout


def seed(value: int) -> None:
    """Seed torch and megatron-core's RNG tracker consistently for this rank's position."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel as mtp

    tp, ep, etp = (ps.get_tensor_model_parallel_rank(), ps.get_expert_model_parallel_rank(),
                   ps.get_expert_tensor_parallel_rank())
    value = value + 100 * ps.get_pipeline_model_parallel_rank()
    if torch.cuda.is_available():
        torch.manual_seed(value)
        mtp.model_parallel_cuda_manual_seed(value, tp_rank=tp, ep_rank=ep, etp_rank=etp, force_reset_rng=True)
    else:
        from .cpu_support import seed_cpu

        seed_cpu(value, tp, ep, etp)


def destroy() -> None:
    """Tear down megatron-core's parallel state and the torch.distributed group (idempotent)."""
    global _LAYOUT
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    _LAYOUT = None
