"""The ``qwen3-next-mcore`` command line: one sub-command per workflow step.

Each sub-command lives in its own module exposing ``register(subparsers)``; heavy imports (torch,
megatron-core) happen only inside the command that needs them, so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (name, module, one-line help); order is the order of ``--help``
COMMANDS: list[tuple[str, str, str]] = [
    ("demo", "qwen3_next_mcore.commands.demo", "run the embedded end-to-end workflow on a tiny model (CPU ok)"),
    ("config", "qwen3_next_mcore.commands.config", "show presets, read/write HF config.json"),
    ("convert", "qwen3_next_mcore.commands.convert", "convert checkpoints HF <-> megatron-core"),
    ("preprocess", "qwen3_next_mcore.commands.preprocess", "build pretraining .bin/.idx and SFT idxmap data"),
    ("train", "qwen3_next_mcore.commands.train", "continue-pretrain or fine-tune (SFT)"),
    ("bench", "qwen3_next_mcore.commands.bench", "run kernel, layer and step benchmarks"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen3-next-mcore",
        description="Train Qwen3-Next on Megatron-Core: convert, preprocess, train, benchmark.",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module, help_text in COMMANDS:
        importlib.import_module(module).register(sub, name, help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"qwen3-next-mcore {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
