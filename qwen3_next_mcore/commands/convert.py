"""``qwen3-next-mcore convert``: HF <-> megatron-core checkpoints."""

from . import unavailable


def register(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(func=unavailable(name, "checkpoint conversion, issue #4"))
