"""Shared pieces of the model parity tests: run our model under a layout, compare with transformers."""

from __future__ import annotations

import torch

from qwen3_next_mcore.config import Qwen3NextConfig
from qwen3_next_mcore.convert import mapping
from qwen3_next_mcore.convert.transforms import tp_unshard


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def make_batch(input_ids: torch.Tensor) -> dict:
    labels = torch.roll(input_ids, -1, dims=1)
    labels[:, -1] = 0
    loss_mask = torch.ones_like(input_ids, dtype=torch.float32)
    loss_mask[:, -1] = 0
    return {"tokens": input_ids, "labels": labels, "loss_mask": loss_mask}


def run_ours(rank: int, cfg_json: str, ckpt: str, input_ids: torch.Tensor, layout: dict, sequence_parallel=False,
             packed_lengths: list[int] | None = None, with_grads: bool = True, experts: str = "grouped"):
    """Build our model under ``layout``, load ``ckpt``, return logits, MTP logits, loss and grads."""
    from megatron.core import parallel_state as ps
    from megatron.core.packed_seq_params import PackedSeqParams

    from qwen3_next_mcore import parallel
    from qwen3_next_mcore.model import build_model, full_logits, load_hf_weights
    from qwen3_next_mcore.model.hf_weights import (expert_view_grads, global_param_names, named_weight_tensors,
                                                   param_shard_info)
    from qwen3_next_mcore.training import forward_backward

    cfg = Qwen3NextConfig.model_validate_json(cfg_json)
    parallel.initialize(**layout)
    model = build_model(cfg, sequence_parallel=sequence_parallel, experts=experts)
    load_hf_weights(model, ckpt)
    packed = None
    if packed_lengths is not None:
        cu = torch.tensor([0] + list(torch.tensor(packed_lengths).cumsum(0)), dtype=torch.int32)
        m = max(packed_lengths)
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=m,
                                 max_seqlen_kv=m)
    out = {}
    if ps.get_pipeline_model_parallel_world_size() == 1:
        logits, mtp = full_logits(model, input_ids, packed_seq_params=packed, with_mtp=True)
        out["logits"], out["mtp"] = logits, mtp
    else:
        out["logits"] = full_logits(model, input_ids)
    if with_grads:
        batch = make_batch(input_ids)
        if packed is not None:
            batch = packed_batch(input_ids, packed_lengths) | {"packed_seq_params": packed}
        model.zero_grad(set_to_none=True)
        res = forward_backward(model, [batch])
        out["loss"] = res.get("lm loss")
        finalize_grads_like_megatron(model)
        names = global_param_names(model)
        weights = named_weight_tensors(model)
        out["grads"] = {names[n]: (g.detach().clone(), *param_shard_info(n, weights[n]))
                        for n, g in expert_view_grads(model).items()}
        out["tp_rank"], out["ep_rank"] = ps.get_tensor_model_parallel_rank(), ps.get_expert_model_parallel_rank()
        out["etp_rank"] = ps.get_expert_tensor_parallel_rank()
        out["dp_rank"] = ps.get_data_parallel_rank()
    return out


def finalize_grads_like_megatron(model):
    """What megatron-core's DDP + finalize_model_grads do to raw gradients, for a model used without
    DDP: average over data-parallel replicas (experts: sum over the expert-data-parallel group, scaled by
    1/dp), sum replicated weights over TP (q/k norms; norms under sequence parallelism), and sum the
    word-embedding gradient of the first and last pipeline stages (MTP uses it on the last stage)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    dp = ps.get_data_parallel_world_size()
    tp_group = ps.get_tensor_model_parallel_group()
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        if not getattr(p, "allreduce", True):  # expert parameter
            dist.all_reduce(p.grad, group=ps.get_expert_data_parallel_group())
        else:
            dist.all_reduce(p.grad, group=ps.get_data_parallel_group())
        p.grad /= dp
        if ps.get_tensor_model_parallel_world_size() > 1 and (
                "q_layernorm" in name or "k_layernorm" in name
                or (model.config.sequence_parallel and getattr(p, "sequence_parallel", False))):
            dist.all_reduce(p.grad, group=tp_group)
    if ps.get_pipeline_model_parallel_world_size() > 1 and ps.is_rank_in_embedding_group():
        if model.pre_process or getattr(model, "mtp_process", False):
            weight = model.embedding.word_embeddings.weight
            dist.all_reduce(weight.grad, group=ps.get_embedding_group())


def packed_batch(input_ids: torch.Tensor, lengths: list[int]) -> dict:
    """One row of concatenated sequences: labels never cross a boundary."""
    tokens = input_ids.reshape(1, -1)
    labels = torch.zeros_like(tokens)
    mask = torch.zeros_like(tokens, dtype=torch.float32)
    start = 0
    for n in lengths:
        labels[0, start:start + n - 1] = tokens[0, start + 1:start + n]
        mask[0, start:start + n - 1] = 1
        start += n
    return {"tokens": tokens, "labels": labels, "loss_mask": mask}


def assemble_grads(results: list[dict]) -> dict[str, torch.Tensor]:
    """Per-rank (grad shard, dim, rank, size, glu) -> full gradients by our global name."""
    pieces: dict[str, dict] = {}
    for r in results:
        for name, (g, dim, rank, size, glu) in r.get("grads", {}).items():
            entry = pieces.setdefault(name, {"dim": dim, "glu": glu, "shards": {}, "size": size})
            entry["shards"].setdefault(rank, g)
    full = {}
    for name, e in pieces.items():
        shards = [e["shards"][i] for i in range(e["size"])] if e["dim"] is not None else [e["shards"][0]]
        full[name] = tp_unshard(shards, e["dim"], glu=e["glu"]) if e["dim"] is not None else shards[0]
    return full


def grads_to_hf_names(cfg: Qwen3NextConfig, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our gradients -> HF disk names, through the same (linear, bit-exact) mapping as the weights."""
    out = {}
    for rule in mapping.build_rules(cfg):
        if rule.ours in grads:
            for name, t in zip(rule.hf, mapping.to_hf(rule, grads[rule.ours], cfg)):
                out[name] = t
    return out


def hf_reference(hf_model, mtp_state, input_ids: torch.Tensor, mtp_scale: float = 0.1, packed_lengths=None):
    """transformers' logits, MTP logits, loss and gradients (HF disk names), the objective being the
    LM token-mean plus ``mtp_scale`` times the MTP token-mean, as megatron-core trains it."""
    from qwen3_next_mcore.testing.tiny_hf import HFMTPReference

    ref = HFMTPReference(hf_model, mtp_state)
    for p in ref.parameters():
        p.requires_grad_(True)
    ref.zero_grad(set_to_none=True)
    seqs = [input_ids] if packed_lengths is None else list(input_ids.reshape(-1).split(packed_lengths))
    seqs = [s.reshape(1, -1) if s.dim() == 1 else s for s in seqs]
    lm_sum = mtp_sum = 0.0
    lm_n = mtp_n = 0
    logits_all, mtp_all = [], []
    for ids in seqs:
        logits, mtp_logits = ref(ids)
        logits_all.append(logits)
        mtp_all.append(mtp_logits)
        ce = torch.nn.functional.cross_entropy
        V = logits.shape[-1]
        lm_sum = lm_sum + ce(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="sum")
        lm_n += ids[:, 1:].numel()
        if mtp_logits is not None and ids.shape[1] > 2:
            mtp_sum = mtp_sum + ce(mtp_logits[:, :-2].reshape(-1, V), ids[:, 2:].reshape(-1), reduction="sum")
            mtp_n += ids[:, 2:].numel()
    lm = lm_sum / lm_n
    total = lm + (mtp_scale * mtp_sum / max(mtp_n, 1) if mtp_scale else 0.0)
    total.backward()
    grads = {}
    for name, p in ref.hf.named_parameters():
        grads.update(_hf_param_to_disk(name, p.grad, hf_model.config.num_experts))
    if not ref.has_mtp:
        return torch.cat(logits_all, dim=1).detach(), None, lm.item(), grads
    prefix = "mtp.layers.0."
    for name, p in ref.layer.named_parameters():
        grads.update(_hf_param_to_disk(name, p.grad, hf_model.config.num_experts, prefix))
    grads["mtp.pre_fc_norm_embedding.weight"] = ref.norm_e.weight.grad.clone()
    grads["mtp.pre_fc_norm_hidden.weight"] = ref.norm_h.weight.grad.clone()
    grads["mtp.norm.weight"] = ref.norm.weight.grad.clone()
    grads["mtp.fc.weight"] = ref.fc.weight.grad.clone()
    return torch.cat(logits_all, dim=1).detach(), torch.cat(mtp_all, dim=1).detach(), lm.item(), grads


def _hf_param_to_disk(name: str, grad, num_experts: int, prefix: str = ""):
    if grad is None:
        return {}
    # a copy: a later ``model.to(dtype)`` converts ``p.grad`` in place (test_gpu_parity's bf16 run did,
    # rounding the float32 reference's norm gradients to bf16)
    grad = grad.detach().clone()
    if name.endswith("mlp.experts.gate_up_proj"):
        base = prefix + name.removesuffix("gate_up_proj")
        out = {}
        for e in range(num_experts):
            gate, up = grad[e].chunk(2, dim=0)
            out[f"{base}{e}.gate_proj.weight"] = gate
            out[f"{base}{e}.up_proj.weight"] = up
        return out
    if name.endswith("mlp.experts.down_proj"):
        base = prefix + name.removesuffix("down_proj")
        return {f"{base}{e}.down_proj.weight": grad[e] for e in range(num_experts)}
    return {prefix + name: grad}
