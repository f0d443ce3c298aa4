"""Shared pieces of the conversion tests: tiny configs, tensor comparison, and the functions that
``run_distributed`` runs in each rank (module-level, so the forkserver children can import them)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qwen3_next_mcore.config import Qwen3NextConfig, get_preset


def tiny_config(**overrides) -> Qwen3NextConfig:
    """The tiny preset (3 GDN + 1 attention layer, 8 experts, MTP) with a small vocabulary."""
    return get_preset("tiny", vocab_size=384, router_aux_loss_coef=0.0, **overrides)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def hf_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files of a HF folder (tiny checkpoints only)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        part = load_file(str(f))
        assert not set(part) & set(out), f"{f}: tensor names repeated across shards"
        out.update(part)
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes and bits."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for k, x in a.items():
        y = b[k]
        assert x.dtype == y.dtype and x.shape == y.shape, (k, x.dtype, y.dtype)
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), k


def fuse_experts_on_disk(src: Path, dst: Path, num_experts: int) -> None:
    """A copy of HF folder ``src`` with the experts stored fused, as transformers 5.x holds them in
    memory (``mlp.experts.gate_up_proj`` [E, 2F, H], gate rows first; ``mlp.experts.down_proj`` [E, H, F])."""
    import shutil

    from safetensors.torch import save_file

    tensors = hf_tensors(src)
    out, prefixes = {}, set()
    for k, v in tensors.items():
        if ".mlp.experts." in k and ".shared_expert" not in k:
            prefixes.add(k.split(".mlp.experts.")[0] + ".mlp.experts")
        else:
            out[k] = v
    for p in prefixes:
        out[f"{p}.gate_up_proj"] = torch.stack([torch.cat([tensors[f"{p}.{e}.gate_proj.weight"],
                                                           tensors[f"{p}.{e}.up_proj.weight"]]) for e in range(num_experts)])
        out[f"{p}.down_proj"] = torch.stack([tensors[f"{p}.{e}.down_proj.weight"] for e in range(num_experts)])
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copyfile(f, dst / f.name)


# ----- run in each rank by run_distributed ------------------------------------------------------------
def sharded_keys(rank: int, cfg_json: str, layout: dict, experts: str = "grouped"):
    """(tensor key -> global shape, ShardedObject unique keys) of this rank's model."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from qwen3_next_mcore import parallel
    from qwen3_next_mcore.model import build_model

    parallel.initialize(**layout)
    model = build_model(Qwen3NextConfig.model_validate_json(cfg_json), experts=experts)
    sd = model.sharded_state_dict()
    apply_factories(sd)
    tensors, objects = {}, set()
    for v in nested_values(sd):
        if isinstance(v, ShardedTensor):
            tensors[v.key] = tuple(v.global_shape)
        else:
            objects.add(v.unique_key)
    return tensors, objects


def load_and_resave(rank: int, cfg_json: str, mcore_dir: str, layout: dict, save_dir: str | None,
                    input_ids: torch.Tensor | None, experts: str = "grouped"):
    """Build the model at ``layout``, load the converted checkpoint, optionally compute logits, and save
    the model the way a training run does (megatron-core's torch_dist format, at this layout, under
    ``iter_0000010`` with a tracker, plus optimizer-like entries that are not model weights)."""
    from qwen3_next_mcore import parallel
    from qwen3_next_mcore.convert import load_mcore_checkpoint
    from qwen3_next_mcore.model import build_model, full_logits

    parallel.initialize(**layout)
    model = build_model(Qwen3NextConfig.model_validate_json(cfg_json), experts=experts)
    report = load_mcore_checkpoint(model, mcore_dir)
    out = {"tensors": report["tensors"]}
    if input_ids is not None:
        out["logits"] = full_logits(model, input_ids)
    if save_dir is not None:
        save_like_training(model, Path(save_dir))
    return out


def save_like_training(model, save_dir: Path, iteration: int = 10) -> None:
    """megatron-core's ``dist_checkpointing.save`` of {model, optimizer-like state} at this rank's layout.

    megatron-core 0.19's default save strategy needs CUDA (it synchronises a device and allocates on
    it), so on CPU the same translation is written with torch.distributed.checkpoint's synchronous
    writer and megatron-core's own planner: the files have the format a GPU run writes.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    class SyncTorchDist(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
            dcp.save(mcore_to_pyt_state_dict(flat, False), storage_writer=dcp.FileSystemWriter(checkpoint_dir),
                     planner=MCoreSavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False))

    rank = dist.get_rank()
    ckpt = save_dir / f"iter_{iteration:07d}"
    if rank == 0:
        ckpt.mkdir(parents=True)
    dist.barrier()
    # an optimizer-like entry whose key contains a model key: must be ignored by the exporter
    moment = torch.full((model.config.hidden_size,), float(rank))
    optimizer = {"exp_avg": ShardedTensor.from_rank_offsets(
        "optimizer.state.exp_avg.decoder.final_norm.weight", moment, replica_id=rank)}
    state = {"model": model.sharded_state_dict(), "optimizer": optimizer, "iteration": iteration}
    dist_checkpointing.save(state, str(ckpt), sharded_strategy=SyncTorchDist())
    if rank == 0:
        (save_dir / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    dist.barrier()


def convert_on_each_rank(rank: int, hf_dir: str, out: str, kwargs: dict):
    """``convert_hf_to_mcore`` called on every rank, as under torchrun."""
    from qwen3_next_mcore.convert import convert_hf_to_mcore

    report = convert_hf_to_mcore(hf_dir, out, progress=False, **kwargs)
    return json.loads(json.dumps({"tensors": report.tensors, "bytes": report.bytes}))


def plain_megatron_load(rank: int, cfg_json: str, mcore_dir: str, hf_dir: str, layout: dict, experts: str):
    """megatron-core's own ``dist_checkpointing.load`` (default strictness) of the converted release
    folder; the loaded weights must equal those ``load_hf_weights`` reads from the HF folder."""
    from megatron.core import dist_checkpointing

    from qwen3_next_mcore import parallel
    from qwen3_next_mcore.model import build_model, load_hf_weights
    from qwen3_next_mcore.model.hf_weights import named_weight_tensors

    parallel.initialize(**layout)
    cfg = Qwen3NextConfig.model_validate_json(cfg_json)
    model = build_model(cfg, experts=experts)
    loaded = dist_checkpointing.load(model.sharded_state_dict(), str(Path(mcore_dir) / "release"))
    for key in ("args", "checkpoint_version", "iteration", "qwen3_next_config"):  # the common (non-model) state
        loaded.pop(key)
    if experts == "sequential":
        model.load_state_dict(loaded)  # exactly what Megatron-LM's load_checkpoint does
    else:  # megatron-core loads into the parameters (or views of them) in place; copy what has a name
        with torch.no_grad():
            for name, p in named_weight_tensors(model).items():
                if name in loaded:
                    p.copy_(loaded[name])
    reference = build_model(cfg, experts=experts)
    load_hf_weights(reference, hf_dir)
    ref = named_weight_tensors(reference)
    return sorted(n for n, p in named_weight_tensors(model).items() if not torch.equal(p, ref[n]))


def convert_with_failing_rank(rank: int, hf_dir: str, out: str, failing_rank: int):
    """As :func:`convert_on_each_rank`, with rank ``failing_rank`` failing half-way; returns the error."""
    from qwen3_next_mcore.convert import hf_to_mcore

    if rank == failing_rank:
        calls = []
        real = hf_to_mcore._produce

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 5:
                raise ValueError("boom")
            return real(*args, **kwargs)

        hf_to_mcore._produce = failing
    try:
        hf_to_mcore.convert_hf_to_mcore(hf_dir, out, bucket_size="64KB", progress=False)
    except Exception as e:  # noqa: BLE001 - the test checks what each rank saw
        return f"{type(e).__name__}: {e}"
    return None


def load_error(rank: int, cfg_json: str, mcore_dir: str):
    """The error ``load_mcore_checkpoint`` raises for this model and checkpoint (None if it loads)."""
    from qwen3_next_mcore import parallel
    from qwen3_next_mcore.convert import load_mcore_checkpoint
    from qwen3_next_mcore.model import build_model

    parallel.initialize()
    model = build_model(Qwen3NextConfig.model_validate_json(cfg_json))
    try:
        load_mcore_checkpoint(model, mcore_dir)
    except ValueError as e:
        return str(e)
    return None
