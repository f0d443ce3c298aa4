"""Tiny random Hugging Face Qwen3-Next checkpoints (with MTP tensors) and the MTP reference.

transformers has no MTP, so :func:`make_hf_checkpoint` adds ``mtp.*`` tensors in the released
checkpoints' naming, and :class:`HFMTPReference` computes spec 3.6 with transformers' own decoder layer.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from pathlib import Path

import torch

from ..config import Qwen3NextConfig


def hf_model(config: Qwen3NextConfig, seed: int = 0, dtype=torch.float32):
    """A random ``transformers.Qwen3NextForCausalLM`` for ``config``; every weight (norms, A_log, dt_bias
    included) is perturbed away from its initial value so layout mistakes cannot hide."""
    import transformers

    torch.manual_seed(seed)
    hf_cfg = transformers.Qwen3NextConfig(**config.to_hf())
    model = transformers.Qwen3NextForCausalLM(hf_cfg).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.1 if p.ndim == 1 else 0.02
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def mtp_tensors(config: Qwen3NextConfig, seed: int = 1, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random ``mtp.*`` tensors of one MTP layer (a full-attention + MoE decoder layer), HF naming."""
    from ..convert.mapping import expected_hf_shapes

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in expected_hf_shapes(config).items():
        if name.startswith("mtp."):
            scale = 0.1 if len(shape) == 1 else 0.02
            out[name] = (torch.randn(shape, generator=g) * scale).to(dtype)
    return out


def make_hf_checkpoint(config: Qwen3NextConfig, directory, seed: int = 0, dtype=torch.float32,
                       max_shard_size: str | None = None):
    """Write a random checkpoint with ``save_pretrained`` plus MTP tensors; returns the HF model.

    Written in a temporary sibling folder and moved into ``directory`` file by file, ``config.json``
    last: a run that dies midway leaves no ``config.json`` there, so nothing takes it for a checkpoint."""
    import shutil

    from ..convert.output import make_tmp_dir

    directory = Path(directory)
    tmp = make_tmp_dir(directory)
    try:
        model, mtp = _write_hf_checkpoint(config, tmp, seed, dtype, max_shard_size)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").unlink(missing_ok=True)
    for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):  # config.json last
        os.replace(f, directory / f.name)
    tmp.rmdir()
    model.mtp_state = mtp
    return model


def _write_hf_checkpoint(config, tmp: Path, seed, dtype, max_shard_size):
    from safetensors.torch import load_file, save_file

    model = hf_model(config, seed, dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(tmp, **kwargs)
    mtp = mtp_tensors(config, seed + 1, dtype) if config.mtp_num_layers else {}
    if mtp:
        index = tmp / "model.safetensors.index.json"
        if index.is_file():
            save_file(mtp, str(tmp / "model-mtp.safetensors"), metadata={"format": "pt"})
            data = json.loads(index.read_text())
            data["weight_map"].update({k: "model-mtp.safetensors" for k in mtp})
            index.write_text(json.dumps(data, indent=2))
        else:
            path = tmp / "model.safetensors"
            tensors = load_file(str(path))
            tensors.update(mtp)
            save_file(tensors, str(path), metadata={"format": "pt"})
    # the MTP count travels in config.json, as our converter writes it
    cfg_path = tmp / "config.json"
    data = json.loads(cfg_path.read_text())
    data["num_nextn_predict_layers"] = config.mtp_num_layers
    cfg_path.write_text(json.dumps(data, indent=2))
    return model, mtp


class HFMTPReference(torch.nn.Module):
    """Spec 3.6 with transformers' modules: fc(cat(norm_e(embed(x_{t+1})), norm_h(h_t))) -> decoder layer
    -> norm -> lm_head. ``h`` is the main model's final-normed hidden state (what lm_head sees)."""

    def __init__(self, hf_model, mtp_state: dict[str, torch.Tensor]):
        super().__init__()
        from transformers.models.qwen3_next import modeling_qwen3_next as m

        cfg = hf_model.config
        self.hf = hf_model
        self.has_mtp = bool(mtp_state)
        if not self.has_mtp:
            return
        full_idx = cfg.layer_types.index("full_attention")
        self.layer = m.Qwen3NextDecoderLayer(cfg, full_idx).to(next(hf_model.parameters()).dtype)
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.norm_e, self.norm_h, self.norm = (m.Qwen3NextRMSNorm(H, eps) for _ in range(3))
        self.fc = torch.nn.Linear(2 * H, H, bias=False)
        state = {k.removeprefix("mtp.layers.0."): v for k, v in mtp_state.items() if k.startswith("mtp.layers.0.")}
        self.layer.load_state_dict(_fuse_experts(state, cfg.num_experts))
        with torch.no_grad():
            self.norm_e.weight.copy_(mtp_state["mtp.pre_fc_norm_embedding.weight"])
            self.norm_h.weight.copy_(mtp_state["mtp.pre_fc_norm_hidden.weight"])
            self.norm.weight.copy_(mtp_state["mtp.norm.weight"])
            self.fc.weight.copy_(mtp_state["mtp.fc.weight"])
        ref = next(hf_model.parameters())
        self.to(device=ref.device, dtype=ref.dtype)

    def forward(self, input_ids: torch.Tensor):
        """-> (main logits [B, S, V], MTP logits [B, S, V]); the last MTP position sees token id 0
        as its next token, as megatron-core's roll fills it."""
        with transformers_torch_kernels(input_ids.device):
            return self._forward(input_ids)

    def _forward(self, input_ids: torch.Tensor):
        out = self.hf.model(input_ids=input_ids)
        h = out.last_hidden_state
        logits = self.hf.lm_head(h)
        if not self.has_mtp:
            return logits, None
        nxt = torch.roll(input_ids, -1, dims=1)
        nxt[:, -1] = 0
        e = self.hf.model.embed_tokens(nxt)
        x = self.fc(torch.cat([self.norm_e(e), self.norm_h(h)], dim=-1))
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        cos_sin = self.hf.model.rotary_emb(x, pos)
        # in x's dtype: SDPA given a float32 mask with float64 queries attended wrongly (MTP logits 6% off)
        mask = torch.full((input_ids.shape[1],) * 2, float("-inf"), device=x.device, dtype=x.dtype).triu(1)[None, None]
        x = self.layer(x, position_embeddings=cos_sin, attention_mask=mask, position_ids=pos)
        if isinstance(x, tuple):
            x = x[0]
        return logits, self.hf.lm_head(self.norm(x))


# transformers' Qwen3-Next functions that it binds, at import, to flash-linear-attention's or
# causal-conv1d's kernels when those are installed (GPU-only Triton kernels)
_KERNEL_FUNCTIONS = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule", "causal_conv1d_fn",
                     "causal_conv1d_update")


@contextlib.contextmanager
def transformers_torch_kernels(device: torch.device):
    """On a CPU ``device``, run transformers' Qwen3-Next with its own torch functions even where fla is
    installed (transformers picks fla's kernels at import, whatever the tensors' device, and fla's Triton
    kernels cannot take CPU tensors: a float64 CPU reference on a GPU machine failed in fla's l2norm).
    Elsewhere a no-op."""
    if torch.device(device).type != "cpu":
        yield
        return
    from transformers.models.qwen3_next import modeling_qwen3_next as m

    saved = {name: getattr(m, name) for name in _KERNEL_FUNCTIONS if hasattr(m, name)}
    try:
        for name, fn in saved.items():
            setattr(m, name, inspect.unwrap(fn))
        yield
    finally:
        for name, fn in saved.items():
            setattr(m, name, fn)


def _fuse_experts(state: dict, num_experts: int) -> dict:
    """Per-expert on-disk names -> transformers 5.x fused expert parameters (for load_state_dict)."""
    out = {k: v for k, v in state.items() if ".experts." not in k}
    gate_up = [torch.cat([state[f"mlp.experts.{e}.gate_proj.weight"], state[f"mlp.experts.{e}.up_proj.weight"]])
               for e in range(num_experts)]
    out["mlp.experts.gate_up_proj"] = torch.stack(gate_up)
    out["mlp.experts.down_proj"] = torch.stack([state[f"mlp.experts.{e}.down_proj.weight"] for e in range(num_experts)])
    return out
