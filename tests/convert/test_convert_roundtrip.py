"""HF -> megatron-core -> HF, bit for bit, through the layouts megatron-core reshards to.

The converted checkpoint is loaded by models built at TP/PP/EP 1 and 2 (2-process gloo), their logits
are compared with transformers', each model is saved again by megatron-core's checkpoint format at its
own layout (as a training run would, optimizer-like entries included), and that checkpoint is exported
to HF and compared with the original tensors, ``mtp.*`` included.
"""

from __future__ import annotations

import json

import pytest
import torch
from convert_helpers import (
    assert_same_tensors,
    convert_on_each_rank,
    convert_with_failing_rank,
    fuse_experts_on_disk,
    hf_tensors,
    load_and_resave,
    load_error,
    plain_megatron_load,
    rel,
    sharded_keys,
    tiny_config,
)

from qwen3_next_mcore.convert import convert_hf_to_mcore, convert_mcore_to_hf, mapping
from qwen3_next_mcore.convert.dcp_io import McoreCheckpointReader
from qwen3_next_mcore.testing.distributed import run_distributed
from qwen3_next_mcore.testing.tiny_hf import make_hf_checkpoint

TOL = 1e-5  # fp32 logits vs transformers (see tests/model/test_parity.py)


def _ids(cfg, seq=19, seed=0):
    return torch.randint(0, cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(seed))


def test_written_keys_are_the_models_at_every_layout(tiny):
    """The checkpoint holds exactly the model's tensors (same keys and global shapes at TP/EP/PP 1 and 2)
    and every ShardedObject of both expert implementations."""
    cfg = tiny[0]
    reader = McoreCheckpointReader(tiny[3] / "release")
    stored = {k: tuple(v.size) for k, v in reader.tensors.items()}
    objects = {k for k in reader.metadata.state_dict_metadata if k not in reader.tensors}
    assert stored == mapping.mcore_tensor_shapes(cfg)
    seen = set()
    for experts in ("grouped", "sequential"):
        tensors, objs = run_distributed(sharded_keys, 1, args=(cfg.model_dump_json(), {}, experts))[0]
        assert tensors == stored
        seen |= objs
    for layout in (dict(tensor_parallel=2), dict(expert_parallel=2), dict(pipeline_parallel=2)):
        tensors, objs = {}, set()
        for t, o in run_distributed(sharded_keys, 2, args=(cfg.model_dump_json(), layout)):
            tensors.update(t)
            objs |= o
        assert tensors == stored, layout
        assert objs <= seen, layout
    assert objects == seen | {"common_state/shard_0_1"}


def test_tied_no_mtp_keys(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True, mtp_num_layers=0)
    tensors, objs = run_distributed(sharded_keys, 1, args=(cfg.model_dump_json(), {}, "sequential"))[0]
    assert tensors == mapping.mcore_tensor_shapes(cfg)
    assert objs == set(mapping.mcore_object_keys(cfg))


def test_round_trip_is_bit_exact_and_loads_in_transformers(tiny, tmp_path):
    import transformers

    cfg, hf_dir, hf, mcore = tiny
    report = convert_mcore_to_hf(mcore, tmp_path / "hf", max_shard_size="200KB", progress=False)
    out = hf_tensors(tmp_path / "hf")
    assert_same_tensors(out, hf_tensors(hf_dir))
    assert any(k.startswith("mtp.") for k in out) and report.tensors == len(out)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(out) and len(set(index["weight_map"].values())) > 1
    assert (tmp_path / "hf" / "generation_config.json").is_file()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = _ids(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, hf(ids).logits)


@pytest.mark.parametrize("layout, experts", [
    ({"tensor_parallel": 2}, "grouped"),
    ({"pipeline_parallel": 2}, "grouped"),
    ({"expert_parallel": 2}, "grouped"),
    ({"tensor_parallel": 2, "expert_parallel": 2}, "grouped"),
    ({"tensor_parallel": 2, "expert_tensor_parallel": 2}, "grouped"),
    ({"tensor_parallel": 2, "expert_tensor_parallel": 2}, "sequential"),
], ids=["tp2", "pp2", "ep2", "tp2-ep2", "tp2-etp2", "tp2-etp2-seq"])
def test_layouts_load_match_transformers_and_export_bit_exact(tiny, tmp_path, layout, experts):
    cfg, hf_dir, hf, mcore = tiny
    ids = _ids(cfg, seed=1)
    with torch.no_grad():
        ref = hf(ids).logits
    res = run_distributed(load_and_resave, 2, args=(cfg.model_dump_json(), str(mcore), layout,
                                                    str(tmp_path / "trained"), ids, experts))
    for r in res:
        assert rel(r["logits"].reshape(ref.shape), ref) <= TOL
    # a training save folder carries no config: the exporter is told which model it is (and takes the
    # tokenizer files from beside that config)
    convert_mcore_to_hf(tmp_path / "trained", tmp_path / "hf", config=hf_dir / "config.json", progress=False)
    assert_same_tensors(hf_tensors(tmp_path / "hf"), hf_tensors(hf_dir))
    assert (tmp_path / "hf" / "generation_config.json").is_file()


def test_single_process_with_sequential_experts(tiny, tmp_path):
    """megatron's SequentialMLP (per-expert modules and extra states) loads the same checkpoint."""
    cfg, hf_dir, hf, mcore = tiny
    ids = _ids(cfg, seed=2)
    with torch.no_grad():
        ref = hf(ids).logits
    (res,) = run_distributed(load_and_resave, 1, args=(cfg.model_dump_json(), str(mcore), {},
                                                        str(tmp_path / "trained"), ids, "sequential"))
    assert rel(res["logits"].reshape(ref.shape), ref) <= TOL
    convert_mcore_to_hf(tmp_path / "trained", tmp_path / "hf", config=cfg, progress=False)
    assert_same_tensors(hf_tensors(tmp_path / "hf"), hf_tensors(hf_dir))


def test_megatron_reads_the_checkpoint_as_its_own(tiny):
    from megatron.core import dist_checkpointing

    cfg, _, _, mcore = tiny
    assert (mcore / "latest_checkpointed_iteration.txt").read_text() == "release"
    release = str(mcore / "release")
    assert dist_checkpointing.check_is_distributed_checkpoint(release)
    common = dist_checkpointing.load_common_state_dict(release)
    assert common["iteration"] == 0 and common["checkpoint_version"] == 3.0
    assert common["args"].num_layers == 2 * cfg.num_hidden_layers and common["args"].tensor_model_parallel_size == 1
    meta = dist_checkpointing.load_tensors_metadata(release)
    assert {k: tuple(v.global_shape) for k, v in meta.items()} == mapping.mcore_tensor_shapes(cfg)


def test_bf16_keeps_dtypes_and_dtype_option_round_trips(tmp_path):
    cfg = tiny_config()
    make_hf_checkpoint(cfg, tmp_path / "hf", seed=5, dtype=torch.bfloat16)
    original = hf_tensors(tmp_path / "hf")
    convert_hf_to_mcore(tmp_path / "hf", tmp_path / "m16", progress=False)
    convert_mcore_to_hf(tmp_path / "m16", tmp_path / "back16", progress=False)
    assert_same_tensors(hf_tensors(tmp_path / "back16"), original)
    convert_hf_to_mcore(tmp_path / "hf", tmp_path / "m32", dtype="fp32", progress=False)
    assert {v.properties.dtype for v in McoreCheckpointReader(tmp_path / "m32" / "release").tensors.values()} == {
        torch.float32}
    convert_mcore_to_hf(tmp_path / "m32", tmp_path / "back32", dtype="bf16", progress=False)
    assert_same_tensors(hf_tensors(tmp_path / "back32"), original)
    assert json.loads((tmp_path / "back32" / "config.json").read_text())["dtype"] == "bfloat16"


def test_fused_expert_input_converts_the_same(tiny, tmp_path):
    cfg, hf_dir, _, _ = tiny
    fuse_experts_on_disk(hf_dir, tmp_path / "fused", cfg.num_experts)
    convert_hf_to_mcore(tmp_path / "fused", tmp_path / "mcore", progress=False)
    convert_mcore_to_hf(tmp_path / "mcore", tmp_path / "hf", progress=False)
    assert_same_tensors(hf_tensors(tmp_path / "hf"), hf_tensors(hf_dir))  # per-expert names on disk


def test_writing_from_several_ranks(tiny, tmp_path):
    """Under torchrun every rank writes a share of the buckets; the result is the same checkpoint."""
    _, hf_dir, _, mcore = tiny
    out = tmp_path / "mcore"
    reports = run_distributed(convert_on_each_rank, 2, args=(str(hf_dir), str(out), {"bucket_size": "64KB"}))
    assert reports[0] == reports[1]
    files = {p.name for p in (out / "release").glob("*.distcp")}
    assert len(files) > 2
    ours, single = McoreCheckpointReader(out / "release"), McoreCheckpointReader(mcore / "release")
    assert {k: v.size for k, v in ours.tensors.items()} == {k: v.size for k, v in single.tensors.items()}
    for key, md in single.tensors.items():
        region = [(key, (0,) * len(md.size), tuple(md.size))]
        assert torch.equal(ours.read(region)[0], single.read(region)[0]), key
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("layout, experts, nproc", [({}, "sequential", 1), (dict(tensor_parallel=2, expert_parallel=2),
                                                                             "grouped", 2)], ids=["seq", "tp2-ep2"])
def test_plain_megatron_load(tiny, layout, experts, nproc):
    cfg, hf_dir, _, mcore = tiny
    res = run_distributed(plain_megatron_load, nproc, args=(cfg.model_dump_json(), str(mcore), str(hf_dir), layout,
                                                            experts))
    assert res == [[]] * nproc


def test_a_failing_rank_fails_every_rank_and_leaves_nothing(tiny, tmp_path):
    out = tmp_path / "mcore"
    errors = run_distributed(convert_with_failing_rank, 2, args=(str(tiny[1]), str(out), 1))
    assert errors == ["RuntimeError: rank 1 failed: ValueError: boom", "ValueError: boom"]
    assert not out.exists() and not list(tmp_path.glob(".mcore.tmp-*"))


def test_tied_embeddings_without_mtp_round_trip(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True, mtp_num_layers=0)
    make_hf_checkpoint(cfg, tmp_path / "hf", seed=7)
    original = hf_tensors(tmp_path / "hf")
    assert "lm_head.weight" not in original and not any(k.startswith("mtp.") for k in original)
    convert_hf_to_mcore(tmp_path / "hf", tmp_path / "m", progress=False)
    convert_mcore_to_hf(tmp_path / "m", tmp_path / "back", progress=False)
    assert_same_tensors(hf_tensors(tmp_path / "back"), original)


def test_load_refuses_a_checkpoint_missing_weights(tmp_path):
    """A checkpoint without the MTP layer does not load into a model with one."""
    make_hf_checkpoint(tiny_config(mtp_num_layers=0), tmp_path / "hf", seed=9)
    convert_hf_to_mcore(tmp_path / "hf", tmp_path / "m", progress=False)
    (err,) = run_distributed(load_error, 1, args=(tiny_config().model_dump_json(), str(tmp_path / "m")))
    assert err is not None and "weights of the model are not in the checkpoint, e.g. ['mtp.layers.0." in err
