"""The megatron-core checkpoint folder as we write it, and :func:`load_mcore_checkpoint`.

Layout (what Megatron-LM's ``--load DIR`` and megatron-core's ``dist_checkpointing.load`` read)::

    DIR/latest_checkpointed_iteration.txt   "release" (or an iteration number for training checkpoints)
    DIR/release/                            the torch_dist checkpoint (or DIR/iter_0000100/ ...)
    DIR/qwen3_next_config.json              our Qwen3NextConfig
    DIR/config.json                         the HF config.json it came from
    DIR/conversion.json                     how it was made (source, layout recorded, dtype)
    DIR/tokenizer.json ...                  tokenizer/generation files of the HF folder
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..config import ParallelConfig, Qwen3NextConfig

log = logging.getLogger(__name__)

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
CONFIG_NAME = "qwen3_next_config.json"
CONVERSION_NAME = "conversion.json"


def checkpoint_dir(path: str | Path) -> Path:
    """The torch_dist folder of ``path``: a folder with a ``latest_checkpointed_iteration.txt``
    (``release`` -> ``release/``, N -> ``iter_{N:07d}/``) or a torch_dist folder itself."""
    path = Path(path)
    if (path / "metadata.json").is_file() and (path / ".metadata").is_file():
        return path
    tracker = path / TRACKER
    if not tracker.is_file():
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such checkpoint folder")
        raise FileNotFoundError(f"{path}: neither a torch_dist checkpoint (metadata.json + .metadata) nor a "
                                f"folder with {TRACKER}")
    text = tracker.read_text().strip()
    if text == RELEASE:
        sub = path / RELEASE
    elif text.isdigit():
        sub = path / f"iter_{int(text):07d}"
    else:
        raise ValueError(f"{tracker}: expected 'release' or an iteration number, found {text[:40]!r}")
    if not ((sub / "metadata.json").is_file() and (sub / ".metadata").is_file()):
        raise FileNotFoundError(f"{tracker} points to {sub.name}/, which is not a complete torch_dist checkpoint "
                                "(metadata.json and .metadata expected)")
    return sub


def find_config(path: str | Path) -> Qwen3NextConfig | None:
    """Our config stored beside a checkpoint: ``qwen3_next_config.json`` (or a HF ``config.json``) in
    ``path`` or, when ``path`` is an iteration folder, its parent."""
    path = Path(path)
    for folder in (path, path.parent):
        if (folder / CONFIG_NAME).is_file():
            return Qwen3NextConfig.model_validate_json((folder / CONFIG_NAME).read_text())
        if (folder / "config.json").is_file():
            return Qwen3NextConfig.from_hf(folder / "config.json")
    return None


def megatron_args(config: Qwen3NextConfig, layout: ParallelConfig, dtype: str | None) -> argparse.Namespace:
    """The ``args`` entry Megatron-LM's ``load_checkpoint`` reads from a checkpoint's common state (it
    compares the layout and the architecture sizes with its own run's)."""
    return argparse.Namespace(
        num_layers=2 * config.num_hidden_layers,  # megatron hybrid layers: mixer + MoE per decoder layer
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.num_key_value_heads,
        kv_channels=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        padded_vocab_size=config.vocab_size,
        add_position_embedding=False,
        position_embedding_type="rope",
        num_experts=config.num_experts,
        moe_router_topk=config.num_experts_per_tok,
        mtp_num_layers=config.mtp_num_layers or None,
        **layout.megatron_sizes(),
        params_dtype=dtype,
        no_save_optim=True,
        no_save_rng=True,
        consumed_train_samples=0,
        skipped_train_samples=0,
        consumed_valid_samples=0,
    )


def load_mcore_checkpoint(model, path: str | Path, *, strict: bool = True) -> dict:
    """Load a megatron-core checkpoint into ``model`` (this rank's chunk from ``build_model``), at
    whatever parallel layout ``model`` was built with (megatron-core reshards).

    ``path``: a folder with ``latest_checkpointed_iteration.txt`` (what ``convert hf-to-mcore`` writes,
    or a training run's save folder) or a torch_dist folder. Every rank of the job calls this.
    Non-model entries of a training checkpoint (optimizer state, RNG, ...) are ignored. With ``strict``,
    every weight of the model must be in the checkpoint (``_extra_state`` objects may be absent: they hold
    no weights). Returns {tensors: checkpoint entries loaded, checkpoint: the torch_dist folder}.
    """
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    from ..model.hf_weights import named_weight_tensors

    ckpt = checkpoint_dir(path)
    stored = set(load_sharded_metadata(str(ckpt)))
    sharded = model.sharded_state_dict()
    absent = {k for k, v in sharded.items()
              if (v.unique_key if isinstance(v, ShardedObject) else v.key) not in stored}
    missing_weights = sorted(k for k in absent if not isinstance(sharded[k], ShardedObject))
    if missing_weights and strict:
        raise ValueError(f"{ckpt}: {len(missing_weights)} weights of the model are not in the checkpoint, "
                         f"e.g. {missing_weights[:3]}")
    # absent _extra_state objects hold no weights (a checkpoint written for another backend may lack some)
    request = {k: v for k, v in sharded.items() if k not in absent}
    loaded = dist_checkpointing.load(request, str(ckpt))
    # megatron-core reads into the tensors of the sharded state dict, which are the parameters or views
    # of them; values it had to assemble (merged factories) are copied where a weight has that name
    targets = dict(model.named_parameters()) | named_weight_tensors(model)
    with torch.no_grad():
        for name, value in loaded.items():
            target = targets.get(name)
            if isinstance(value, torch.Tensor) and target is not None and value.data_ptr() != target.data_ptr():
                target.copy_(value)
    n = sum(not isinstance(v, ShardedObject) for v in request.values())
    extra = {k: v for k, v in loaded.items() if k.endswith("_extra_state") and not isinstance(v, ShardedObject)}
    if extra:
        model.load_state_dict(extra, strict=False)
    log.info("loaded %d weights from %s", n, ckpt)
    return {"tensors": n, "checkpoint": ckpt}


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
