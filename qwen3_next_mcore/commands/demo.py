"""``qwen3-next-mcore demo``: the embedded end-to-end workflow on a tiny model (CPU, offline).

HF checkpoint -> megatron-core checkpoint -> continued pretraining -> SFT -> HF checkpoint, with logits
checked against transformers at both ends. Exit status 0 when both losses fell and both logits checks
hold, 1 otherwise.
"""


def register(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=__doc__)
    p.add_argument("--workdir", default="runs/demo",
                   help="where checkpoints and data go; a re-run reuses the inputs and redoes the rest "
                        "(default: runs/demo)")
    p.add_argument("--steps", type=int, default=30, help="pretraining steps (default: 30)")
    p.add_argument("--sft-steps", type=int, default=12, help="SFT steps (default: 12)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import sys

    from ..demo import run

    summary = run(args.workdir, args.steps, args.sft_steps)
    if not summary["ok"]:
        print("qwen3-next-mcore demo: failed: " + "; ".join(summary["problems"]), file=sys.stderr)
        return 1
    return 0
