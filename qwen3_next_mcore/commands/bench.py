"""``qwen3-next-mcore bench``: benchmarks."""

from . import unavailable


def register(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(func=unavailable(name, "benchmarks, issue #7"))
