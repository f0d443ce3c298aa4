"""HF safetensors folder -> megatron-core ``torch_dist`` checkpoint, streaming, in bounded memory.

Every tensor of the checkpoint is described before anything is read (:mod:`.mapping`: key, global shape,
one chunk per tensor and per routed expert), the HF folder is validated against the config, and the
chunks, ordered as the HF shards store their sources (sequential reads), are written in buckets of
``bucket_size`` bytes through :mod:`.dcp_io`. Peak memory is about one bucket plus the prefetch budget
(each at least the largest tensor), whatever the model size.

The checkpoint's keys do not depend on the parallel layout (see :mod:`.mapping`): the writer needs no
model and no GPU, and megatron-core reshards it when loading at any TP/PP/EP. The layout options are
validated against the config and recorded for Megatron-LM (its ``args``). Under ``torchrun`` every
rank writes a contiguous share of the buckets into the same folder (which must then be on a filesystem
all ranks share) and rank 0 writes the metadata.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..config import ParallelConfig, Qwen3NextConfig
from . import dcp_io
from .hf_checkpoint import HFCheckpoint, check_against_config, config_dtype
from .mapping import (
    GLU,
    IDENTITY,
    Rule,
    build_rules,
    expected_hf_shapes,
    mcore_key,
    mcore_object_keys,
    ours_shape,
    to_hf,
    to_ours,
)
from .mcore import CONFIG_NAME, CONVERSION_NAME, RELEASE, TRACKER, megatron_args, write_json
from .output import (
    ConversionReport,
    check_output_free,
    copy_side_files,
    fsync_path,
    fsync_tree,
    gc_paused,
    make_tmp_dir,
    parse_size,
    progress_bar,
    publish,
)

log = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of bf16, fp32, fp16")
    return DTYPES[dtype]


def convert_hf_to_mcore(
    hf_dir: str | Path,
    output: str | Path,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    expert_parallel: int = 1,
    expert_tensor_parallel: int = 1,
    dtype: str | torch.dtype | None = None,
    allow_extra: bool = False,
    bucket_size: int | str = "512MiB",
    sync: bool = True,
    progress: bool | None = None,
) -> ConversionReport:
    """Convert the HF Qwen3-Next folder ``hf_dir`` into a megatron-core checkpoint folder ``output``.

    ``output`` gets ``latest_checkpointed_iteration.txt`` (``release``), ``release/`` (torch_dist),
    ``qwen3_next_config.json``, the HF ``config.json`` and the tokenizer files of ``hf_dir``. ``dtype``
    (bf16/fp32/fp16) casts every tensor; by default each keeps its stored dtype. The parallel sizes are
    the target layout: checked against the config and recorded (any layout loads the checkpoint).
    Unknown HF tensors raise unless ``allow_extra``. Nothing appears at ``output`` unless the whole
    conversion succeeds; with ``sync`` (default) every file is on disk (fsync) before it appears.
    ``bucket_size`` bounds memory (about two buckets, or two of the largest tensor). Under torchrun, call
    it on every rank. Raises FileNotFoundError, FileExistsError or ValueError naming the file, key or
    option at fault.
    """
    t0 = time.perf_counter()
    hf_dir, output = Path(hf_dir), Path(output)
    check_output_free(output)
    cast = parse_dtype(dtype)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir}: no config.json (expected a Hugging Face Qwen3-Next folder)")
    raw_config = json.loads((hf_dir / "config.json").read_text())
    config = Qwen3NextConfig.from_hf(hf_dir / "config.json")
    layout = ParallelConfig(tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel,
                            expert_parallel=expert_parallel, expert_tensor_parallel=expert_tensor_parallel)
    layout.check(config)
    bucket_bytes = parse_size(bucket_size)

    with HFCheckpoint(hf_dir) as ckpt, gc_paused():
        skipped = check_against_config(ckpt, expected_hf_shapes(config), dtype=config_dtype(raw_config),
                                       allow_extra=allow_extra)
        chunks, rule_of = _plan(config, ckpt, cast)
        objects = mcore_object_keys(config)
        stored_dtypes = sorted({str(c.dtype).removeprefix("torch.") for c in chunks})
        common = {"args": megatron_args(config, layout, "/".join(stored_dtypes)), "checkpoint_version": 3.0,
                  "iteration": 0, "qwen3_next_config": config.model_dump_json()}
        empty = dcp_io.object_bytes([None])
        object_data = {k: empty for k in objects} | {dcp_io.COMMON_STATE_KEY: dcp_io.object_bytes([common])}
        buckets = dcp_io.buckets_by_size(chunks, lambda c: max(c.nbytes, 1), bucket_bytes)
        items = [[c.write_item() for c in b] for b in buckets]
        items[0] = [dcp_io.object_write_item(k) for k in object_data] + items[0]

        group = _Group()
        tmp = None
        try:
            tmp = _on_rank0(group, lambda: make_tmp_dir(output))
            error = None
            try:
                results = _write_share(tmp, group, buckets, items, object_data, rule_of, ckpt, config, cast,
                                       bucket_bytes, sync, progress)
            except Exception as e:  # noqa: BLE001 - every rank learns of it below, then raises
                error, results = e, []
            outcome = group.gather((None if error is None else f"{type(error).__name__}: {error}", results))
            if error is not None:
                raise error
            failed = [(r, msg) for r, (msg, _) in enumerate(outcome) if msg is not None]
            if failed:
                raise RuntimeError(f"rank {failed[0][0]} failed: {failed[0][1]}")

            def finish() -> None:
                release = tmp / RELEASE
                writer = dcp_io.StreamingWriter(release, items)
                writer.finish(dcp_io.build_metadata(chunks, object_data), [r for _, rs in outcome for r in rs])
                _save_megatron_config(release)
                (tmp / TRACKER).write_text(RELEASE)
                (tmp / CONFIG_NAME).write_text(config.model_dump_json(indent=2) + "\n")
                shutil.copyfile(hf_dir / "config.json", tmp / "config.json")
                side = copy_side_files(hf_dir, tmp)
                write_json(tmp / CONVERSION_NAME, {
                    "source": str(hf_dir.resolve()), "direction": "hf-to-mcore", "format": "torch_dist",
                    "layout": layout.model_dump(), "dtype": stored_dtypes, "skipped_hf_tensors": skipped,
                    "side_files": side, "writer_ranks": group.world})
                publish(tmp, output, sync)

            _on_rank0(group, finish)
        finally:
            if group.rank == 0 and tmp is not None and tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            group.close()
    report = ConversionReport("hf-to-mcore", output, len(chunks), sum(c.nbytes for c in chunks),
                              time.perf_counter() - t0, len(buckets))
    log.info("%s", report)
    return report


def _write_share(tmp: Path, group: _Group, buckets, items, object_data, rule_of, ckpt: HFCheckpoint,
                 config: Qwen3NextConfig, cast: torch.dtype | None, bucket_bytes: int, sync: bool,
                 progress: bool | None) -> list:
    """Write this rank's buckets into ``tmp/release``; returns DCP's write results."""
    if not tmp.is_dir():
        raise FileNotFoundError(f"rank {group.rank}: {tmp} (made by rank 0) is not visible here; under "
                                "torchrun the output must be on a filesystem all ranks share")
    release = tmp / RELEASE
    release.mkdir(exist_ok=True)
    writer = dcp_io.StreamingWriter(release, items)
    mine = _share(len(buckets), group.rank, group.world)
    results: list = []
    total = sum(c.nbytes for b in mine for c in buckets[b])
    with progress_bar(total, "hf-to-mcore", progress if group.rank == 0 else False) as bar:
        def produce(chunk: dcp_io.Chunk) -> torch.Tensor | dcp_io.FileSpans:
            return _produce(chunk, rule_of[chunk.index], ckpt, config, cast)

        def memory(chunk: dcp_io.Chunk) -> int:  # what produce's result holds (copied ranges: nothing)
            return 0 if _unchanged_parts(chunk, rule_of[chunk.index], ckpt, config) else chunk.nbytes

        # one prefetcher over all of this rank's buckets, so reading never waits for a bucket to close;
        # with sync, each finished data file is flushed to disk in the background meanwhile
        source = dcp_io.ChunkSource(produce, object_data, prefetch_bytes=bucket_bytes, memory=memory)
        source.start([c for b in mine for c in buckets[b]])
        flushes = []
        with ThreadPoolExecutor(1, thread_name_prefix="convert-fsync") as flusher:
            try:
                for b in mine:
                    written = writer.write(b, source, bar.update)
                    results += written
                    if sync:
                        files = {release / r.storage_data.relative_path for r in written}
                        flushes += [flusher.submit(fsync_path, f) for f in files]
            finally:
                source.stop()
            for f in flushes:
                f.result()
    if sync:
        fsync_tree(release)  # whatever is left (already clean files cost nothing)
    return results


def _plan(config: Qwen3NextConfig, ckpt: HFCheckpoint, cast: torch.dtype | None):
    """Every chunk of the checkpoint (one per tensor, one per routed expert), ordered as the HF shards
    store their first source, and the rule that makes each."""
    hf_shapes = expected_hf_shapes(config)
    shapes: dict[str, tuple[int, ...]] = {}
    chunks, rule_of, where = [], {}, {}
    for rule in build_rules(config):
        dtypes = {ckpt.dtype(n) for n in rule.hf}
        if len(dtypes) > 1:
            raise ValueError(f"{ckpt.directory}: {', '.join(rule.hf)} are joined into one tensor but have "
                             f"different dtypes {sorted(map(str, dtypes))}")
        key, expert = mcore_key(rule.ours)
        if key not in shapes:
            shapes[key] = ours_shape(rule, config, hf_shapes)
        shape = shapes[key]
        if expert is None:
            chunk = dcp_io.Chunk(key, shape, (0,) * len(shape), shape, cast or dtypes.pop())
        else:
            chunk = dcp_io.Chunk(key, (config.num_experts, *shape), (expert,) + (0,) * len(shape), (1, *shape),
                                 cast or dtypes.pop())
        chunks.append(chunk)
        rule_of[chunk.index] = rule
        where[chunk.index] = ckpt.location(rule.hf[0])
    chunks.sort(key=lambda c: where[c.index])
    return chunks, rule_of


def _unchanged_parts(chunk: dcp_io.Chunk, rule: Rule, ckpt: HFCheckpoint, config: Qwen3NextConfig) -> list[str]:
    """The HF tensors of ``rule`` in the order their bytes follow each other in ``chunk`` when the chunk
    is their bytes unchanged, one after the other (identity, ``[gate; up]``; same dtype); else []."""
    if not all(ckpt.dtype(n) == chunk.dtype for n in rule.hf):
        return []
    expert = mcore_key(rule.ours)[1] is not None  # a routed expert: one row of [E, ...]
    if rule.kind in _CONFIG_FREE:
        order = _tiling_order_cached(rule.kind, chunk.sizes, chunk.dtype, expert)
    else:
        order = _tiling_order(rule.kind, chunk.sizes, chunk.dtype, expert, config)
    return [] if order is None else [rule.hf[i] for i in order]


def _tiling_order(kind: str, sizes: tuple[int, ...], dtype: torch.dtype, expert: bool,
                  config: Qwen3NextConfig | None) -> tuple[int, ...] | None:
    """When the inverse transform ``kind`` of a chunk-shaped tensor gives contiguous views that tile it
    (so the chunk is the HF tensors' bytes one after the other), the HF tensors' order in it; else None.
    The tensor is uninitialised memory, never touched."""
    out = torch.empty(sizes, dtype=dtype)
    body = out[0] if expert else out
    parts = to_hf(Rule("", (), kind), body, config)  # type: ignore[arg-type]
    if not _tiles(parts, body):
        return None
    return tuple(i for _, i in sorted((p.data_ptr(), i) for i, p in enumerate(parts)))


_CONFIG_FREE = (IDENTITY, GLU)  # inverse transforms that do not depend on the config
_tiling_order_cached = functools.lru_cache(maxsize=4096)(
    lambda kind, sizes, dtype, expert: _tiling_order(kind, sizes, dtype, expert, None))


def _produce(chunk: dcp_io.Chunk, rule: Rule, ckpt: HFCheckpoint, config: Qwen3NextConfig,
             cast: torch.dtype | None) -> torch.Tensor | dcp_io.FileSpans:
    """The data of ``chunk``: the HF tensors of ``rule`` joined by the mapping table, or, when that join
    leaves their bytes unchanged, where those bytes are (copied file to file by the writer)."""
    expert = mcore_key(rule.ours)[1] is not None  # a routed expert: one row of [num_experts, ...]
    unchanged = _unchanged_parts(chunk, rule, ckpt, config)
    if unchanged:
        return dcp_io.FileSpans(tuple(ckpt.byte_range(n) for n in unchanged))
    full = to_ours(rule, [ckpt.get(n) for n in rule.hf], config)
    if cast is not None:
        full = full.to(cast)
    if expert:
        full = full.unsqueeze(0)
    return full.contiguous()


def _tiles(parts: list[torch.Tensor], whole: torch.Tensor) -> bool:
    """Whether ``parts`` are contiguous views of ``whole`` that cover it exactly, without overlap."""
    base = whole.data_ptr()
    spans = sorted((p.data_ptr() - base, p.numel() * p.element_size()) for p in parts)
    if not all(p.is_contiguous() and p.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
               for p in parts):
        return False
    end = 0
    for start, size in spans:
        if start != end:
            return False
        end += size
    return end == whole.numel() * whole.element_size()


def _on_rank0(group: _Group, fn):
    """``fn()`` on rank 0, its result (or its failure, raised) on every rank."""
    value = error = None
    if group.rank == 0:
        try:
            value = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the other ranks are told
            error = e
    value, message = group.broadcast((value, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 failed: {message}")
    return value


def _share(n: int, rank: int, world: int) -> range:
    """Contiguous share of ``n`` buckets for ``rank`` (so each rank reads its shards sequentially)."""
    return range(n * rank // world, n * (rank + 1) // world)


def _save_megatron_config(directory: Path) -> None:
    # megatron-core's CheckpointingConfig as its save_config writes it (importing megatron-core for this one
    # line would cost seconds; tests check that megatron-core reads it back)
    (directory / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist",
                                                         "sharded_backend_version": 1}))


class _Group:
    """The ranks writing together: every torch.distributed rank under torchrun (a gloo group is set up
    when torchrun's environment is present and nothing was initialised), else this process alone."""

    def __init__(self):
        import torch.distributed as dist

        self._dist = dist
        self._owned = False
        if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group("gloo")
            self._owned = True
        self._on = dist.is_initialized() and dist.get_world_size() > 1
        if self._on:
            self._pg = dist.new_group(backend="gloo")  # objects travel on the CPU whatever the default backend
        self.rank = dist.get_rank() if self._on else 0
        self.world = dist.get_world_size() if self._on else 1

    def broadcast(self, obj):
        if not self._on:
            return obj
        box = [obj]
        self._dist.broadcast_object_list(box, src=0, group=self._pg)
        return box[0]

    def gather(self, obj) -> list:
        if not self._on:
            return [obj]
        out = [None] * self.world
        self._dist.all_gather_object(out, obj, group=self._pg)
        return out

    def barrier(self) -> None:
        if self._on:
            self._dist.barrier(group=self._pg)

    def close(self) -> None:
        if self._on:
            self._dist.destroy_process_group(self._pg)
        if self._owned:
            self._dist.destroy_process_group()
