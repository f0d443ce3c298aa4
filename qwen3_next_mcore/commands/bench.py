"""``qwen3-next-mcore bench``: side-by-side kernel, layer and training-step benchmarks."""


def register(sub, name: str, help_text: str) -> None:
    from ..bench.runner import CASES

    p = sub.add_parser(name, help=help_text, description=help_text + ". Every candidate is checked against a "
                       "float32 reference first; a wrong one is reported and not timed.")
    p.add_argument("cases", nargs="*", metavar="CASE", help=f"some of: {', '.join(CASES)} (default: all)")
    p.add_argument("--out", default="benchmarks/results", help="writes bench_SIZE.json/.md here")
    p.add_argument("--size", choices=["full", "small"], default="full",
                   help="full: the 80B widths in bf16 (a GPU); small: toy widths in fp32 (CPU check)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--batch", type=int, help="batch size (default 4; train-step 2)")
    p.add_argument("--seq", type=int, help="sequence length (default 4096)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--profile", action="store_true",
                   help="also write a torch.profiler table per timed candidate to OUT/profile/")
    p.add_argument("--train-step-modes", nargs="+", choices=["none", "selective", "full", "offload", "padded"],
                   help="our candidates in the train-step case: memory modes, or 'padded' (no recompute, the padded "
                        "experts layout) (default: none selective full offload; transformers always runs)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ..bench.runner import CASES, run

    report = run(args.cases or list(CASES), out_dir=args.out, size=args.size, warmup=args.warmup, reps=args.reps,
                 batch=args.batch, seq=args.seq, device=args.device, profile=args.profile,
                 train_step_modes=args.train_step_modes)
    from ..bench.runner import markdown

    print(markdown(report))
    return 0
