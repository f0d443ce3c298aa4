"""Same losses at every parallel layout: train N steps from the same HF weights and data at one process
and at TP=2 / EP=2 / PP=2 (torchrun, NCCL on GPUs, gloo on CPU), then compare the per-step LM losses.

    python scripts/parallel_losses.py --out runs/parallel --preset proxy --experts 16 --steps 20 --bf16 \\
        --layouts tp2 ep2 [pp2 ...] --data-path /tmp/gd/data/c4_text_document --tokenizer /tmp/gd/tok

Writes OUT/losses.json and prints a table; exits 1 when a layout differs from the one-process run by
more than --tolerance (relative, any step). On a CPU: --preset tiny --seq-length 64 (fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

LAYOUTS = {
    "tp1": [],
    "tp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    "ep2": ["--expert-model-parallel-size", "2"],
    "pp2": ["--pipeline-model-parallel-size", "2"],
    "tp2ep2": ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2", "--sequence-parallel"],
}
SIZES = {"tp1": 1, "tp2": 2, "ep2": 2, "pp2": 2, "tp2ep2": 2}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="proxy")
    p.add_argument("--experts", type=int, help="override the preset's expert count (a faster check)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--global-batch-size", type=int, default=4)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--layouts", nargs="+", default=["tp2", "ep2"], choices=sorted(LAYOUTS))
    p.add_argument("--data-path", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--hf-dir", help="where the random HF checkpoint goes (default OUT/hf; made once)")
    p.add_argument("--tolerance", type=float, default=5e-3,
                   help="max relative loss difference per step (bf16; docs/numerics.md)")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    hf = Path(a.hf_dir) if a.hf_dir else out / "hf"
    if not (hf / "config.json").is_file():
        from qwen3_next_mcore.config import get_preset
        from qwen3_next_mcore.testing.tiny_hf import make_hf_checkpoint

        overrides = {"num_experts": a.experts} if a.experts else {}
        if a.experts:
            overrides["num_experts_per_tok"] = min(get_preset(a.preset).num_experts_per_tok, a.experts)
        make_hf_checkpoint(get_preset(a.preset, **overrides), hf, seed=0)  # on CPU: its generators are CPU ones
    losses = {}
    for name in ["tp1", *a.layouts]:
        log = out / f"{name}.jsonl"
        log.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(SIZES[name]),
               "-m", "qwen3_next_mcore", "train", "--hf-dir", str(hf), "--tokenizer", a.tokenizer,
               "--data-path", a.data_path, "--split", "100,0,0", "--seq-length", str(a.seq_length),
               "--micro-batch-size", "1", "--global-batch-size", str(a.global_batch_size),
               "--train-iters", str(a.steps), "--lr", "1e-4", "--min-lr", "1e-5", "--lr-warmup-iters", "2",
               "--seed", "1234", "--log-json", str(log), *(["--bf16"] if a.bf16 else []), *LAYOUTS[name]]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        losses[name] = [json.loads(line)["lm_loss"] for line in log.read_text().splitlines()]
    ref = losses["tp1"]
    worst = {n: max(abs(x - r) / abs(r) for x, r in zip(v, ref, strict=True)) for n, v in losses.items()}
    (out / "losses.json").write_text(json.dumps({"losses": losses, "max_rel_diff": worst,
                                                 "tolerance": a.tolerance}, indent=1))
    print("step | " + " | ".join(losses))
    for i in range(len(ref)):
        print(f"{i + 1} | " + " | ".join(f"{v[i]:.5f}" for v in losses.values()))
    print("max relative difference vs tp1: " + ", ".join(f"{n} {d:.2e}" for n, d in worst.items()))
    return 0 if all(d <= a.tolerance for d in worst.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
