"""``load_hf_weights``: stream a HF Qwen3-Next checkpoint into this rank's share of the model.

Tensors are read one at a time from safetensors (memory-mapped), joined by the mapping table
(:mod:`qwen3_next_mcore.convert.mapping`), cut to this rank's tensor/expert-parallel block and copied
into the parameter; nothing else of the checkpoint is held in memory.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..convert.hf_checkpoint import HFCheckpoint, check_against_config, fused_expert_names, listed_names
from ..convert.mapping import build_rules, expected_hf_shapes, to_ours
from ..convert.transforms import tp_shard

log = logging.getLogger(__name__)
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")


def named_weight_tensors(model) -> dict[str, torch.Tensor]:
    """This rank's weights by local name, with stacked expert weights (:class:`GroupedGemmExperts`)
    shown as per-expert views under ``SequentialMLP``'s names, so every tensor has one mapping rule."""
    from ..layers.grouped_experts import GroupedGemmExperts

    out = {}
    stacked = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, GroupedGemmExperts):
            for sub, view in mod.expert_views():
                out[f"{mod_name}.{sub}"] = view
            stacked.update({f"{mod_name}.weight1", f"{mod_name}.weight2"})
    for name, p in model.named_parameters():
        if name not in stacked:
            out[name] = p
    return out


def expert_view_grads(model) -> dict[str, torch.Tensor]:
    """Gradients keyed like :func:`named_weight_tensors` (views of stacked expert gradients)."""
    from ..layers.grouped_experts import GroupedGemmExperts

    out = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, GroupedGemmExperts) and mod.weight1.grad is not None:
            for name in (f"{mod_name}.weight1", f"{mod_name}.weight2"):
                out.pop(name, None)
            for e in range(mod.num_local_experts):
                out[f"{mod_name}.local_experts.{e}.linear_fc1.weight"] = mod.weight1.grad[e]
                out[f"{mod_name}.local_experts.{e}.linear_fc2.weight"] = mod.weight2.grad[e]
    return out


def global_param_names(model) -> dict[str, str]:
    """This rank's weight names (:func:`named_weight_tensors`) -> global names (pipeline layer offset
    and expert index applied)."""
    from megatron.core import parallel_state as ps

    cfg = model.qwen3_next_config
    ep_rank, ep = ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()
    local_experts = cfg.num_experts // ep
    names = {}
    for name in named_weight_tensors(model):
        g = name
        m = _LAYER.match(g)
        if m:
            number = model.decoder.layers[int(m.group(1))].layer_number
            g = f"decoder.layers.{number - 1}." + g[m.end():]
        g = _EXPERT.sub(lambda mm: f".mlp.experts.local_experts.{ep_rank * local_experts + int(mm.group(1))}.", g)
        names[name] = g
    return names


def param_shard_info(name: str, param) -> tuple[int | None, int, int, bool]:
    """(partition dim or None, rank, size, glu) of this rank's block of weight ``name`` (a parameter or
    a per-expert view from :func:`named_weight_tensors`)."""
    from megatron.core import parallel_state as ps

    if ".mlp.experts.local_experts." in name:
        rank, size = ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
        if size == 1:
            return None, 0, 1, False
        fc1 = name.endswith("linear_fc1.weight")
        return (0 if fc1 else 1), rank, size, fc1
    if not getattr(param, "tensor_model_parallel", False):
        return None, 0, 1, False
    rank, size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    return param.partition_dim, rank, size, name.endswith("linear_fc1.weight")


class StateDictCheckpoint:
    """The :class:`HFCheckpoint` interface over an in-memory HF state dict (e.g. a transformers model's
    ``state_dict()``), so :func:`load_hf_weights` takes either. Fused expert tensors
    (``...mlp.experts.gate_up_proj`` ``[E, 2F, H]``, ``down_proj`` ``[E, H, F]``) are listed under their
    per-expert names, as on disk."""

    def __init__(self, state_dict: Mapping[str, torch.Tensor], name: str = "<state dict>"):
        self.directory = Path(name)
        self._sd = dict(state_dict)
        self._virtual = fused_expert_names({k: tuple(t.shape) for k, t in self._sd.items()}, lambda _: name)

    def keys(self) -> set[str]:
        return listed_names(self._sd, self._virtual)

    def get(self, key: str) -> torch.Tensor:
        if key in self._virtual:
            real, e, part = self._virtual[key]
            t = self._sd[real][e]
            half = t.shape[0] // 2
            return {"gate": t[:half], "up": t[half:], "all": t}[part]
        return self._sd[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.get(key).shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.get(key).dtype

    def file_of(self, key: str) -> str:
        return key


def load_hf_weights(model, hf_dir, *, strict: bool = True, allow_extra: bool = False,
                    only: tuple[str, ...] | None = None) -> dict:
    """Load a HF Qwen3-Next checkpoint into ``model`` (this rank's share), MTP included.

    ``hf_dir``: a checkpoint folder (streamed from safetensors), an open :class:`HFCheckpoint`, or an
    in-memory HF state dict (``{name: tensor}``, e.g. ``hf_model.state_dict()``).
    Accepts per-expert (on-disk) and fused (transformers 5.x) expert layouts. With ``strict``, every
    parameter of the model must be filled and every expected HF tensor must have its expected shape;
    unexpected HF tensors raise unless ``allow_extra``. ``only``: load just the parameters whose global
    names start with one of these prefixes (e.g. ``("decoder.layers.0.self_attention.",)``); the
    checkpoint then needs only their HF tensors, and any others in it are ignored.
    Returns a report {tensors, bytes, skipped}.
    """
    cfg = model.qwen3_next_config
    if isinstance(hf_dir, Mapping):
        ckpt = StateDictCheckpoint(hf_dir)
    else:
        ckpt = hf_dir if isinstance(hf_dir, (HFCheckpoint, StateDictCheckpoint)) else HFCheckpoint(hf_dir)
    rules = {r.ours: r for r in build_rules(cfg)}
    names = global_param_names(model)
    expected = expected_hf_shapes(cfg)
    if only is not None:
        names = {local: glob for local, glob in names.items() if glob.startswith(only)}
        wanted = {h for glob in names.values() if glob in rules for h in rules[glob].hf}
        expected = {k: v for k, v in expected.items() if k in wanted}
    extra = check_against_config(ckpt, expected, allow_extra=allow_extra or only is not None)
    params = named_weight_tensors(model)
    n_tensors = n_bytes = 0
    with torch.no_grad():
        for local, glob in names.items():
            if glob not in rules:
                if strict:
                    raise ValueError(f"parameter {local} ({glob}) has no HF source in the mapping table")
                continue
            rule = rules[glob]
            full = to_ours(rule, [ckpt.get(k) for k in rule.hf], cfg)
            p = params[local]
            dim, rank, size, glu = param_shard_info(local, p)
            block = full if dim is None else tp_shard(full, dim, rank, size, glu=glu)
            if block.shape != p.shape:
                raise ValueError(f"{local}: HF {rule.hf} give shape {list(block.shape)}, parameter is {list(p.shape)}")
            p.copy_(block.to(device=p.device, dtype=p.dtype))
            n_tensors += 1
            n_bytes += block.numel() * block.element_size()
    log.info("loaded %d tensors (%.1f MB) from %s", n_tensors, n_bytes / 1e6, ckpt.directory)
    return {"tensors": n_tensors, "bytes": n_bytes, "skipped": extra}
