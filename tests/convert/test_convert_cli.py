"""``qwen3-next-mcore convert`` from the command line: both directions, and errors as exit status 2."""

from __future__ import annotations

import shutil
from pathlib import Path

from convert_helpers import assert_same_tensors, hf_tensors

from qwen3_next_mcore.cli import main


def test_cli_round_trip(tiny, tmp_path, capsys):
    hf_dir = Path(shutil.copytree(tiny[1], tmp_path / "hf"))
    tokenizer = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": "{}", "merges.txt": "a b\n"}
    for name, text in tokenizer.items():
        (hf_dir / name).write_text(text)
    assert main(["convert", "hf-to-mcore", "--hf-dir", str(hf_dir), "--output", str(tmp_path / "m"),
                 "--tensor-parallel", "2", "--expert-parallel", "2", "--dtype", "fp32", "--no-progress"]) == 0
    assert "hf-to-mcore: wrote" in capsys.readouterr().out
    from megatron.core import dist_checkpointing

    args = dist_checkpointing.load_common_state_dict(str(tmp_path / "m" / "release"))["args"]
    assert (args.tensor_model_parallel_size, args.expert_model_parallel_size) == (2, 2)
    assert main(["convert", "mcore-to-hf", "--mcore-dir", str(tmp_path / "m"), "--output", str(tmp_path / "h"),
                 "--max-shard-size", "100KB", "--no-progress", "--no-sync"]) == 0
    assert "mcore-to-hf: wrote" in capsys.readouterr().out
    assert_same_tensors(hf_tensors(tmp_path / "h"), hf_tensors(hf_dir))
    for name, text in tokenizer.items():  # carried along both ways
        assert (tmp_path / "m" / name).read_text() == text and (tmp_path / "h" / name).read_text() == text


def test_cli_errors_exit_2(tiny, tmp_path, capsys):
    _, hf_dir, _, mcore = tiny
    assert main(["convert", "hf-to-mcore", "--hf-dir", str(hf_dir), "--output", str(tmp_path / "m"),
                 "--tensor-parallel", "3"]) == 2
    err = capsys.readouterr().err
    assert "convert: error: Qwen3NextConfig.num_attention_heads=4 is not divisible by tensor_parallel=3" in err
    assert not (tmp_path / "m").exists()
    assert main(["convert", "mcore-to-hf", "--mcore-dir", str(mcore), "--output", str(hf_dir)]) == 2
    assert "already exists" in capsys.readouterr().err
