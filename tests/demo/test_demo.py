"""The README's main job (``qwen3-next-mcore demo``), shortened: the whole workflow runs end to end offline
(HF -> megatron-core -> pretraining -> SFT -> HF, logits checked against transformers at both ends)."""

import argparse
import json
import math

import pytest

from qwen3_next_mcore.testing.distributed import run_distributed

TRACKER = "latest_checkpointed_iteration.txt"


def _demo(rank, workdir):
    from qwen3_next_mcore.demo import run

    return run(workdir, steps=4, sft_steps=3)


def test_demo_runs_end_to_end(tmp_path):
    # a subprocess: megatron-core's global state (parallel groups, MoE/MTP loss trackers) stays out of pytest
    summary = run_distributed(_demo, 1, args=(str(tmp_path),))[0]
    assert summary["ok"], summary["problems"]

    # 1-2: inputs
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "corpus_text_document.idx").is_file()
    rows = json.loads((tmp_path / "sft.json").read_text())
    assert all(r["instruction"] and r["output"] for r in rows) and any(r.get("input") for r in rows)
    # 3: the HF checkpoint in our model matches transformers
    assert summary["parity_rel_error"] < 1e-5
    # 4: the converted checkpoint
    mcore = tmp_path / "mcore"
    assert (mcore / TRACKER).read_text().strip() == "release"
    assert (mcore / "release" / "metadata.json").is_file() and (mcore / "release" / ".metadata").is_file()
    # 5: pretraining from it: the loss falls; saved at iteration 4
    pre = summary["pretrain_losses"]
    assert len(pre) == 4
    assert (pre[0], pre[-1]) == (summary["pretrain_first_loss"], summary["pretrain_last_loss"])
    assert pre[-1] < pre[0] - 0.5, pre
    assert (tmp_path / "pretrain" / TRACKER).read_text().strip() == "4"
    # 6: SFT from the pretraining checkpoint (--finetune: iterations restart at 1..3)
    tuned = summary["sft_losses"]
    assert len(tuned) == 3 and all(math.isfinite(x) for x in tuned)
    assert tuned[-1] < tuned[0], tuned
    assert (tmp_path / "sft" / TRACKER).read_text().strip() == "3"
    # 7: the final export loads in transformers and its logits equal ours on the SFT checkpoint
    final = tmp_path / "hf_final"
    assert (final / "config.json").is_file() and list(final.glob("*.safetensors"))
    assert (final / "tokenizer.json").is_file()
    assert summary["export_rel_error"] < 1e-5
    assert summary["logits_moved"] > 0.1  # the export is the trained model, not the initial one
    assert summary["paths"]["hf_final"] == str(final)
    # every output was renamed into place
    assert not list(tmp_path.glob("*.tmp"))


def test_outputs_are_replaced_only_when_complete(tmp_path):
    from qwen3_next_mcore.demo import _redo

    out = tmp_path / "step"
    _redo(out, lambda tmp: (tmp.mkdir(), (tmp / "a").write_text("1")))
    # a re-run replaces the previous output
    _redo(out, lambda tmp: (tmp.mkdir(), (tmp / "a").write_text("2")))
    assert (out / "a").read_text() == "2"

    def fail(tmp):
        tmp.mkdir()
        raise RuntimeError("step failed")

    with pytest.raises(RuntimeError):
        _redo(out, fail)
    assert (out / "a").read_text() == "2"  # the previous output survives a failed step


@pytest.mark.parametrize("ok", [True, False])
def test_cli_exit_status(monkeypatch, ok):
    from qwen3_next_mcore import demo
    from qwen3_next_mcore.commands.demo import _run

    summary = {"ok": ok, "problems": [] if ok else ["the SFT loss did not fall"]}
    monkeypatch.setattr(demo, "run", lambda workdir, steps, sft_steps: summary)
    assert _run(argparse.Namespace(workdir="w", steps=1, sft_steps=1)) == (0 if ok else 1)
