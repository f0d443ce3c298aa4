"""megatron-core checkpoint (any TP/PP/EP, converted or trained) -> HF safetensors folder, streaming.

The checkpoint's model tensors are read region by region (a routed expert is one row of its
``[num_experts, ...]`` tensor) in buckets of ``bucket_size`` bytes, split into HF tensors by the mapping
table and written straight to their place in safetensors shards planned up front with huggingface_hub's
``split_torch_state_dict_into_shards`` (per-expert names, ``mtp.*`` included). Entries that are not model
weights (optimizer state, RNG, ``_extra_state``) are ignored.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..config import Qwen3NextConfig
from .dcp_io import McoreCheckpointReader, buckets_by_size
from .hf_checkpoint import config_dtype
from .hf_to_mcore import parse_dtype
from .mapping import Rule, build_rules, expected_hf_shapes, mcore_key, mcore_tensor_shapes, to_hf
from .mcore import checkpoint_dir, find_config
from .output import (
    ConversionReport,
    atomic_output_dir,
    check_output_free,
    copy_side_files,
    gc_paused,
    parse_size,
    progress_bar,
)
from .safetensors_io import ShardWriter

log = logging.getLogger(__name__)


def convert_mcore_to_hf(
    mcore_dir: str | Path,
    output: str | Path,
    *,
    max_shard_size: int | str = "5GB",
    dtype: str | torch.dtype | None = None,
    config: Qwen3NextConfig | str | Path | None = None,
    bucket_size: int | str = "512MiB",
    sync: bool = True,
    progress: bool | None = None,
) -> ConversionReport:
    """Convert the megatron-core checkpoint at ``mcore_dir`` into a HF folder ``output`` that
    ``transformers.AutoModelForCausalLM.from_pretrained`` loads (``mtp.*`` weights included).

    ``mcore_dir``: what ``convert hf-to-mcore`` wrote, a training save folder (with
    ``latest_checkpointed_iteration.txt``) or a torch_dist folder. ``config``: the model config when none
    is stored beside the checkpoint (a :class:`Qwen3NextConfig`, a HF ``config.json`` or its folder,
    whose tokenizer files are then copied too when the checkpoint folder has none).
    ``dtype`` casts every tensor (default: as stored). Raises FileNotFoundError, FileExistsError or
    ValueError naming what is wrong; nothing appears at ``output`` unless the conversion succeeds (with
    ``sync``, only once every file is on disk). ``bucket_size`` bounds memory.
    """
    t0 = time.perf_counter()
    mcore_dir, output = Path(mcore_dir), Path(output)
    check_output_free(output)
    cast = parse_dtype(dtype)
    shard_bytes, bucket_bytes = parse_size(max_shard_size), parse_size(bucket_size)
    ckpt_dir = checkpoint_dir(mcore_dir)
    config_dir = None if config is None or isinstance(config, Qwen3NextConfig) else Path(config)
    if config_dir is not None and config_dir.is_file():
        config_dir = config_dir.parent
    config = _resolve_config(config, mcore_dir, ckpt_dir)
    reader = McoreCheckpointReader(ckpt_dir)
    _check_tensors(reader, config)

    rules = build_rules(config)
    hf_shapes = expected_hf_shapes(config)
    stored = {k: v.properties.dtype for k, v in reader.tensors.items()}
    plan = {name: torch.empty(hf_shapes[name], dtype=cast or stored[mcore_key(r.ours)[0]], device="meta")
            for r in rules for name in r.hf}
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(plan, max_shard_size=shard_bytes)
    total = sum(t.numel() * t.element_size() for t in plan.values())
    side_src = mcore_dir if mcore_dir != ckpt_dir else ckpt_dir.parent

    with atomic_output_dir(output, sync) as tmp, gc_paused():
        writers = {f: ShardWriter(tmp / f, [(n, plan[n].dtype, tuple(plan[n].shape)) for n in names])
                   for f, names in split.filename_to_tensors.items()}
        try:
            # a finished shard is closed (and flushed to disk) in the background while the next is written
            with progress_bar(total, "mcore-to-hf", progress) as bar, \
                    ThreadPoolExecutor(1, thread_name_prefix="convert-fsync") as flusher:
                closing = []
                for bucket in buckets_by_size(rules, lambda r: _rule_bytes(r, plan), bucket_bytes):
                    tensors = reader.read([_region(r, reader) for r in bucket])
                    for rule, ours in zip(bucket, tensors, strict=True):
                        if mcore_key(rule.ours)[1] is not None:
                            ours = ours[0]
                        for name, t in zip(rule.hf, to_hf(rule, ours, config), strict=True):
                            t = t.to(plan[name].dtype).contiguous()
                            writer = writers[split.tensor_to_filename[name]]
                            writer.write(name, t)
                            bar.update(t.numel() * t.element_size())
                            if writer.complete:
                                closing.append(flusher.submit(writer.close, sync))
                    del tensors
                for f in closing:
                    f.result()
            for w in writers.values():
                w.close(sync)  # checks that every planned tensor was written
        finally:
            for w in writers.values():
                w.abort()
        if split.is_sharded:
            index = {"metadata": {**split.metadata, "total_size": total}, "weight_map": split.tensor_to_filename}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        _write_hf_config(tmp, config, side_src, {t.dtype for t in plan.values()})
        copy_side_files(side_src, tmp)
        if config_dir is not None:
            copy_side_files(config_dir, tmp)  # only those still missing
    report = ConversionReport("mcore-to-hf", output, len(plan), total, time.perf_counter() - t0, len(writers))
    log.info("%s", report)
    return report


def _resolve_config(config, mcore_dir: Path, ckpt_dir: Path) -> Qwen3NextConfig:
    if isinstance(config, Qwen3NextConfig):
        return config
    if config is not None:
        return Qwen3NextConfig.from_hf(config)
    found = find_config(mcore_dir) or find_config(ckpt_dir)
    if found is None:
        raise FileNotFoundError(f"{mcore_dir}: no qwen3_next_config.json or config.json beside the checkpoint; "
                                "pass the model's HF config.json with --config")
    return found


def _check_tensors(reader: McoreCheckpointReader, config: Qwen3NextConfig) -> None:
    expected = mcore_tensor_shapes(config)
    missing = sorted(set(expected) - set(reader.tensors))
    if missing:
        raise ValueError(f"{reader.directory}: {len(missing)} model tensors are not in the checkpoint, e.g. "
                         f"{missing[:3]} (is it a Qwen3-Next checkpoint of this config?)")
    for key, shape in expected.items():
        got = tuple(reader.tensors[key].size)
        if got != shape:
            raise ValueError(f"{reader.directory}: {key} has global shape {list(got)}, the config implies "
                             f"{list(shape)}")


def _region(rule: Rule, reader: McoreCheckpointReader) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    key, expert = mcore_key(rule.ours)
    shape = tuple(reader.tensors[key].size)
    if expert is None:
        return key, (0,) * len(shape), shape
    return key, (expert,) + (0,) * (len(shape) - 1), (1, *shape[1:])


def _rule_bytes(rule: Rule, plan: dict[str, torch.Tensor]) -> int:
    return sum(plan[n].numel() * plan[n].element_size() for n in rule.hf)


def _write_hf_config(tmp: Path, config: Qwen3NextConfig, side_src: Path, dtypes: set[torch.dtype]) -> None:
    """The HF config.json stored beside the checkpoint when it describes ``config`` (else ours), its
    declared dtype set to the dtype of the written tensors when they all share one."""
    src = side_src / "config.json"
    same = src.is_file() and Qwen3NextConfig.from_hf(src) == config
    data = json.loads(src.read_text()) if same else config.to_hf()
    if len(dtypes) == 1 and config_dtype(data) != (written := next(iter(dtypes))):
        data.pop("torch_dtype", None)
        data["dtype"] = str(written).removeprefix("torch.")
    elif same:
        shutil.copyfile(src, tmp / "config.json")
        return
    (tmp / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
