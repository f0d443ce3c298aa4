"""Helpers for tests and examples: multi-process launches, tiny HF checkpoints, numeric comparisons."""
