"""Timing, profiling and correctness primitives of the benchmarks, and their atomic file writes.

Method (issue #7): correctness before timing, medians of many timed repeats after warm-up, the matmul
rate measured in the same run. On CUDA each repeat is timed with CUDA events around the call (the
queue is drained first); on CPU with ``time.perf_counter``.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Timing:
    """Milliseconds of ``reps`` timed repeats."""

    median_ms: float
    min_ms: float
    reps: int

    def as_dict(self) -> dict:
        return {"median_ms": self.median_ms, "min_ms": self.min_ms, "reps": self.reps}


def measure(fn: Callable[[], object], *, warmup: int, reps: int, device: torch.device) -> Timing:
    """Run ``fn`` ``warmup`` times, then time ``reps`` calls one by one; median and min in ms."""
    return measure_steps(fn, warmup=warmup, reps=reps, steps_per_window=1, device=device)


def measure_steps(step: Callable[[], object], *, warmup: int, reps: int, steps_per_window: int,
                  device: torch.device) -> Timing:
    """Per-step milliseconds of ``step`` issued back to back: ``reps`` windows of ``steps_per_window`` calls
    each (no host synchronisation inside a window, as a training loop that reads each step's numbers
    after issuing the next one runs), timed with CUDA events around the window (``time.perf_counter`` on
    CPU); median and min over the windows of the window time / steps, after ``warmup`` calls."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps_per_window):
                step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / steps_per_window)
        else:
            t0 = time.perf_counter()
            for _ in range(steps_per_window):
                step()
            times.append((time.perf_counter() - t0) * 1e3 / steps_per_window)
    return Timing(statistics.median(times), min(times), reps)


def time_fwd_bwd(forward: Callable[[], torch.Tensor], zero_grad: Callable[[], None], *, warmup: int,
                 reps: int, device: torch.device) -> tuple[Timing, Timing]:
    """(forward, forward+backward) timings of ``forward``; the backward takes one fixed random output
    gradient, and ``zero_grad`` clears the gradients before each repeat (and at the end)."""
    step = fwd_bwd_step(forward, zero_grad)
    fwd = measure(forward, warmup=warmup, reps=reps, device=device)
    both = measure(step, warmup=warmup, reps=reps, device=device)
    zero_grad()
    return fwd, both


def outputs(out) -> list[torch.Tensor]:
    """A candidate's output(s) as a list: one tensor, or the tensors of an op with several outputs."""
    return list(out) if isinstance(out, (tuple, list)) else [out]


def fwd_bwd_step(forward: Callable[[], torch.Tensor], zero_grad: Callable[[], None]) -> Callable[[], None]:
    """A callable that clears the gradients, runs ``forward`` and back-propagates one fixed random gradient
    per output (drawn now, from one forward call)."""
    grads = [torch.randn_like(o) for o in outputs(forward())]

    def step():
        zero_grad()
        torch.autograd.backward(outputs(forward()), grads)

    return step


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, *, warmup: int = 3, reps: int = 10) -> float:
    """The dense matmul rate (TFLOP/s) of an ``n x n x n`` ``dtype`` GEMM on ``device``, measured now."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = measure(lambda: a @ b, warmup=warmup, reps=reps, device=device)
    return 2 * n**3 / (t.median_ms * 1e-3) / 1e12


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64."""
    got, want = got.detach().double(), want.detach().double().to(got.device)
    if got.shape != want.shape:
        raise ValueError(f"shape {list(got.shape)} != reference {list(want.shape)}")
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def profile_table(step: Callable[[], object], *, steps: int, device: torch.device, row_limit: int = 40) -> str:
    """torch.profiler summary of ``steps`` calls of ``step`` (after one untimed call), as text: a header with
    the wall, device-busy and host (self CPU) time per step, then operators and kernels sorted by their own
    device time and, on a GPU, a second table sorted by their own host time (where the host is the
    bottleneck, the GPU idles while it issues work: wall > device-busy)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    step()
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - start) * 1e3 / steps
    events = prof.key_averages()
    host_ms = sum(e.self_cpu_time_total for e in events) / 1e3 / steps
    head = f"per step (under the profiler): wall {wall_ms:.1f} ms, host (self CPU) {host_ms:.1f} ms"
    if cuda:
        # kernels only (the device-side events), as torch's own "Self CUDA time total": an operator's row
        # also carries its kernels' time, so summing every row counted each kernel twice
        busy_ms = sum(e.self_device_time_total for e in events
                      if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)) / 1e3 / steps
        head += f", GPU-busy {busy_ms:.1f} ms"
        kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
        idle_us, gaps = idle_gaps(kernels)
        head += f"\nGPU idle between its first and last kernel: {idle_us / 1e3 / steps:.1f} ms per step"
        if gaps:
            head += "; the longest gaps (ms, kernel before -> kernel after):\n" + "\n".join(
                f"  {us / 1e3:7.3f}  {before[:70]} -> {after[:70]}" for us, before, after in gaps)
    text = head + "\n\n" + events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                         row_limit=row_limit, max_name_column_width=90)
    if cuda:
        text += "\n\nsorted by host time:\n" + events.table(sort_by="self_cpu_time_total", row_limit=row_limit,
                                                            max_name_column_width=90)
    return text


def idle_gaps(kernels: list[tuple[str, float, float]], *, top: int = 12) -> tuple[float, list[tuple[float, str, str]]]:
    """Where a device idles: ``kernels`` as (name, start, end) in microseconds, any order, any streams
    (overlapping kernels count once) -> (the idle time between the first start and the last end, the
    ``top`` longest gaps as (length, the kernel that ended last before it, the kernel that starts it)),
    longest first. Gaps are what the host did not issue in time (or a synchronisation)."""
    idle, gaps = 0.0, []
    last_end, last_name = None, None
    for name, start, end in sorted(kernels, key=lambda k: (k[1], k[2])):
        if last_end is not None and start > last_end:
            idle += start - last_end
            gaps.append((start - last_end, last_name, name))
        if last_end is None or end > last_end:
            last_end, last_name = end, name
    gaps.sort(key=lambda g: -g[0])
    return idle, gaps[:top]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text).strip("_")


def write_profile(profile_dir: Path, case: str, candidate: str, what: str, table: str) -> Path:
    """Write a :func:`profile_table` ``table`` of ``candidate`` in ``case`` (``what``: the profiled calls) to
    ``profile_dir/CASE__CANDIDATE.txt`` (letters and digits kept, everything else ``_``); returns the path."""
    path = Path(profile_dir) / f"{_slug(case)}__{_slug(candidate)}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, f"# {candidate}: {what}\n\n{table}\n")
    return path
