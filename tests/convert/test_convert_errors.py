"""Bad inputs fail before writing, with a message naming the file/key and what was expected, and leave
no output (and no temporary folder) behind; an interrupted conversion leaves nothing either."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from convert_helpers import tiny_config
from safetensors.torch import load_file, save_file

from qwen3_next_mcore.convert import convert_hf_to_mcore, convert_mcore_to_hf
from qwen3_next_mcore.convert import hf_to_mcore as h2m
from qwen3_next_mcore.convert import mcore_to_hf as m2h


def nothing_left(out: Path) -> bool:
    """``out`` does not exist, nor any temporary sibling of it."""
    return not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.fixture
def hf(tiny, tmp_path) -> Path:
    """A private copy of the tiny HF folder (sharded, with an index), to damage."""
    return Path(shutil.copytree(tiny[1], tmp_path / "hf"))


def _shard_of(hf: Path, key: str) -> Path:
    return hf / json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"][key]


def _rewrite(hf: Path, key: str, value: torch.Tensor | None, new_key: str | None = None) -> None:
    """Replace (or drop when ``value`` is None, or add as ``new_key``) one tensor, keeping the index right."""
    shard = _shard_of(hf, key)
    tensors = load_file(str(shard))
    index_path = hf / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    if new_key is not None:
        tensors[new_key] = value
        index["weight_map"][new_key] = shard.name
    elif value is None:
        del tensors[key]
        del index["weight_map"][key]
    else:
        tensors[key] = value
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))


def _h2m_fails(hf: Path, exc, match: str, **kwargs):
    out = hf.parent / "mcore"
    with pytest.raises(exc, match=match):
        convert_hf_to_mcore(hf, out, progress=False, **kwargs)
    assert nothing_left(out)


def test_index_points_to_missing_shard(hf):
    victim = _shard_of(hf, "model.norm.weight")
    victim.unlink()
    _h2m_fails(hf, FileNotFoundError, rf"points to {victim.name}, which does not exist")


def test_truncated_shard(hf):
    victim = _shard_of(hf, "model.embed_tokens.weight")
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 1000])
    _h2m_fails(hf, ValueError, rf"{victim.name}: truncated: the header describes {len(data)} bytes")


def test_missing_tensor(hf):
    _rewrite(hf, "mtp.fc.weight", None)
    _h2m_fails(hf, ValueError, r"1 expected tensors are missing, e.g. \['mtp.fc.weight'\]")


def test_shape_mismatch(hf):
    _rewrite(hf, "model.layers.2.linear_attn.A_log", torch.zeros(3))
    _h2m_fails(hf, ValueError, r"model.layers.2.linear_attn.A_log has shape \[3\], the config implies \[4\]")


def test_dtype_mismatch(hf):
    _rewrite(hf, "model.layers.0.mlp.gate.weight", torch.zeros(8, 64, dtype=torch.float16))
    _h2m_fails(hf, ValueError, r"model.layers.0.mlp.gate.weight has dtype torch.float16, the config declares "
               r"torch.float32")


def test_unknown_tensor_needs_allow_extra(hf, tmp_path):
    _rewrite(hf, "model.norm.weight", torch.zeros(2), new_key="model.rotary_emb.extra")
    _h2m_fails(hf, ValueError, r"1 unknown tensors, e.g. \['model.rotary_emb.extra'\] \(pass --allow-extra")
    convert_hf_to_mcore(hf, tmp_path / "ok", allow_extra=True, progress=False)
    info = json.loads((tmp_path / "ok" / "conversion.json").read_text())
    assert info["skipped_hf_tensors"] == ["model.rotary_emb.extra"]


def test_parallel_size_must_divide_the_model(hf):
    _h2m_fails(hf, ValueError, r"num_attention_heads=4 is not divisible by tensor_parallel=3", tensor_parallel=3)
    _h2m_fails(hf, ValueError, r"num_experts=8 is not divisible by expert_parallel=3", expert_parallel=3)
    _h2m_fails(hf, ValueError, r"num_hidden_layers=4 is not divisible by pipeline_parallel=3", pipeline_parallel=3)


def test_config_errors(hf):
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(cfg | {"hidden_act": "gelu"}))
    _h2m_fails(hf, ValueError, r"config.json: hidden_act='gelu': only silu experts are supported")
    (hf / "config.json").unlink()
    _h2m_fails(hf, FileNotFoundError, r"no config.json")
    _h2m_fails(hf.parent / "nowhere", FileNotFoundError, r"no config.json")


def test_bad_options(hf):
    _h2m_fails(hf, ValueError, r"dtype 'int8': expected one of bf16, fp32, fp16", dtype="int8")
    _h2m_fails(hf, ValueError, r"size '0MB': expected a positive size", bucket_size="0MB")


def test_output_exists(hf, tiny):
    out = hf.parent / "mcore"
    out.mkdir()
    (out / "keep").write_text("mine")
    with pytest.raises(FileExistsError, match=r"mcore already exists"):
        convert_hf_to_mcore(hf, out, progress=False)
    assert [p.name for p in out.iterdir()] == ["keep"]
    with pytest.raises(FileExistsError, match=r"already exists"):
        convert_mcore_to_hf(tiny[3], out, progress=False)


def test_interrupted_hf_to_mcore_leaves_nothing(hf, monkeypatch):
    calls = []
    real = h2m._produce

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 40:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C half-way
        return real(*args, **kwargs)

    monkeypatch.setattr(h2m, "_produce", failing)
    out = hf.parent / "mcore"
    with pytest.raises(KeyboardInterrupt):
        convert_hf_to_mcore(hf, out, bucket_size="64KB", progress=False)
    assert len(calls) == 40 and nothing_left(out)


# ----- mcore -> HF --------------------------------------------------------------------------------------
@pytest.fixture
def mcore(tiny, tmp_path) -> Path:
    return Path(shutil.copytree(tiny[3], tmp_path / "mcore"))


def _m2h_fails(mcore: Path, exc, match: str, **kwargs):
    out = mcore.parent / "hf_out"
    with pytest.raises(exc, match=match):
        convert_mcore_to_hf(mcore, out, progress=False, **kwargs)
    assert nothing_left(out)


def test_missing_checkpoint(tmp_path):
    _m2h_fails(tmp_path / "nowhere", FileNotFoundError, r"nowhere: no such checkpoint folder")
    (tmp_path / "empty").mkdir()
    _m2h_fails(tmp_path / "empty", FileNotFoundError, r"neither a torch_dist checkpoint .* nor a folder with "
               r"latest_checkpointed_iteration.txt")


def test_tracker_points_to_missing_iteration(mcore):
    (mcore / "latest_checkpointed_iteration.txt").write_text("20")
    _m2h_fails(mcore, FileNotFoundError, r"points to iter_0000020/, which is not a complete torch_dist checkpoint")
    (mcore / "latest_checkpointed_iteration.txt").write_text("best")
    _m2h_fails(mcore, ValueError, r"expected 'release' or an iteration number, found 'best'")


def test_checkpoint_of_another_model(mcore):
    bigger = tiny_config(num_hidden_layers=8, layer_types=("linear_attention",) * 7 + ("full_attention",))
    _m2h_fails(mcore, ValueError, r"model tensors are not in the checkpoint, e.g. \['decoder.layers.10",
               config=bigger)
    wider = tiny_config(moe_intermediate_size=48)
    _m2h_fails(mcore, ValueError, r"decoder.layers.1.mlp.experts.experts.linear_fc1.weight has global shape "
               r"\[8, 64, 64\], the config implies \[8, 96, 64\]", config=wider)


def test_no_config_beside_a_training_checkpoint(mcore):
    for name in ("qwen3_next_config.json", "config.json"):
        (mcore / name).unlink()
    _m2h_fails(mcore, FileNotFoundError, r"no qwen3_next_config.json or config.json beside the checkpoint; pass "
               r"the model's HF config.json with --config")


def test_damaged_data_file(mcore):
    victim = max((mcore / "release").glob("*.distcp"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:100])
    _m2h_fails(mcore, ValueError, r"cannot read .* \(damaged or truncated data file\?\)")


def test_interrupted_mcore_to_hf_leaves_nothing(mcore, monkeypatch):
    calls = []
    real = m2h.to_hf

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 30:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(m2h, "to_hf", failing)
    _m2h_fails(mcore, RuntimeError, "disk full", bucket_size="64KB")
