"""``qwen3-next-mcore demo``: the embedded end-to-end workflow on a tiny model (CPU, offline)."""


def register(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--workdir", default="runs/demo", help="where checkpoints and data go (default: runs/demo)")
    p.add_argument("--steps", type=int, default=30, help="pretraining steps (default: 30)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ..demo import run

    summary = run(args.workdir, args.steps)
    return 0 if summary["last_loss"] < summary["first_loss"] else 1
