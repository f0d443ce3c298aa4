"""HF -> megatron-core conversion speed and memory, beside a plain read of the same files.

Writes a synthetic bf16 HF checkpoint with the 80B model's layer widths (hidden 2048, 16/2 attention
heads of 256, GDN 16/32 heads of 128, expert width 512, vocabulary 151936), one GDN and one attention
layer plus the MTP layer, and ``--experts`` routed experts per layer (the real model has 512; 128 keep
the files at about 3.6 GB), then measures, each in a fresh subprocess with the input files evicted from
the page cache first (``posix_fadvise(DONTNEED)``, after a ``sync`` of earlier runs' output), so every
run but ``read-warm`` reads from disk, with the same cache state:

- ``read``: every tensor read once with safetensors (``get_tensor`` + ``clone``: the bytes in memory);
  the issue's reference ("a plain sequential read of the same files");
- ``read-warm``: the same with the files already in the page cache (only the CPU cost of reading);
- ``copy``: every file copied to the same disk (``shutil.copyfile``: an in-kernel copy) and fsynced:
  the I/O any durable converter must do, so the physical bound of a conversion;
- ``copy-nosync``: the same without the fsync (the kernel writes the output back afterwards);
- ``convert``: ``convert_hf_to_mcore`` with its output on the same disk, fsynced before the rename;
- ``convert-nosync``: the same with ``sync=False`` (compare with ``copy-nosync``);
- ``export``: ``convert_mcore_to_hf`` of the converted checkpoint back to HF (fsynced), for reference.

Each is run ``--repeat`` times, interleaved; the median is reported. GB/s is input bytes per second
(the timed span includes the child's imports of the converter); CPU s is the child's user + system time
in that span (all threads), which depends less than wall time on other programs sharing the machine;
peak RSS is the child's high-water mark (``VmHWM``). After timing, the converted
checkpoint is read back tensor by tensor and compared with the HF tensors bit for bit, and so is the
exported HF folder; without that no number is written and the exit status is 1.

Run from the repository root: ``.venv/bin/python -m benchmarks.convert_hf_to_mcore``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
NAME = "convert_hf_to_mcore"
TOKENIZER = ROOT.parent / "shared" / "data" / "qwen3-tokenizer"
MODES = ("read", "read-warm", "copy", "copy-nosync", "convert", "convert-nosync")


def bench_config(experts: int):
    from qwen3_next_mcore.config import get_preset

    return get_preset("qwen3-next-80b-a3b", num_hidden_layers=2, layer_types=("linear_attention", "full_attention"),
                      num_experts=experts)


def write_checkpoint(directory: Path, experts: int, shard_size: str = "1GB") -> dict:
    """A random bf16 HF checkpoint of :func:`bench_config`, written shard by shard with safetensors."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from qwen3_next_mcore.convert.mapping import expected_hf_shapes

    config = bench_config(experts)
    directory.mkdir(parents=True)
    shapes = expected_hf_shapes(config)
    meta = {k: torch.empty(s, dtype=torch.bfloat16, device="meta") for k, s in shapes.items()}
    split = split_torch_state_dict_into_shards(meta, max_shard_size=shard_size)
    gen = torch.Generator().manual_seed(0)
    for file, names in split.filename_to_tensors.items():
        tensors = {n: (torch.randn(shapes[n], generator=gen) * 0.02).to(torch.bfloat16) for n in names}
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": split.metadata["total_size"]}, "weight_map": split.tensor_to_filename}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf = config.to_hf() | {"dtype": "bfloat16"}
    (directory / "config.json").write_text(json.dumps(hf, indent=2))
    if TOKENIZER.is_dir():
        for f in TOKENIZER.iterdir():
            if f.is_file():
                shutil.copyfile(f, directory / f.name)
    largest = max(t.numel() * t.element_size() for t in meta.values())
    return {"tensors": len(meta), "bytes": sum(t.numel() * t.element_size() for t in meta.values()),
            "largest_tensor_bytes": largest, "files": len(split.filename_to_tensors)}


def evict(directory: Path) -> None:
    """Write back and drop ``directory``'s files from the page cache (only these files)."""
    for p in directory.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError as e:  # e.g. a sandboxed kernel without fadvise: runs then read warm
                print(f"warning: cannot evict {p} from the page cache: {e}", file=sys.stderr)
            finally:
                os.close(fd)


# ---- the measured children --------------------------------------------------------------------------
def child(mode: str, hf_dir: Path, out: Path) -> dict:
    import torch  # noqa: F401 - every child pays the same import before the clock starts

    base_rss = peak_rss()
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    if mode in ("read", "read-warm"):
        from safetensors import safe_open

        n = 0
        for f in sorted(hf_dir.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                    n += h.get_tensor(k).clone().numel()
    elif mode in ("copy", "copy-nosync"):
        out.mkdir()
        for f in sorted(hf_dir.glob("*.safetensors")):
            shutil.copyfile(f, out / f.name)
            if mode == "copy":
                fd = os.open(out / f.name, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
    elif mode == "export":
        from qwen3_next_mcore.convert import convert_mcore_to_hf

        convert_mcore_to_hf(hf_dir, out, progress=False)
    elif mode in ("convert", "convert-nosync"):
        from qwen3_next_mcore.convert import convert_hf_to_mcore

        convert_hf_to_mcore(hf_dir, out, progress=False, sync=mode == "convert")
    else:
        raise ValueError(mode)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "cpu_seconds": _cpu_seconds() - cpu0, "peak_rss_bytes": peak_rss(),
            "rss_after_import_bytes": base_rss}


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (less sensitive than wall time to other
    programs sharing the machine)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss() -> int:
    """This process's peak resident set (VmHWM): unlike ``ru_maxrss``, it does not inherit the parent's
    peak across fork/exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(mode: str, hf_dir: Path, out: Path) -> dict:
    """``mode`` in a fresh interpreter, ``hf_dir`` (its input) evicted from the page cache first (for
    ``read-warm``: read once, so that it is all in the page cache). Earlier runs' output is written back
    first, so that no run pays for another's."""
    os.sync()
    evict(hf_dir)
    if mode == "read-warm":
        for f in sorted(hf_dir.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass
    res = subprocess.run([sys.executable, "-m", "benchmarks.convert_hf_to_mcore", "--child", mode,
                          "--hf-dir", str(hf_dir), "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                         check=False)
    if res.returncode:
        raise RuntimeError(f"{mode} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def verify(hf_dir: Path, mcore_dir: Path) -> int:
    """Every checkpoint tensor equals the mapping of the HF tensors, bit for bit; returns the count."""
    import torch

    from qwen3_next_mcore.config import Qwen3NextConfig
    from qwen3_next_mcore.convert.dcp_io import McoreCheckpointReader
    from qwen3_next_mcore.convert.hf_checkpoint import HFCheckpoint
    from qwen3_next_mcore.convert.mapping import build_rules, mcore_key, to_ours

    config = Qwen3NextConfig.from_hf(hf_dir / "config.json")
    reader = McoreCheckpointReader(mcore_dir / "release")
    n = 0
    with HFCheckpoint(hf_dir) as ckpt:
        for rule in build_rules(config):
            key, expert = mcore_key(rule.ours)
            shape = tuple(reader.tensors[key].size)
            offsets = (0,) * len(shape) if expert is None else (expert,) + (0,) * (len(shape) - 1)
            sizes = shape if expert is None else (1, *shape[1:])
            (got,) = reader.read([(key, offsets, sizes)])
            want = to_ours(rule, [ckpt.get(h) for h in rule.hf], config)
            if not torch.equal(got.reshape(want.shape), want) or got.dtype != want.dtype:
                raise AssertionError(f"{rule.ours} ({key}) differs from {rule.hf}")
            n += 1
    return n


def verify_export(hf_dir: Path, export_dir: Path) -> int:
    """The exported HF folder holds the original tensors (names, dtypes, bits); returns the count."""
    import torch

    from qwen3_next_mcore.convert.hf_checkpoint import HFCheckpoint

    with HFCheckpoint(hf_dir) as a, HFCheckpoint(export_dir) as b:
        if a.keys() != b.keys():
            raise AssertionError(f"exported names differ: {sorted(a.keys() ^ b.keys())[:3]}")
        for k in a.keys():  # noqa: SIM118 - HFCheckpoint.keys() is a method returning a set
            if not torch.equal(a.get(k), b.get(k)) or a.dtype(k) != b.dtype(k):
                raise AssertionError(f"exported {k} differs")
    return len(a.keys())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=128, help="routed experts per layer (80B: 512)")
    parser.add_argument("--workdir", default=None, help="where the synthetic checkpoint goes (on disk)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement (median reported)")
    parser.add_argument("--name", default=NAME, help=f"results file name under benchmarks/results (default {NAME})")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.hf_dir), Path(args.out))))
        return 0

    load_before = os.getloadavg()
    if args.workdir is not None:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="convert-bench-", dir=args.workdir))
    try:
        hf_dir = work / "hf"
        t = time.perf_counter()
        info = write_checkpoint(hf_dir, args.experts)
        print(f"synthetic checkpoint: {info['bytes'] / 1e9:.2f} GB in {info['files']} files, {info['tensors']} "
              f"tensors, largest {info['largest_tensor_bytes'] / 1e6:.0f} MB ({time.perf_counter() - t:.0f} s)")
        samples: dict[str, list[dict]] = {m: [] for m in MODES}
        for i in range(args.repeat):
            for mode in MODES:
                out = work / mode
                res = run_child(mode, hf_dir, out)
                samples[mode].append(res)
                print(f"[{i + 1}/{args.repeat}] {mode:15s} {res['seconds']:7.2f} s  "
                      f"{info['bytes'] / 1e9 / res['seconds']:6.3f} GB/s  peak RSS {res['peak_rss_bytes'] / 1e9:.2f} GB")
                if mode != "convert" or i < args.repeat - 1:
                    shutil.rmtree(out, ignore_errors=True)
        checked = verify(hf_dir, work / "convert")
        print(f"verified: {checked} checkpoint tensors equal the HF tensors bit for bit")
        samples["export"] = [run_child("export", work / "convert", work / "export")]
        res = samples["export"][0]
        print(f"export (mcore-to-hf) {res['seconds']:7.2f} s  {info['bytes'] / 1e9 / res['seconds']:6.3f} GB/s  "
              f"peak RSS {res['peak_rss_bytes'] / 1e9:.2f} GB")
        exported = verify_export(hf_dir, work / "export")
        print(f"verified: the exported HF folder holds the {exported} original tensors bit for bit")
    except Exception as e:  # noqa: BLE001 - no numbers without a passing check
        print(f"benchmark failed, no results written: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)

    runs = {}
    for mode, rs in samples.items():
        seconds = statistics.median(r["seconds"] for r in rs)
        runs[mode] = {"seconds": seconds, "gb_per_s": info["bytes"] / 1e9 / seconds,
                      "seconds_all": [round(r["seconds"], 3) for r in rs],
                      "cpu_seconds": statistics.median(r["cpu_seconds"] for r in rs),
                      "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rs),
                      "rss_after_import_bytes": max(r["rss_after_import_bytes"] for r in rs)}
    limit = 2 * info["largest_tensor_bytes"] + 1e9
    read, copy = runs["read"]["gb_per_s"], runs["copy"]["gb_per_s"]
    result = {
        "benchmark": NAME,
        "config": {"preset": "qwen3-next-80b-a3b", "num_hidden_layers": 2, "num_experts": args.experts,
                   "mtp_num_layers": 1, "dtype": "bf16"},
        "repeat": args.repeat,
        "checkpoint": info,
        "runs": runs,
        "ratios_to_read": {k: v["gb_per_s"] / read for k, v in runs.items()},
        "ratios_to_copy": {k: v["gb_per_s"] / copy for k, v in runs.items()},
        "targets": {"throughput_ratio_to_read_min": 0.8, "peak_rss_max_bytes": limit},
        "peak_rss_ok": runs["convert"]["peak_rss_bytes"] < limit,
        "throughput_ok": runs["convert"]["gb_per_s"] >= 0.8 * read,
        "verified_tensors": checked,
        "verified_exported_tensors": exported,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "load_average_before": load_before, "load_average_after": os.getloadavg()},
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [f"| {k} | {v['seconds']:.2f} | {v['gb_per_s']:.3f} | {v['gb_per_s'] / read:.2f} | "
            f"{v['gb_per_s'] / copy:.2f} | {v['cpu_seconds']:.1f} | {v['peak_rss_bytes'] / 1e9:.2f} |"
            for k, v in runs.items()]
    md = "\n".join([
        "# HF -> megatron-core conversion (benchmarks/convert_hf_to_mcore.py)",
        "",
        (f"Synthetic bf16 checkpoint with the 80B widths, 2 layers + MTP, {args.experts} experts/layer: "
         f"{info['bytes'] / 1e9:.2f} GB, {info['tensors']} tensors, largest "
         f"{info['largest_tensor_bytes'] / 1e6:.0f} MB. Input evicted from the page cache before every run but "
         f"read-warm (earlier output written back first); "
         f"{os.cpu_count()} CPUs (load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after). "
         f"Median of {args.repeat} runs (export: 1). Verified bit-exact: {checked} checkpoint tensors, "
         f"{exported} exported HF tensors."),
        "",
        "| run | seconds | GB/s | x read | x copy | CPU s | peak RSS (GB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        (f"Throughput target: conversion >= 0.8x the plain read: "
         f"{'met' if result['throughput_ok'] else 'NOT met'} ({runs['convert']['gb_per_s'] / read:.2f}x; "
         f"the plain copy, the same bytes read and written without any conversion, is "
         f"{copy / read:.2f}x; conversion is {runs['convert']['gb_per_s'] / copy:.2f}x the copy, "
         f"{runs['convert-nosync']['gb_per_s'] / runs['copy-nosync']['gb_per_s']:.2f}x without fsync)."),
        "",
        (f"Memory target: peak RSS < 2 x largest tensor + 1 GB = {limit / 1e9:.2f} GB "
         f"({'met' if result['peak_rss_ok'] else 'NOT met'}: {runs['convert']['peak_rss_bytes'] / 1e9:.2f} GB, of "
         f"which {runs['convert']['rss_after_import_bytes'] / 1e9:.2f} GB is the interpreter with torch imported)."),
        "",
    ])
    (RESULTS / f"{args.name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
