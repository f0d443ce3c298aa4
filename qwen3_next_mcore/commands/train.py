"""``qwen3-next-mcore train``: the reference training loop."""

from . import unavailable


def register(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(func=unavailable(name, "training loop, issue #6"))
