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
3. ``RotaryEmbedding.get_emb`` moves ``inv_freq`` to ``torch.cuda.current_device()`` on first use;
   on CPU it keeps it where it is (the rest of the function is unchanged).
6. Some megatron-core modules allocate small bookkeeping tensors on ``device="cuda"`` or
   ``torch.cuda.current_device()`` (pipeline schedules, p2p communication, the MTP loss tracker, the MoE
   router's aux-loss tracker, tensor-parallel gather/scatter buffers) and call ``torch.cuda.synchronize()``
   or use a side stream (the all-to-all token dispatcher); exactly those modules (listed in
   ``_CUDA_BOOKKEEPING_MODULES``) see a ``torch`` whose ``zeros``/``empty`` map a CUDA device to the CPU and whose ``cuda``
   answers ``current_device()`` with the CPU, makes ``synchronize()`` a no-op and its streams inert. Everything else is
   torch itself.
8. ``optimizer.clip_grad_by_total_norm_fp32`` asserts CUDA gradient types; on CPU the same scaling
   (``grad *= min(1, max_norm / (total_norm + 1e-6))``) runs on fp32 CPU gradients. megatron-core's
   distributed optimizer and its fp16/bf16 optimizers check ``param.type()`` against CUDA tensor names and
   are refused on CPU by the training options instead.
7. ``LanguageModule.setup_embeddings_and_output_layer`` moves the shared embedding to CUDA
   (``tensor.cuda()``) before syncing it between the first and last pipeline stage; on CPU the sync
   runs on the CPU tensor.
5. ``Router.gating`` moves the router weight to ``torch.cuda.current_device()`` on first use; on CPU
   the weight stays where it is (the gating product is unchanged).
9. The all-to-all token dispatcher turns its split sizes into numpy arrays only for CUDA tensors
   (``maybe_move_tensor_to_cpu``), and gloo refuses the tensors it passes otherwise; on CPU the same
   conversion runs on the CPU tensors, so expert parallelism uses the all-to-all dispatcher as on GPUs.
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
    _patch_rotary()
    _patch_router()
    _patch_dispatcher_splits()
    _patch_schedules()
    _patch_language_module()
    _patch_grad_clipping()
    _APPLIED = True
    log.info("megatron-core adjusted for CPU execution (see qwen3_next_mcore.parallel.cpu_support)")


def _patch_output_gate_compile() -> None:
    from megatron.core.transformer.attention import Attention

    fn = Attention.__dict__.get("_apply_output_gate")
    # a torch.compile-wrapped function exposes the original as ``_torchdynamo_orig_callable``
    orig = getattr(fn, "_torchdynamo_orig_callable", None)
    if orig is not None:
        Attention._apply_output_gate = orig


def _patch_rotary() -> None:
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    original = RotaryEmbedding.get_emb

    def get_emb(self, max_seq_len: int, offset: int = 0):
        if self.inv_freq.device.type == "cpu" and not torch.cuda.is_available():
            freqs = self.get_freqs_non_repeated(max_seq_len, offset)
            if not self.rotary_interleaved:
                emb = torch.cat((freqs, freqs), dim=-1)
            else:
                emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
            return emb[:, None, None, :]
        return original(self, max_seq_len, offset)

    RotaryEmbedding.get_emb = get_emb


def _patch_router() -> None:
    from megatron.core.transformer.moe import router as mrouter

    def gating(self, input: torch.Tensor):
        router_dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, input.dtype)
        return mrouter.router_gating_linear(input, self.weight, self.bias, router_dtype)

    mrouter.Router.gating = gating


def _patch_dispatcher_splits() -> None:
    from megatron.core.transformer.moe import token_dispatcher as mdisp

    original = mdisp.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()  # what the CUDA branch returns: the split sizes as a numpy array
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    mdisp.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


class _InertStream:
    """A stream on which waiting is a no-op (a CPU run has no asynchronous device work)."""

    def wait_event(self, *args, **kwargs):
        return None

    def wait_stream(self, *args, **kwargs):
        return None

    def synchronize(self):
        return None

    def record_event(self, *args, **kwargs):
        return self  # an event whose synchronize() returns at once


class _CpuCuda:
    """``torch.cuda`` as megatron's schedules, DDP and checkpoint writer use it, answered for a CPU run."""

    def current_device(self):
        return torch.device("cpu")

    def synchronize(self, *args, **kwargs):
        return None

    def current_stream(self, *args, **kwargs):
        return _InertStream()

    def Stream(self, *args, **kwargs):  # noqa: N802 - torch.cuda.Stream
        return _InertStream()

    def stream(self, *args, **kwargs):
        return contextlib.nullcontext()

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _CpuTorch:
    """``torch`` for megatron's schedule modules on CPU: CUDA allocations land on the CPU."""

    cuda = _CpuCuda()

    @staticmethod
    def _cpu(kwargs):
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "cuda":
            kwargs["device"] = "cpu"
        return kwargs

    def zeros(self, *args, **kwargs):
        return torch.zeros(*args, **self._cpu(kwargs))

    def empty(self, *args, **kwargs):
        return torch.empty(*args, **self._cpu(kwargs))

    def tensor(self, *args, **kwargs):
        return torch.tensor(*args, **self._cpu(kwargs))

    def __getattr__(self, name):
        return getattr(torch, name)


_CUDA_BOOKKEEPING_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.transformer.multi_token_prediction",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.token_dispatcher",  # the all-to-all dispatcher's device-to-host stream
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.utils",  # GlobalMemoryBuffer (the sequence-parallel all-gather buffer)
    # the training loop's modules: DDP grad/param buffers, optimizer found-inf/scale tensors, grad-norm
    # tensors, and the torch_dist writer's synchronize() calls and flag tensors
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
)


def _patch_schedules() -> None:
    import importlib

    for name in _CUDA_BOOKKEEPING_MODULES:
        importlib.import_module(name).torch = _CpuTorch()


def _patch_language_module() -> None:
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule.setup_embeddings_and_output_layer

    def setup_embeddings_and_output_layer(self):
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *a, **k: t  # only for the duration of this call, on a CPU-only host
        try:
            return original(self)
        finally:
            torch.Tensor.cuda = cuda

    LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


def _clip_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad: bool = False) -> None:
    """Scale every fp32 gradient by ``max_norm / total_norm`` when that is below 1."""
    coeff = max_norm / (total_norm + 1.0e-6)
    if isinstance(coeff, torch.Tensor):
        coeff = coeff.clamp_max(1.0)
    elif coeff >= 1.0:
        return
    for p in parameters:
        grad = getattr(p, "decoupled_grad", None) if use_decoupled_grad else p.grad
        if grad is not None:
            if grad.dtype != torch.float32:
                raise TypeError(f"gradient clipping expects fp32 gradients, got {grad.dtype}")
            grad.mul_(coeff)


def _patch_grad_clipping() -> None:
    import importlib

    importlib.import_module("megatron.core.optimizer.optimizer").clip_grad_by_total_norm_fp32 = _clip_by_total_norm
