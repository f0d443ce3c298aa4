"""Side-by-side benchmarks of our kernels and layers against transformers and megatron-core.

``run(["gdn-layer", ...])`` (or ``qwen3-next-mcore bench gdn-layer ...``) checks each candidate against a
float32 reference, times forward and forward+backward, and writes JSON plus a markdown table. Cases and
floors: :mod:`qwen3_next_mcore.bench.cases`, :mod:`qwen3_next_mcore.bench.train_step`; docs/performance.md.
"""

from .runner import CASES, run

__all__ = ["CASES", "run"]
