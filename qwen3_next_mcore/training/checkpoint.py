"""Training checkpoints in megatron-core's dist-checkpointing format (``torch_dist``).

Layout, as Megatron-LM writes it::

    SAVE/latest_checkpointed_iteration.txt      the last complete iteration, written last
    SAVE/iter_0000010/                          model + optimizer (sharded), scheduler, progress, RNG

A checkpoint is written to ``iter_XXXXXXX.tmp`` and renamed when every rank has finished, and only then
is the tracker file replaced, so a crash mid-save leaves the previous checkpoint as the latest one.
Per-rank RNG states are ``ShardedObject``s keyed by global rank; they are restored only when the world
size is unchanged.

Optimizer state is saved with megatron-core's ``chained_optim_avoid_prefix``: its tensors are keyed by
parameter, not by sub-optimizer (dense / expert), so it reloads at a layout where the number of
sub-optimizers differs; the non-tensor part (Adam's step) is then re-placed by :func:`_restructure`.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ..convert.mcore import RELEASE, TRACKER  # Megatron-LM's tracker file; "release": a converted checkpoint

log = logging.getLogger(__name__)
_OPTIMIZER_METADATA = {"chained_optim_avoid_prefix": True}


def iteration_dir(root: Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def _tracker_text(root: Path | None) -> str | None:
    """The text of ``root``'s tracker file, None when there is none."""
    tracker = None if root is None else Path(root) / TRACKER
    return tracker.read_text().strip() if tracker is not None and tracker.is_file() else None


def _iteration(root: Path, text: str) -> int:
    if text == RELEASE:
        return 0
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{Path(root) / TRACKER}: expected an iteration number, found {text!r}") from None


def latest_iteration(root: Path | None) -> int | None:
    """The iteration named by ``root``'s tracker file, None when there is none; 0 for a converted
    (``release``) checkpoint."""
    text = _tracker_text(root)
    return None if text is None else _iteration(root, text)


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sharded_state(model_chunks, optimizer, *, is_loading: bool, rng: dict | None) -> dict:
    """The sharded state dict to save or load (``optimizer=None``: model and RNG only)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model_sd = {}
    for i, chunk in enumerate(model_chunks):
        module = getattr(chunk, "module", chunk)
        model_sd["model" if len(model_chunks) == 1 else f"model{i}"] = module.sharded_state_dict()
    merged = {}
    for sd in model_sd.values():
        merged.update(sd)
    state = dict(model_sd)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(merged, is_loading=is_loading,
                                                          metadata=dict(_OPTIMIZER_METADATA))
    rank, world = dist.get_rank(), dist.get_world_size()
    state["rng_state"] = ShardedObject("rng_state", rng, (world,), (rank,), replica_id=0)
    return state


def _skeleton(tree):
    """The nesting of ``tree`` (dicts and lists copied, leaves kept), taken before loading mutates it."""
    if isinstance(tree, dict):
        return {k: _skeleton(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_skeleton(v) for v in tree]
    return tree


def _find(tree, key: str):
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for v in tree.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


def _num_suboptimizers(tree) -> int:
    """megatron-core's ``ChainedOptimizer`` nests one state per sub-optimizer under 0, 1, ...; a single
    optimizer's state is not nested."""
    if isinstance(tree, dict) and tree and all(isinstance(k, int) for k in tree):
        return len(tree)
    return 1


def _restructure(skeleton, loaded, step):
    """The optimizer state dict in this run's nesting (``skeleton``): tensors and non-persistent values
    from ``loaded`` at the same path, ``common_step`` from the checkpoint. dist-checkpointing returns the
    checkpoint's own non-tensor nesting, which differs when the number of sub-optimizers does."""
    if isinstance(skeleton, dict):
        sub = loaded if isinstance(loaded, dict) else {}
        out = {}
        for k, v in skeleton.items():
            if k == "common_step":
                out[k] = step
            elif k == "param_groups":  # this run's groups (hyperparameters only; the scheduler sets lr/wd)
                out[k] = [{**g, "params": _unwrap(g["params"])} for g in v]
            else:
                out[k] = _restructure(v, sub.get(k), step)
        if isinstance(out.get("state"), dict):  # a torch optimizer's state: megatron restores the step from here
            out["state"]["common_step"] = step
        return out
    return loaded if loaded is not None else skeleton


def _unwrap(value):
    return value.unwrap() if hasattr(value, "unwrap") else value


def save(root: Path, iteration: int, model_chunks, optimizer, scheduler, *, consumed_samples: int,
         extra: dict | None = None) -> Path:
    """Write the checkpoint of ``iteration`` under ``root``; returns its folder."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final, tmp = iteration_dir(root, iteration), iteration_dir(root, iteration).with_suffix(".tmp")
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    state = _sharded_state(model_chunks, optimizer, is_loading=False, rng=_rng_state())
    state["scheduler"] = scheduler.state_dict()
    state["progress"] = {"iteration": iteration, "consumed_samples": consumed_samples,
                         "world_size": dist.get_world_size(), **(extra or {})}
    dist_checkpointing.save(state, str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        tracker_tmp = root / (TRACKER + ".tmp")
        tracker_tmp.write_text(f"{iteration}\n")
        os.replace(tracker_tmp, root / TRACKER)
    dist.barrier()
    log.info("saved checkpoint of iteration %d to %s", iteration, final)
    return final


def load(root: Path, model_chunks, optimizer, scheduler, *, load_optimizer: bool = True,
         finetune: bool = False) -> dict | None:
    """Restore the latest checkpoint under ``root`` into the model, optimizer and scheduler
    (``load_optimizer=False``: the model only; the optimizer and scheduler keep their fresh state).

    Model and optimizer state reload at another TP/PP/EP layout (see the module docstring). A converted
    checkpoint (tracker ``release``, from ``convert hf-to-mcore``) and ``finetune=True`` (Megatron-LM's
    ``--finetune``) load the model weights only and start at iteration 0 with fresh optimizer, scheduler
    and data position. Whenever the optimizer state is not loaded, its main (fp32) copies of the weights
    are refreshed from the loaded model (``reload_model_params``), as Megatron-LM does.

    Returns its ``progress`` dict (``iteration``, ``consumed_samples``, ...), or None when ``root`` has no
    tracker file (a fresh start, as Megatron-LM does)."""
    from megatron.core import dist_checkpointing

    text = _tracker_text(root)
    if text is None:
        log.warning("--load %s: no %s there; starting from scratch", root, TRACKER)
        return None
    if text == RELEASE:
        from ..convert import load_mcore_checkpoint

        for chunk in model_chunks:
            load_mcore_checkpoint(getattr(chunk, "module", chunk), root)
        optimizer.reload_model_params()
        log.info("loaded the converted checkpoint %s (weights only; starting at iteration 0)", root)
        return {"iteration": 0, "consumed_samples": 0}
    if finetune:
        load_optimizer = False
    iteration = _iteration(root, text)
    path = iteration_dir(root, iteration)
    if not path.is_dir():
        raise ValueError(f"--load {root}: {TRACKER} names iteration {iteration} but {path} is missing")
    common = dist_checkpointing.load_common_state_dict(str(path))
    same_world = common["progress"]["world_size"] == dist.get_world_size()
    state = _sharded_state(model_chunks, optimizer if load_optimizer else None, is_loading=True, rng=None)
    if not same_world:
        state.pop("rng_state")
        log.warning("world size changed (%d -> %d): RNG states not restored",
                    common["progress"]["world_size"], dist.get_world_size())
    skeleton = _skeleton(state.get("optimizer"))
    loaded = dist_checkpointing.load(state, str(path))
    for i, chunk in enumerate(model_chunks):
        module = getattr(chunk, "module", chunk)
        module.load_state_dict(loaded["model" if len(model_chunks) == 1 else f"model{i}"])
    if load_optimizer:
        opt_state = loaded["optimizer"]
        step = _find(common.get("optimizer"), "common_step")
        if step is not None and _num_suboptimizers(common.get("optimizer")) != _num_suboptimizers(skeleton):
            opt_state = _restructure(skeleton, opt_state, step)
        optimizer.load_state_dict(opt_state)
        scheduler.load_state_dict(common["scheduler"])
    else:
        optimizer.reload_model_params()
    if finetune:
        log.info("loaded the weights of %s (iteration %d) for fine-tuning: starting at iteration 0", path, iteration)
        return {"iteration": 0, "consumed_samples": 0}
    if same_world:
        _set_rng_state(loaded["rng_state"])
    log.info("resumed from %s (iteration %d)", path, iteration)
    return dict(common["progress"])
