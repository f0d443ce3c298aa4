"""The README's main job (``qwen3-next-mcore demo``), shortened: the workflow runs end to end offline."""

from qwen3_next_mcore.testing.distributed import run_distributed


def _demo(rank, workdir):
    from qwen3_next_mcore.demo import run

    return run(workdir, steps=4)


def test_demo_runs_end_to_end(tmp_path):
    summary = run_distributed(_demo, 1, args=(str(tmp_path),))[0]
    assert summary["parity_rel_error"] < 1e-5
    assert summary["last_loss"] < summary["first_loss"] - 0.5
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "corpus_text_document.idx").is_file()
