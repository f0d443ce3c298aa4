"""Run a function under N local processes (gloo on CPU) the way torchrun would, and collect results.

Used by the test suite to exercise TP/EP/PP/CP on a CPU machine::

    results = run_distributed(my_fn, world_size=2, args=(...,))   # my_fn(rank, *args) -> picklable

Processes come from a ``forkserver`` that has torch and megatron-core preloaded: a plain fork of a
process that already ran gloo or OpenMP threads can deadlock, and a spawn re-imports megatron-core in
seconds per process. Where CUDA is available the processes are spawned instead: importing megatron-core
there initialises CUDA in the forkserver, and a forked child cannot use CUDA after that. ``fn`` must
therefore be importable (a module-level function). Each process gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT like torchrun sets them.
A failure on any rank raises in the caller with that rank's traceback.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import traceback
from typing import Any, Callable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world_size, port, args, kwargs, queue):
    import torch

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    try:
        result = fn(rank, *args, **kwargs)
        # plain pickle bytes: torch's queue reducer would share tensor storage through file descriptors
        # that vanish when this process exits before the parent reads them
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from qwen3_next_mcore import parallel

            parallel.destroy()
        except Exception:  # noqa: BLE001
            pass


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    kwargs: dict | None = None,
    timeout: float = 600.0,
) -> list[Any]:
    """Run ``fn(rank, *args, **kwargs)`` on ``world_size`` processes; return results by rank."""
    import torch

    if torch.cuda.is_available():
        ctx = mp.get_context("spawn")
    else:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "megatron.core", "qwen3_next_mcore.parallel"])
    queue = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_child, args=(fn, r, world_size, port, args, kwargs or {}, queue), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    import queue as queue_mod

    try:
        for _ in range(world_size):
            try:
                rank, ok, payload = queue.get(timeout=timeout)
            except queue_mod.Empty:
                waiting = [r for r in range(world_size) if r not in results]
                errors[waiting[0]] = f"no result within {timeout:.0f} s (hung or crashed); ranks {waiting} killed"
                break
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
            if errors:
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        rank = min(errors)
        raise RuntimeError(f"rank {rank} of {world_size} failed:\n{errors[rank]}")
    missing = [r for r in range(world_size) if r not in results]
    if missing:
        raise RuntimeError(f"ranks {missing} of {world_size} returned nothing (crashed?)")
    return [results[r] for r in range(world_size)]
