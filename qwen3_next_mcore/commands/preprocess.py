"""``qwen3-next-mcore preprocess``: pretraining .bin/.idx and SFT idxmap data."""

from . import unavailable


def register(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(func=unavailable(name, "dataset builders, issue #5"))
