"""Benchmarks, each a module runnable as ``python -m benchmarks.<name>`` from the repository root.

Results go to ``benchmarks/results/<name>.json`` and a markdown table ``<name>.md``.
"""
