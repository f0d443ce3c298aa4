"""Sub-commands of the ``qwen3-next-mcore`` CLI, one module each (see :mod:`qwen3_next_mcore.cli`)."""
