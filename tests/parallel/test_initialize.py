import os

import torch
import torch.distributed as dist

from qwen3_next_mcore import parallel
from qwen3_next_mcore.testing.distributed import run_distributed


def _init_and_report(rank, tp, ep):
    from megatron.core import parallel_state as ps

    layout = parallel.initialize(tensor_parallel=tp, expert_parallel=ep)
    assert parallel.initialize(tensor_parallel=tp, expert_parallel=ep) == layout  # idempotent
    # a real collective over the tensor-parallel group
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t, group=ps.get_tensor_model_parallel_group())
    # the RNG tracker works on this device (CPU: our tracker; GPU: megatron's)
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        r = torch.rand(1)
    out = dict(
        world=dist.get_world_size(), backend=dist.get_backend(),
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
        ep_size=ps.get_expert_model_parallel_world_size(), dp_size=ps.get_data_parallel_world_size(),
        sum=t.item(), rand=r.item(),
    )
    parallel.destroy()
    assert not dist.is_initialized() and not parallel.is_initialized()
    parallel.destroy()  # idempotent
    return out


def test_single_process_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    out = _init_and_report(0, 1, 1)
    assert out["world"] == 1 and out["tp_size"] == 1 and out["sum"] == 1.0
    assert out["backend"] == ("nccl" if torch.cuda.is_available() else "gloo")
    # an in-process store: no port was taken (a free port found, released and bound again could be lost
    # to another process in between: EADDRINUSE seen in CI); a second initialisation works the same way
    assert "MASTER_PORT" not in os.environ
    assert _init_and_report(0, 1, 1)["sum"] == 1.0


def test_two_processes_tensor_parallel():
    outs = run_distributed(_init_and_report, 2, args=(2, 1))
    assert [o["tp_rank"] for o in outs] == [0, 1]
    assert all(o["world"] == 2 and o["tp_size"] == 2 and o["sum"] == 3.0 for o in outs)
    # tensor-parallel ranks draw different numbers inside the model-parallel RNG fork
    assert outs[0]["rand"] != outs[1]["rand"]


def test_two_processes_expert_parallel():
    outs = run_distributed(_init_and_report, 2, args=(1, 2))
    assert all(o["ep_size"] == 2 and o["dp_size"] == 2 and o["tp_size"] == 1 for o in outs)


def test_bad_layout_message():
    import pytest

    with pytest.raises(RuntimeError, match="world size 2 is not a multiple"):
        run_distributed(_init_and_report, 2, args=(3, 1))
