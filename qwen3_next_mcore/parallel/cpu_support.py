"""Everything megatron-core needs adjusted to run on a CPU (gloo), in one place.

megatron-core 0.19 assumes CUDA in a few spots that a CPU run (tests, CI, the embedded demo) reaches.
:func:`apply` installs the adjustments below; it runs only when CUDA is absent, is idempotent, and each
adjustment is a narrow replacement of one megatron-core function or object, listed here:

1. RNG tracker: ``model_parallel_cuda_manual_seed`` and ``CudaRNGStatesTracker`` call
   ``torch.cuda.manual_seed``/``get_rng_state``. :class:`CpuRNGStatesTracker` keeps the same named
   states (data-parallel, model-parallel, expert-parallel) as CPU generator states, so ``fork()``
   (dropout, initialisation in tensor-parallel regions) and activation recompute work.
2. ``_get_cuda_rng_state``/``_set_cuda_rng_state`` in ``tensor_parallel.random`` (used by recompute):
   CPU generator state when there is no CUDA.
3. ``torch.cuda.current_device()`` in rotary-embedding construction: the rotary module is built with
   ``use_cpu_initialization`` (the config translation sets it on CPU), and its ``forward`` builds
   ``inv_freq`` on the device of its buffer.
4. ``torch.compile`` around the output-gate fusion: dynamo is disabled for that function on CPU (the
   first call otherwise takes over 10 s and gives the same numbers).

Nothing here runs on a GPU machine.
"""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)
_APPLIED = False


def _cpu_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron-core's RNG tracker with CPU generator states instead of CUDA ones."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


def seed_cpu(seed: int, tp_rank: int, ep_rank: int, etp_rank: int) -> None:
    """CPU twin of ``model_parallel_cuda_manual_seed``: same state names, same seed offsets."""
    from megatron.core.tensor_parallel import random as mrandom

    torch.manual_seed(seed)
    tracker = _cpu_tracker_class()()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def apply() -> None:
    """Install the CPU adjustments listed in the module docstring (no-op with CUDA, idempotent)."""
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random as mrandom

    def _get_state(clone: bool = False, graph_safe: bool = False):
        return torch.get_rng_state()

    def _set_state(new_state, device: int = -1, graph_safe: bool = False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = _get_state
    mrandom._set_cuda_rng_state = _set_state
    _patch_output_gate_compile()
    _APPLIED = True
    log.info("megatron-core adjusted for CPU execution (see qwen3_next_mcore.parallel.cpu_support)")


def _patch_output_gate_compile() -> None:
    from megatron.core.transformer import attention as mattn

    for name in dir(mattn):
        fn = getattr(mattn, name)
        # torch.compile-wrapped helpers expose the original as ``_torchdynamo_orig_callable``
        orig = getattr(fn, "_torchdynamo_orig_callable", None)
        if orig is not None:
            setattr(mattn, name, orig)
