"""Which kernel runs each op: environment detection and the (pure, unit-testable) decision rules.

The decision functions take a :class:`KernelEnv` (versions and hardware facts) so tests can inject any
combination; :func:`detect_kernel_env` fills one from the running process. Rules (docs/kernels.md):

* CPU tensors run the pure-torch path. CUDA tensors run fused kernels (fla, Dao-AILab causal-conv1d);
  a missing kernel on CUDA raises, it never falls back silently to the slow torch path. Asking for
  ``backend="torch"`` explicitly is always allowed.
* Hopper (compute capability 9.x) with 3.4.0 <= Triton < 3.7.1 miscompiles fla's gated backward
  (``chunk_bwd_dqkwg``, fla issue #640). fla >= 0.6.0 then routes that kernel to TileLang, which it
  does only when ``tilelang`` imports, an ``nvcc`` is found and ``FLA_TILELANG`` is not ``0``. Without
  that we raise before running anything: never a known-wrong kernel.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import types
from functools import cache, wraps
from pathlib import Path

import torch
from packaging.version import InvalidVersion, Version

log = logging.getLogger("qwen3_next_mcore.ops")

AUTO = (None, "auto")
GDN_BACKENDS = ("torch", "naive", "fla")
CONV_BACKENDS = ("torch", "causal_conv1d", "fla")
CONV_SPLIT_BACKENDS = ("triton", *CONV_BACKENDS)  # the fused kernel, or the unfused ops with that conv
NORM_BACKENDS = ("torch", "fla")
COMPILED_OP_BACKENDS = ("torch", "compile")
GROUPED_GEMM_BACKENDS = ("torch", "autotune")  # torch's grouped GEMM, or Inductor's autotuned choice
ROUTER_TOPK_BACKENDS = ("torch", "triton")  # torch.topk, or our row top-k kernel
MOE_SWIGLU_BACKENDS = ("torch", "compile", "triton")  # eager, megatron-core's compiled fusion, our kernels

# Triton range with the Hopper miscompile of fla's gated backward (fixed in Triton 3.7.1)
TRITON_BAD_MIN, TRITON_FIXED = Version("3.4.0"), Version("3.7.1")
# first fla whose gated backward has the TileLang path and the guard (the version we verified)
FLA_MIN_TILELANG = Version("0.6.0")
# fla handles HV % H == 0 value heads natively from this version on
FLA_MIN_GVA = Version("0.5.0")

GPU_EXTRA_HINT = (
    "install the `gpu` extra: `pip install 'qwen3-next-mcore[gpu]'` (flash-linear-attention, "
    "causal-conv1d, tilelang)"
)


@dataclasses.dataclass(frozen=True)
class KernelEnv:
    """What the backend decisions depend on. Versions are strings, None when not installed."""

    device: str = "cpu"  # torch device type of the tensors: "cpu", "cuda", ...
    capability: tuple[int, int] | None = None  # CUDA compute capability of that device
    triton: str | None = None
    fla: str | None = None
    tilelang: str | None = None  # set only when `import tilelang` works
    nvcc: bool = False  # TileLang compiles its kernels with nvcc at run time
    causal_conv1d: str | None = None
    fla_tilelang_env: str | None = None  # os.environ["FLA_TILELANG"]: "0" disables TileLang in fla
    fla_dispatch_disabled: bool = False  # FLA_DISABLE_BACKEND_DISPATCH=1 bypasses fla's TileLang path


def _version(text: str | None) -> Version | None:
    if text is None:
        return None
    try:
        return Version(text)
    except InvalidVersion:
        return None


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _module_version(module: str, *dists: str) -> str | None:
    """Version of an importable module (from its metadata or __version__); None when absent."""
    if importlib.util.find_spec(module) is None:
        return None
    version = _dist_version(*dists)
    if version is None:
        version = str(getattr(importlib.import_module(module), "__version__", "unknown"))
    return version


def _importable_version(module: str) -> str | None:
    """Like _module_version, but the module must also import (tilelang can be present and broken)."""
    if importlib.util.find_spec(module) is None:
        return None
    try:
        mod = importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 - any import failure means "not usable"
        log.warning("%s is installed but does not import: %s", module, error)
        return None
    return _dist_version(module) or str(getattr(mod, "__version__", "unknown"))


def _nvcc_available() -> bool:
    try:  # fla's own check is the one that decides whether it uses TileLang
        from fla.utils import has_usable_nvcc

        return bool(has_usable_nvcc())
    except ImportError:
        pass
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return shutil.which("nvcc") is not None or (Path(home) / "bin" / "nvcc").exists()


@cache
def detect_kernel_env(device_type: str = "cuda", device_index: int | None = None) -> KernelEnv:
    """Read versions and hardware facts of this process for tensors on ``device_type``."""
    if device_type != "cuda":
        return KernelEnv(device=device_type)
    capability = torch.cuda.get_device_capability(device_index) if torch.cuda.is_available() else None
    fla = _module_version("fla", "fla-core", "flash-linear-attention")
    tilelang = _importable_version("tilelang")
    return KernelEnv(
        device="cuda",
        capability=capability,
        triton=_module_version("triton", "triton", "pytorch-triton"),
        fla=fla,
        tilelang=tilelang,
        nvcc=_nvcc_available() if (fla and tilelang) else False,
        causal_conv1d=_module_version("causal_conv1d", "causal-conv1d", "causal_conv1d"),
        fla_tilelang_env=os.environ.get("FLA_TILELANG"),
        fla_dispatch_disabled=os.environ.get("FLA_DISABLE_BACKEND_DISPATCH") == "1",
    )


def env_for(tensor: torch.Tensor) -> KernelEnv:
    return detect_kernel_env(tensor.device.type, tensor.device.index if tensor.is_cuda else None)


def _check_requested(requested: str | None, allowed: tuple[str, ...], op: str) -> None:
    if requested not in AUTO and requested not in allowed:
        raise ValueError(f"{op}: backend must be None, 'auto' or one of {allowed}, got {requested!r}")


def _versions(env: KernelEnv) -> dict:
    return {k: v for k, v in dataclasses.asdict(env).items() if k not in ("fla_dispatch_disabled",)}


def hopper_triton_hazard(env: KernelEnv) -> bool:
    """True where fla's Triton gated backward is known to be wrong (Hopper, 3.4.0 <= Triton < 3.7.1)."""
    triton = _version(env.triton)
    return (
        env.capability is not None
        and env.capability[0] == 9
        and triton is not None
        and TRITON_BAD_MIN <= triton < TRITON_FIXED
    )


def _tilelang_blockers(env: KernelEnv) -> list[str]:
    """Why fla would not use its TileLang backward here (empty when it will)."""
    reasons = []
    fla = _version(env.fla)
    if fla is None or fla < FLA_MIN_TILELANG:
        reasons.append(
            f"fla {env.fla} has no TileLang backward (needs flash-linear-attention >= {FLA_MIN_TILELANG})"
        )
    if env.tilelang is None:
        reasons.append("tilelang is not importable")
    elif not env.nvcc:
        reasons.append("tilelang is installed but no nvcc was found (TileLang compiles with it)")
    if env.fla_tilelang_env == "0":
        reasons.append("FLA_TILELANG=0 disables it")
    if env.fla_dispatch_disabled:
        reasons.append("FLA_DISABLE_BACKEND_DISPATCH=1 disables it")
    return reasons


def gdn_backend_report(env: KernelEnv, requested: str | None = None) -> dict:
    """Decide the gated delta rule backend. Returns a dict with the versions and

    ``backend`` ("torch" | "naive" | "fla" | None), ``fla_backward`` ("triton" | "tilelang" | None),
    ``fla_native_gva`` (bool) and ``error`` (None, or the message to raise as RuntimeError).
    """
    _check_requested(requested, GDN_BACKENDS, "gated_delta_rule")
    report = {"op": "gated_delta_rule", "requested": requested, **_versions(env)}
    report.update(backend=None, fla_backward=None, fla_native_gva=None, error=None)
    if requested in ("torch", "naive"):
        return {**report, "backend": requested}
    if env.device == "cpu":
        if requested == "fla":
            return {
                **report,
                "error": "gated_delta_rule: backend='fla' needs CUDA tensors; use 'torch' on CPU",
            }
        return {**report, "backend": "torch"}
    if env.device != "cuda":
        msg = f"gated_delta_rule: no fused kernel for {env.device} tensors; pass backend='torch' explicitly"
        return {**report, "error": msg}
    if env.fla is None:
        msg = (
            "gated_delta_rule: CUDA tensors but flash-linear-attention (fla) is not installed; "
            f"{GPU_EXTRA_HINT}, or pass backend='torch' to run the slow pure-torch path on purpose."
        )
        return {**report, "error": msg}
    fla = _version(env.fla)
    report["fla_native_gva"] = fla is not None and fla >= FLA_MIN_GVA
    if not hopper_triton_hazard(env):
        return {**report, "backend": "fla", "fla_backward": "triton"}
    blockers = _tilelang_blockers(env)
    if not blockers:
        return {**report, "backend": "fla", "fla_backward": "tilelang"}
    msg = (
        f"gated_delta_rule: on this Hopper GPU (compute capability {env.capability}) Triton {env.triton} "
        f"computes wrong gradients in fla's gated backward (Triton >= {TRITON_BAD_MIN} and < {TRITON_FIXED}, "
        f"fla issue #640), and fla's TileLang replacement is unavailable: {'; '.join(blockers)}. "
        f"Fix: `pip install 'tilelang>=0.1.15'` with flash-linear-attention >= {FLA_MIN_TILELANG} and a CUDA "
        f"toolkit providing nvcc (or `pip install nvidia-cuda-nvcc`), or upgrade Triton: "
        f"`pip install -U 'triton>={TRITON_FIXED}'` (torch >= 2.12.1 ships it)."
    )
    return {**report, "error": msg}


def conv_backend_report(env: KernelEnv, requested: str | None = None) -> dict:
    """Decide the causal conv1d backend: ``backend`` ("torch" | "causal_conv1d" | "fla" | None), ``error``."""
    _check_requested(requested, CONV_BACKENDS, "causal_conv1d")
    report = {"op": "causal_conv1d", "requested": requested, **_versions(env), "backend": None, "error": None}
    if requested == "torch":
        return {**report, "backend": "torch"}
    if env.device != "cuda":
        if requested in AUTO and env.device == "cpu":
            return {**report, "backend": "torch"}
        return {**report, "error": f"causal_conv1d: backend={requested!r} needs CUDA tensors; use 'torch'"}
    installed = {"causal_conv1d": env.causal_conv1d, "fla": env.fla}
    if requested in AUTO:
        for name in ("causal_conv1d", "fla"):
            if installed[name] is not None:
                return {**report, "backend": name}
        msg = (
            "causal_conv1d: CUDA tensors but neither causal-conv1d nor flash-linear-attention is installed; "
            f"{GPU_EXTRA_HINT}, or pass backend='torch' on purpose."
        )
        return {**report, "error": msg}
    if installed[requested] is None:
        return {**report, "error": f"causal_conv1d: backend={requested!r} is not installed; {GPU_EXTRA_HINT}"}
    return {**report, "backend": requested}


def triton_interpreted() -> bool:
    """Whether Triton runs its kernels in its CPU interpreter (``TRITON_INTERPRET=1``: the tests), where our
    Triton ops accept CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_kernel_error(op: str, env: KernelEnv, interpreted: bool, *, use: str = "'torch'",
                         instead: str = "'torch'") -> str | None:
    """Why our Triton kernels of ``op`` cannot run on ``env``'s tensors, or None: they need CUDA tensors
    (CPU ones only under Triton's interpreter, ``interpreted``) and, on CUDA, Triton. ``use``: the
    backends to suggest on another device; ``instead``: the one to pass on purpose without Triton."""
    if env.device != "cuda" and not (interpreted and env.device == "cpu"):
        return (f"{op}: backend='triton' needs CUDA tensors (or CPU ones under TRITON_INTERPRET=1), got "
                f"{env.device}; use {use}")
    if env.device == "cuda" and env.triton is None:
        return f"{op}: CUDA tensors but Triton is not installed; {GPU_EXTRA_HINT}, or pass backend={instead} on purpose."
    return None


def conv_split_backend_report(env: KernelEnv, requested: str | None = None, *, interpreted: bool = False) -> dict:
    """Decide how the GDN conv + q/k/v/z split runs: ``backend`` ("triton": our fused kernels; "torch",
    "causal_conv1d", "fla": the unfused ops with that conv) and ``error``. Automatic: "torch" on CPU,
    "triton" on CUDA. "triton" on CPU tensors only under Triton's interpreter (``interpreted``, tests)."""
    _check_requested(requested, CONV_SPLIT_BACKENDS, "gdn_conv_split")
    report = {"op": "gdn_conv_split", "requested": requested, **_versions(env), "backend": None, "error": None}
    if requested in AUTO:
        if env.device == "cpu":
            return {**report, "backend": "torch"}
        requested = "triton"
    if requested != "triton":
        conv = conv_backend_report(env, requested)
        return {**report, "backend": conv["backend"], "error": conv["error"]}
    error = _triton_kernel_error("gdn_conv_split", env, interpreted)
    return {**report, "error": error} if error else {**report, "backend": "triton"}


def router_topk_backend_report(env: KernelEnv, requested: str | None = None, *, interpreted: bool = False) -> dict:
    """Decide how the router's top-k indices are found: ``backend`` ("triton": our row top-k kernel;
    "torch": ``torch.topk``) and ``error``. Automatic: "torch" on CPU, "triton" on CUDA (which then needs
    Triton). "triton" on CPU tensors only under Triton's interpreter (``interpreted``, tests)."""
    _check_requested(requested, ROUTER_TOPK_BACKENDS, "router_topk")
    report = {"op": "router_topk", "requested": requested, **_versions(env), "backend": None, "error": None}
    if requested in AUTO:
        requested = "triton" if env.device == "cuda" else "torch"
    if requested == "torch":
        return {**report, "backend": "torch"}
    error = _triton_kernel_error("router_topk", env, interpreted)
    return {**report, "error": error} if error else {**report, "backend": "triton"}


@cache
def router_topk_backend(env: KernelEnv, requested: str | None = None, *, interpreted: bool = False) -> str:
    """:func:`router_topk_backend_report` resolved (raises its error, logs the choice once), cached: the
    router asks on every forward."""
    return resolve(router_topk_backend_report(env, requested, interpreted=interpreted))


def moe_swiglu_backend_report(env: KernelEnv, requested: str | None = None, *, interpreted: bool = False) -> dict:
    """Decide the routed experts' weighted SwiGLU backend (``ops/moe_swiglu.py``): ``backend`` ("torch",
    "compile": megatron-core's compiled fusion, "triton": our kernels) and ``error``. Automatic: "torch" on
    CPU, "triton" on CUDA (which then needs Triton). "triton" on CPU tensors only under Triton's
    interpreter (``interpreted``, tests); "compile" anywhere (Inductor's C++ kernels on CPU)."""
    _check_requested(requested, MOE_SWIGLU_BACKENDS, "moe_weighted_swiglu")
    report = {"op": "moe_weighted_swiglu", "requested": requested, **_versions(env), "backend": None, "error": None}
    if requested in AUTO:
        requested = "triton" if env.device == "cuda" else "torch"
    if requested != "triton":
        return {**report, "backend": requested}
    error = _triton_kernel_error("moe_weighted_swiglu", env, interpreted, use="'torch' or 'compile'",
                                 instead="'compile'")
    return {**report, "error": error} if error else {**report, "backend": "triton"}


@cache
def moe_swiglu_backend(env: KernelEnv, requested: str | None = None, *, interpreted: bool = False) -> str:
    """:func:`moe_swiglu_backend_report` resolved (raises its error, logs the choice once), cached: the
    experts ask on every forward."""
    return resolve(moe_swiglu_backend_report(env, requested, interpreted=interpreted))


def norm_backend_report(env: KernelEnv, requested: str | None = None) -> dict:
    """Decide the gated RMSNorm backend: ``backend`` ("torch" | "fla" | None), ``error``."""
    _check_requested(requested, NORM_BACKENDS, "gated_rms_norm")
    report = {
        "op": "gated_rms_norm",
        "requested": requested,
        **_versions(env),
        "backend": None,
        "error": None,
    }
    if requested == "torch":
        return {**report, "backend": "torch"}
    if env.device != "cuda":
        if requested in AUTO and env.device == "cpu":
            return {**report, "backend": "torch"}
        return {**report, "error": f"gated_rms_norm: backend={requested!r} needs CUDA tensors; use 'torch'"}
    if env.fla is None:
        msg = (
            "gated_rms_norm: CUDA tensors but flash-linear-attention is not installed; "
            f"{GPU_EXTRA_HINT}, or pass backend='torch' on purpose."
        )
        return {**report, "error": msg}
    return {**report, "backend": "fla"}


def compiled_op_backend_report(op: str, env: KernelEnv, requested: str | None = None) -> dict:
    """Backend of an op whose fast form is ``torch.compile`` of its eager code (the zero-centred norm,
    the grouped experts' SwiGLU x probability, the cross-entropy's passes): ``backend`` ("torch" | "compile"), ``error`` (None). Automatic: eager torch on
    CPU, ``torch.compile`` (Inductor's Triton kernels) on CUDA. "compile" may be asked for on CPU too
    (Inductor's C++ kernels; the tests use it)."""
    _check_requested(requested, COMPILED_OP_BACKENDS, op)
    report = {"op": op, "requested": requested, **_versions(env), "backend": None, "error": None}
    if requested in AUTO:
        return {**report, "backend": "compile" if env.device == "cuda" else "torch"}
    return {**report, "backend": requested}


def grouped_gemm_backend_report(env: KernelEnv, requested: str | None = None) -> dict:
    """Backend of the grouped experts' grouped GEMMs: ``backend`` ("torch": ``torch.nn.functional.grouped_mm``,
    the default everywhere; "autotune": Inductor under max-autotune, which benchmarks its Triton
    grouped-GEMM templates against torch's kernel per shape and keeps the fastest; opt-in, CUDA with
    compute capability 9.0 or newer), ``error`` (the reason "autotune" cannot run here, else None)."""
    _check_requested(requested, GROUPED_GEMM_BACKENDS, "grouped_gemm")
    report = {"op": "grouped_gemm", "requested": requested, **_versions(env), "backend": None, "error": None}
    if requested in AUTO or requested == "torch":
        return {**report, "backend": "torch"}
    if env.device != "cuda" or env.capability is None or env.capability < (9, 0) or env.triton is None:
        return {**report, "error": (f"grouped_gemm backend 'autotune' needs a CUDA GPU of compute capability 9.0 or "
                                    f"newer and Triton (Inductor's grouped-GEMM templates); here: device "
                                    f"{env.device}, capability {env.capability}, triton {env.triton}")}
    return {**report, "backend": "autotune"}


@cache
def grouped_gemm_backend(env: KernelEnv, requested: str | None = None) -> str:
    """:func:`grouped_gemm_backend_report` resolved (raises its error, logs the choice once)."""
    return resolve(grouped_gemm_backend_report(env, requested))


@cache
def compiled_op_backend(op: str, env: KernelEnv, requested: str | None = None) -> str:
    """:func:`compiled_op_backend_report` resolved (logged once): the backend name, cached per op,
    environment and request, because the ops ask on every call."""
    return resolve(compiled_op_backend_report(op, env, requested))


def compiled_or_eager(fn, backend: str):
    """``fn`` itself for backend "torch"; for "compile", ``torch.compile(fn)`` (made once per function)
    called with its tensor arguments made contiguous. Contiguous is the layout every compiled graph
    accepts: torch 2.11's Inductor, reusing a graph made dynamic by an earlier process (its on-disk
    automatic-dynamic profile), failed in the backward on a strided view (the attention's q/k heads,
    slices of the fused projection: a saved input's stride assertion); a copy is made only for such views."""
    return _compiled(fn) if backend == "compile" else fn


def _variant(args: tuple, kwargs: dict) -> tuple:
    """What makes torch.compile trace a new graph, shapes aside: grad mode, and each tensor argument's rank,
    dtype and device."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    return torch.is_grad_enabled(), tuple((t.dim(), t.dtype, t.device.type) for t in tensors)


def code_copy(fn):
    """``fn`` with a code object of its own (same globals, defaults and closure): dynamo counts graphs and
    recompilations per code object, so each copy compiled separately has its own budget."""
    clone = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    clone.__kwdefaults__ = fn.__kwdefaults__
    return clone


@cache
def compiled(fn):
    """``torch.compile(fn)`` taking its arguments as they are, one compiled copy of ``fn`` per
    :func:`_variant` (grad mode; rank, dtype and device of each tensor argument). For graphs without autograd
    inside (an ``autograd.Function``'s forward and backward), which accept strided inputs; ops whose compiled
    graph records the backward use :func:`compiled_or_eager`.

    Why copies: dynamo keeps its graphs, and counts them against ``recompile_limit`` (8), per code object,
    and past the limit it runs the function eagerly from then on (one log line, then the slow path). One
    function serving training and evaluation (grad on and off), two tensor ranks (the norm of the hidden
    states and of the attention heads), two dtypes and a dynamic-shape retrace reached it (the bf16 GPU
    parity test; a tiny CPU training with evaluation made 5 graphs); each copy has its own code object, so
    each variant gets its own graphs (a static and a dynamic one)."""
    variants: dict[tuple, object] = {}

    @wraps(fn)
    def call(*args, **kwargs):
        key = _variant(args, kwargs)
        graph = variants.get(key)
        if graph is None:
            graph = variants[key] = torch.compile(code_copy(fn), dynamic=None)
        return graph(*args, **kwargs)

    return call


@cache
def _compiled(fn):
    graph = compiled(fn)

    @wraps(fn)
    def call(*args, **kwargs):
        def contiguous(a):
            return a.contiguous() if isinstance(a, torch.Tensor) else a

        return graph(*map(contiguous, args), **{k: contiguous(v) for k, v in kwargs.items()})

    return call


_LOGGED: set[tuple] = set()


def log_once(logger: logging.Logger, key: tuple, msg: str, *args) -> None:
    """``logger.info(msg, *args)`` the first time ``key`` is seen in this process (backend choices are
    asked on every call and logged once)."""
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.info(msg, *args)


def resolve(report: dict) -> str:
    """Raise the report's error, log the choice once per process, return the backend name."""
    if report["error"] is not None:
        raise RuntimeError(report["error"])
    key = (report["op"], report["backend"], report.get("fla_backward"), report["device"])
    if key not in _LOGGED:
        details = ", ".join(
            f"{k}={v}" for k, v in report.items() if k not in ("op", "error") and v is not None
        )
        log_once(log, key, "%s backend: %s", report["op"], details)
    return report["backend"]
