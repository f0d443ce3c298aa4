"""``python -m benchmarks.run [CASE ...] [--size full|small] ...``: the same as ``qwen3-next-mcore bench``
(qwen3_next_mcore/bench; results in benchmarks/results/bench_SIZE.{json,md}; docs/performance.md)."""

import argparse
import logging
import sys

from qwen3_next_mcore.commands import bench

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run")
    bench.register(parser.add_subparsers(dest="command", required=True), "bench", "Benchmarks")
    args = parser.parse_args(["bench", *sys.argv[1:]])
    sys.exit(args.func(args))
