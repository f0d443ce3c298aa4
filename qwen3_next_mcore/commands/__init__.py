"""Sub-commands of the ``qwen3-next-mcore`` CLI, one module each (see :mod:`qwen3_next_mcore.cli`)."""


def unavailable(name: str, issue: str):
    """A sub-command whose implementation has not landed yet: exits 2 with a message saying so."""

    def run(args) -> int:
        import sys

        print(f"qwen3-next-mcore {name}: not available in this version yet ({issue})", file=sys.stderr)
        return 2

    return run
