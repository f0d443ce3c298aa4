import json

import pytest
import transformers

from qwen3_next_mcore.config import ParallelConfig, Qwen3NextConfig, get_preset, preset_names

# config.json of Qwen/Qwen3-Next-80B-A3B-Instruct (architecture keys as released)
HF_80B = {
    "architectures": ["Qwen3NextForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "decoder_sparse_step": 1,
    "eos_token_id": 151645,
    "full_attention_interval": 4,
    "head_dim": 256,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 128,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "linear_value_head_dim": 128,
    "max_position_embeddings": 262144,
    "mlp_only_layers": [],
    "model_type": "qwen3_next",
    "moe_intermediate_size": 512,
    "norm_topk_prob": True,
    "num_attention_heads": 16,
    "num_experts": 512,
    "num_experts_per_tok": 10,
    "num_hidden_layers": 48,
    "num_key_value_heads": 2,
    "output_router_logits": False,
    "partial_rotary_factor": 0.25,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000000,
    "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 512,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.57.0.dev0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
# informational keys that to_hf does not reproduce (no architecture meaning)
NOT_REPRODUCED = {"attention_dropout", "output_router_logits", "rope_scaling", "torch_dtype",
                  "transformers_version", "use_cache", "use_sliding_window"}


def test_80b_round_trip_and_transformers_accepts():
    cfg = Qwen3NextConfig.from_hf(HF_80B)
    assert cfg == get_preset("qwen3-next-80b-a3b")
    out = cfg.to_hf()
    for key, value in HF_80B.items():
        if key not in NOT_REPRODUCED:
            assert out[key] == value, key
    assert Qwen3NextConfig.from_hf(out) == cfg
    hf = transformers.Qwen3NextConfig(**out)
    assert hf.layer_types == list(cfg.layer_types)
    assert hf.num_experts == 512 and hf.head_dim == 256
    assert hf.rope_parameters["rope_theta"] == 10_000_000
    assert hf.rope_parameters["partial_rotary_factor"] == 0.25
    assert cfg.num_linear_layers == 36 and cfg.num_full_layers == 12
    assert [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"][:3] == [3, 7, 11]


def test_from_hf_file_and_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HF_80B))
    assert Qwen3NextConfig.from_hf(tmp_path) == Qwen3NextConfig.from_hf(tmp_path / "config.json")


def test_explicit_layer_types_and_rope_parameters_form():
    d = dict(HF_80B)
    del d["full_attention_interval"], d["rope_theta"], d["partial_rotary_factor"]
    d["num_hidden_layers"] = 3
    d["layer_types"] = ["full_attention", "linear_attention", "full_attention"]
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e6, "partial_rotary_factor": 0.5}
    cfg = Qwen3NextConfig.from_hf(d)
    assert cfg.layer_types == ("full_attention", "linear_attention", "full_attention")
    assert cfg.rope_theta == 5e6 and cfg.partial_rotary_factor == 0.5 and cfg.rotary_dim == 128
    assert cfg.full_attention_interval is None
    hf = transformers.Qwen3NextConfig(**cfg.to_hf())
    assert hf.layer_types == list(cfg.layer_types)
    assert Qwen3NextConfig.from_hf(cfg.to_hf()) == cfg


def test_transformers_own_config_reads_back():
    hf = transformers.Qwen3NextConfig(num_hidden_layers=8, hidden_size=128, full_attention_interval=2)
    cfg = Qwen3NextConfig.from_hf(hf.to_dict())
    assert cfg.layer_types == tuple(hf.layer_types)
    assert cfg.hidden_size == 128


def test_mtp_count_key():
    assert Qwen3NextConfig.from_hf({**HF_80B, "num_nextn_predict_layers": 2}).mtp_num_layers == 2
    assert Qwen3NextConfig.from_hf(HF_80B).mtp_num_layers == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_key_value_heads=3), "Qwen3NextConfig.num_key_value_heads=3: must divide num_attention_heads=16"),
        (dict(linear_num_value_heads=24), "linear_num_value_heads=24: must be a multiple of linear_num_key_heads=16"),
        (dict(num_experts_per_tok=600), "num_experts_per_tok=600: must be <= num_experts=512"),
        (dict(partial_rotary_factor=0.3), "partial_rotary_factor=0.3"),
        (dict(num_hidden_layers=5), "layer_types"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(mtp_num_layers=-1), "mtp_num_layers=-1"),
        (dict(bogus=1), "bogus"),
    ],
)
def test_bad_values_name_field_and_value(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Qwen3NextConfig(**overrides)


def test_config_is_frozen():
    cfg = get_preset("tiny")
    with pytest.raises(Exception):
        cfg.hidden_size = 3


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"model_type": "llama"}, "model_type='llama', expected 'qwen3_next'"),
        ({"mlp_only_layers": [0]}, "mlp_only_layers=\\[0\\]: dense MLP layers are not supported"),
        ({"some_new_key": 3}, "unknown key 'some_new_key'"),
        ({"num_attention_heads": 15}, "num_attention_heads|num_key_value_heads"),
        ({"layer_types": ["full_attention"] * 48}, "layer_types disagrees with full_attention_interval=4"),
    ],
)
def test_from_hf_errors(patch, message):
    with pytest.raises(ValueError, match=message):
        Qwen3NextConfig.from_hf({**HF_80B, **patch})


def test_from_hf_missing_and_broken_file(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        Qwen3NextConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        Qwen3NextConfig.from_hf(tmp_path)


def test_presets():
    assert set(preset_names()) >= {"qwen3-next-80b-a3b", "tiny", "proxy"}
    tiny = get_preset("tiny")
    assert set(tiny.layer_types) == {"linear_attention", "full_attention"} and tiny.mtp_num_layers == 1
    proxy = get_preset("proxy")
    assert proxy.num_hidden_layers == 4 and proxy.num_experts == 64 and proxy.num_experts_per_tok == 10
    assert proxy.layer_types.count("linear_attention") == 3 and proxy.hidden_size == 2048
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        get_preset("nope")


@pytest.mark.parametrize(
    "layout, message",
    [
        (dict(tensor_parallel=3), "num_attention_heads=16 is not divisible by tensor_parallel=3"),
        (dict(tensor_parallel=4), "num_key_value_heads=2 is not divisible by tensor_parallel=4"),
        (dict(expert_parallel=3), "num_experts=512 is not divisible by expert_parallel=3"),
        (dict(pipeline_parallel=5), "num_hidden_layers=48 is not divisible by pipeline_parallel=5"),
        (dict(sequence_parallel=True), "sequence_parallel=True needs tensor_parallel > 1"),
    ],
)
def test_parallel_checks(layout, message):
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**layout).check(get_preset("qwen3-next-80b-a3b"))


def test_transformer_config_translation():
    import torch

    from qwen3_next_mcore.config import to_transformer_config

    cfg = get_preset("qwen3-next-80b-a3b")
    tc = to_transformer_config(cfg, ParallelConfig(tensor_parallel=2, expert_parallel=8), params_dtype=torch.bfloat16)
    assert tc.num_layers == 96 and tc.num_query_groups == 2 and tc.kv_channels == 256
    assert tc.num_moe_experts == 512 and tc.moe_router_topk == 10 and tc.moe_shared_expert_gate
    assert tc.linear_num_value_heads == 32 and tc.mtp_num_layers == 1 and tc.bf16
    assert tc.tensor_model_parallel_size == 2 and tc.expert_model_parallel_size == 8
    with pytest.raises(ValueError, match="'no_such_field' is not a TransformerConfig field"):
        to_transformer_config(cfg, no_such_field=1)
    with pytest.raises(ValueError, match="tensor_parallel=3"):
        to_transformer_config(cfg, ParallelConfig(tensor_parallel=3))
