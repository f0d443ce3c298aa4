"""Pretraining preprocessing speed: ours vs a re-implementation of Megatron-LM's tools/preprocess_data.py.

Both tokenise the same JSONL (``c4_demo.jsonl`` repeated ``--repeat`` times) with the Qwen3 tokenizer,
append EOD, use the same number of worker processes and write with megatron-core's IndexedDatasetBuilder,
in this process, one after the other, ``--runs`` times each (the median is reported). The outputs must
be byte-identical (.bin and .idx), else no speed is reported and the exit status is 1.

The baseline follows Megatron-LM's default path as we read it: every worker builds megatron-core's
HuggingFace tokenizer in its pool initialiser; the main process builds one too (for the vocabulary size
that picks the dtype); ``Pool.imap(encode, lines, 32)`` (32 is the chunk size of current Megatron-LM;
releases up to 2023 used 25) sends raw lines to the workers; each worker parses one JSON line and calls
``tokenizer.tokenize(text)`` per document, appending EOD; the main process adds each document to
the builder in order.

Run from the repository root: ``.venv/bin/python -m benchmarks.preprocess_pretrain``.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"
NAME = "preprocess_pretrain"


# ---- the Megatron-LM-style baseline ---------------------------------------------------------------


class MegatronStyleEncoder:
    """One document per call, as Megatron-LM's ``Encoder.encode`` (no sentence splitting)."""

    def __init__(self, tokenizer_dir: str, json_key: str, append_eod: bool):
        self.tokenizer_dir, self.json_key, self.append_eod = tokenizer_dir, json_key, append_eod

    def initializer(self) -> None:
        # a class attribute, as in Megatron-LM: each worker keeps its own tokenizer
        MegatronStyleEncoder.tokenizer = build_megatron_tokenizer(self.tokenizer_dir)

    def encode(self, json_line: str):
        data = json.loads(json_line)
        ids = MegatronStyleEncoder.tokenizer.tokenize(data[self.json_key])
        lens = [len(ids)] if ids else []
        if ids and self.append_eod:
            ids.append(MegatronStyleEncoder.tokenizer.eod)
            lens[-1] += 1
        return ids, lens, len(json_line)


def build_megatron_tokenizer(tokenizer_dir: str):
    """megatron-core's HuggingFace tokenizer (what ``--tokenizer-type HuggingFaceTokenizer`` builds)."""
    from megatron.core.tokenizers import MegatronTokenizer

    return MegatronTokenizer.from_pretrained(
        tokenizer_path=tokenizer_dir, metadata_path={"library": "huggingface"}
    )


def megatron_style_preprocess(
    input_path: str,
    output_prefix: str,
    tokenizer_dir: str,
    workers: int,
    json_key: str = "text",
    append_eod: bool = True,
    chunksize: int = 32,
) -> dict:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    start = time.perf_counter()
    encoder = MegatronStyleEncoder(tokenizer_dir, json_key, append_eod)
    tokenizer = build_megatron_tokenizer(tokenizer_dir)
    prefix = f"{output_prefix}_{json_key}_document"
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(tokenizer.vocab_size))
    docs = tokens = 0
    with open(input_path, encoding="utf-8") as fin:
        pool = multiprocessing.Pool(workers, initializer=encoder.initializer)
        for ids, lens, _ in pool.imap(encoder.encode, fin, chunksize):
            builder.add_document(ids, lens)
            docs += 1
            tokens += len(ids)
        pool.close()
        pool.join()
    builder.finalize(prefix + ".idx")
    return dict(prefix=prefix, documents=docs, tokens=tokens, seconds=time.perf_counter() - start)


# ---- ours -----------------------------------------------------------------------------------------


def ours_preprocess(input_path: str, output_prefix: str, tokenizer_dir: str, workers: int) -> dict:
    from qwen3_next_mcore.data import preprocess_pretrain

    r = preprocess_pretrain(
        input_path, output_prefix, tokenizer=tokenizer_dir, append_eod=True, workers=workers, progress=False
    )
    return dict(prefix=r.prefix, documents=r.documents, tokens=r.tokens, seconds=r.seconds)


# ---- the run --------------------------------------------------------------------------------------


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return dict(
        cpu=cpu,
        cores=cores,
        platform=platform.platform(),
        python=platform.python_version(),
        transformers=version("transformers"),
        tokenizers=version("tokenizers"),
        megatron_core=version("megatron-core"),
    )


def same_files(a: str, b: str) -> bool:
    return all(filecmp.cmp(a + ext, b + ext, shallow=False) for ext in (".bin", ".idx"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", default=str(SHARED / "text" / "c4_demo.jsonl"))
    p.add_argument("--tokenizer", default=str(SHARED / "qwen3-tokenizer"))
    p.add_argument("--repeat", type=int, default=30, help="copies of the input concatenated")
    p.add_argument("--runs", type=int, default=3, help="timed runs of each (median reported)")
    p.add_argument("--workers", type=int, default=None, help="processes for both (default: all cores)")
    p.add_argument(
        "--baseline-chunksize",
        type=int,
        default=32,
        help="Pool.imap chunk size of the baseline (Megatron-LM: 32; releases up to 2023: 25)",
    )
    p.add_argument("--output-dir", default=str(RESULTS))
    args = p.parse_args(argv)

    info = machine()
    workers = args.workers or info["cores"]
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        data = Path(tmp) / "input.jsonl"
        text = Path(args.input).read_text(encoding="utf-8")
        data.write_text(text * args.repeat, encoding="utf-8")
        # warm up imports (megatron-core, transformers) outside the timings
        import megatron.core.datasets.indexed_dataset  # noqa: F401
        import transformers  # noqa: F401

        runs = {"megatron_lm_style": [], "ours": []}
        for i in range(args.runs):
            base = megatron_style_preprocess(
                str(data), f"{tmp}/base{i}", args.tokenizer, workers, chunksize=args.baseline_chunksize
            )
            ours = ours_preprocess(str(data), f"{tmp}/ours{i}", args.tokenizer, workers)
            identical = same_files(base["prefix"], ours["prefix"])
            runs["megatron_lm_style"].append(base)
            runs["ours"].append(ours)
            print(
                f"run {i + 1}: baseline {base['seconds']:.2f} s, ours {ours['seconds']:.2f} s, "
                f"identical={identical}",
                file=sys.stderr,
            )
            if not identical:
                print("outputs differ: no speed reported", file=sys.stderr)
                return 1

    rows = []
    for name, rs in runs.items():
        seconds = statistics.median(r["seconds"] for r in rs)
        rows.append(
            dict(
                implementation=name,
                documents=rs[0]["documents"],
                tokens=rs[0]["tokens"],
                seconds=round(seconds, 3),
                tokens_per_second=round(rs[0]["tokens"] / seconds),
                all_seconds=[round(r["seconds"], 3) for r in rs],
            )
        )
    ratio = rows[0]["seconds"] / rows[1]["seconds"]
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = dict(
        benchmark=NAME,
        machine=info,
        load_average_1min=[round(x, 2) if x is not None else None for x in (load_before, load_after)],
        workers=workers,
        repeat=args.repeat,
        runs=args.runs,
        baseline_chunksize=args.baseline_chunksize,
        append_eod=True,
        identical_bin_and_idx=True,
        rows=rows,
        speedup_ours_vs_baseline=round(ratio, 2),
    )
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{NAME}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"# {NAME}",
        "",
        (
            f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, "
            f"transformers {m['transformers']}, tokenizers {m['tokenizers']}, "
            f"megatron-core {m['megatron_core']}. Input: c4_demo.jsonl x {r['repeat']}, "
            f"EOD appended, {r['workers']} worker processes each (baseline imap chunk size "
            f"{r['baseline_chunksize']}); median of {r['runs']} runs (tokenizer loading "
            "included, imports excluded). Outputs byte-identical (.bin and .idx): "
            f"{r['identical_bin_and_idx']}. "
            f"ratio = baseline seconds / seconds. 1-minute load average before/after: "
            f"{r['load_average_1min']} (other jobs on the machine add noise to both columns alike)."
        ),
        "",
        "| implementation | cores | workers | docs | tokens | seconds | tokens/s | ratio |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    base = r["rows"][0]["seconds"]
    for row in r["rows"]:
        lines.append(
            f"| {row['implementation']} | {m['cores']} | {r['workers']} | {row['documents']} | "
            f"{row['tokens']} | {row['seconds']:.2f} | {row['tokens_per_second']:,} | "
            f"{base / row['seconds']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
