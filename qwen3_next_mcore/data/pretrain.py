"""Pretraining data: JSONL text -> Megatron ``{prefix}_{key}_document.bin/.idx`` (one document per line).

The ``.bin`` holds every document's token ids back to back (uint16 when the tokenizer has fewer than 65500
ids, else int32, as Megatron-LM chooses); the ``.idx`` is written by megatron-core's
``IndexedDatasetBuilder`` (one sequence per document). Lines are tokenised in chunks by worker processes
with the fast tokenizer's batch encoder; results come back in input order.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_bin_idx, dataset_prefix
from .json_rows import parse_json_line
from .tokenizer import check_vocab, default_tokenizer_dir, eod_id, load_tokenizer

log = logging.getLogger(__name__)

# a chunk is cut at this many lines or this many characters, whichever comes first
CHUNK_LINES = 256
CHUNK_CHARS = 1 << 20


@dataclass(frozen=True)
class PretrainReport:
    """What :func:`preprocess_pretrain` wrote: ``prefix`` + ``.bin``/``.idx`` and its counts."""

    prefix: str
    documents: int
    tokens: int
    empty_skipped: int
    seconds: float
    dtype: str

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


def token_dtype(num_ids: int) -> type[np.number]:
    """The ``.bin`` dtype Megatron-LM picks for a tokenizer with ``num_ids`` ids (uint16 below 65500)."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(num_ids)


def preprocess_pretrain(
    inputs: str | Path | Sequence[str | Path],
    output_prefix: str | Path,
    *,
    tokenizer=None,
    json_key: str = "text",
    append_eod: bool = False,
    eod_token: str | None = None,
    workers: int | None = None,
    vocab_size: int | None = None,
    progress: bool | None = None,
) -> PretrainReport:
    """Tokenise JSONL files into ``{output_prefix}_{json_key}_document.bin/.idx``.

    Args:
        inputs: one or more JSONL files, read in order; each non-blank line is one document.
        output_prefix: Megatron-LM's ``--output-prefix``; the folder is created when missing.
        tokenizer: a tokenizer folder or a loaded HF tokenizer (default: :func:`default_tokenizer_dir`).
        json_key: the key holding the text.
        append_eod: append the EOD token (:func:`~.tokenizer.eod_id`) to every non-empty document.
        eod_token: the EOD token string (default: the tokenizer's EOS).
        workers: tokenising processes (default: all cores); 1 runs in this process.
        vocab_size: when given, fail early if the tokenizer's ids exceed the model's vocabulary.
        progress: a tqdm bar with tokens/s (default: only when stderr is a terminal).

    Documents whose text is empty are skipped (counted in the report). Nothing is left at the output
    names unless the whole run succeeds.
    """
    paths = [Path(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs)]
    if not paths:
        raise ValueError("no input files given")
    for p in paths:
        if not p.is_file():
            raise ValueError(f"input file {p} does not exist")
    tok = load_tokenizer(tokenizer if tokenizer is not None else default_tokenizer_dir())
    if vocab_size is not None:
        check_vocab(tok, vocab_size)
    eod = eod_id(tok, eod_token) if append_eod else None
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    dtype = token_dtype(len(tok))
    workers = max(1, workers if workers is not None else _cpu_count())
    prefix = dataset_prefix(output_prefix, json_key)

    start = time.perf_counter()
    docs = tokens = empty = 0
    with (
        _worker_pool(workers, (tok, json_key, eod, dtype)) as pool,
        atomic_bin_idx(prefix) as (tmp_bin, tmp_idx),
    ):
        bar = _progress_bar(progress)  # after the fork: tqdm starts a monitor thread
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        encoded = _encoded_chunks(paths, pool, workers)
        try:
            for flat, lengths, n_empty in encoded:
                offset = 0
                for n in lengths.tolist():
                    builder.add_document(flat[offset : offset + n], [n])
                    offset += n
                docs += len(lengths)
                tokens += offset
                empty += n_empty
                bar.update(offset)
                bar.set_postfix(docs=docs, refresh=False)
            if docs == 0:
                raise ValueError(f"no non-empty {json_key!r} documents in {', '.join(map(str, paths))}")
            builder.finalize(tmp_idx)
        finally:
            encoded.close()  # stops feeding the workers before the pool is torn down
            bar.close()
            builder.data_file.close()
    seconds = time.perf_counter() - start
    report = PretrainReport(prefix, docs, tokens, empty, seconds, np.dtype(dtype).name)
    log.info(
        "wrote %s.bin/.idx: %d documents, %d tokens (%s), %d empty skipped, %.2f s (%.0f tokens/s)",
        prefix,
        docs,
        tokens,
        report.dtype,
        empty,
        seconds,
        report.tokens_per_second,
    )
    return report


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _progress_bar(progress: bool | None):
    from tqdm.auto import tqdm

    # tqdm's disable=None turns the bar off when the stream is not a terminal
    disable = None if progress is None else not progress
    return tqdm(unit="tok", unit_scale=True, desc="tokenising", file=sys.stderr, disable=disable)


# ---- chunking and worker-side encoding ------------------------------------------------------------


def _chunks(paths: Sequence[Path]) -> Iterator[tuple[str, int, list[str]]]:
    """(file, first line number, lines) chunks of the inputs, in order."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            lines: list[str] = []
            chars, first = 0, 1
            for line_no, line in enumerate(f, start=1):
                lines.append(line)
                chars += len(line)
                if len(lines) >= CHUNK_LINES or chars >= CHUNK_CHARS:
                    yield str(path), first, lines
                    lines, chars, first = [], 0, line_no + 1
            if lines:
                yield str(path), first, lines


# per-worker state, set by _init_worker (module globals: the Pool's initializer protocol)
_W: dict = {}


def _init_worker(tokenizer, json_key: str, eod: int | None, dtype) -> None:
    _W.update(tokenizer=tokenizer, key=json_key, eod=eod, dtype=dtype)
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    encode = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
    if encode is not None:
        # the fast tokenizer's batch encoder (the ids equal tokenizer(text).input_ids)
        _W["encode"] = lambda texts: [e.ids for e in encode(texts, add_special_tokens=True)]
    else:
        _W["encode"] = lambda texts: [tokenizer(t)["input_ids"] for t in texts]


def _encode_chunk(chunk: tuple[str, int, list[str]]) -> tuple[np.ndarray, np.ndarray, int]:
    """Tokenise one chunk: (all ids back to back, per-document lengths, number of empty documents)."""
    path, first, lines = chunk
    key = _W["key"]
    texts = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        row = parse_json_line(path, first + i, line)
        if key not in row:
            raise ValueError(f"{path}:{first + i}: missing key {key!r} (the row has keys {sorted(row)})")
        text = row[key]
        if not isinstance(text, str):
            raise ValueError(f"{path}:{first + i}: key {key!r} must hold a string, got {type(text).__name__}")
        texts.append(text)
    ids = [x for x in _W["encode"](texts) if x]
    n_empty = len(texts) - len(ids)
    eod = _W["eod"]
    if eod is not None:
        ids = [x + [eod] for x in ids]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=_W["dtype"], count=int(lengths.sum()))
    return flat, lengths, n_empty


def _encoded_chunks(paths, pool, workers: int):
    """Encoded chunks in input order, from the worker ``pool``, or from this process when it is None."""
    if pool is None:
        yield from map(_encode_chunk, _chunks(paths))
        return
    # at most a few chunks per worker in flight, so big inputs are not read into memory ahead of time
    slots, stop = threading.Semaphore(4 * workers), threading.Event()

    def feed():  # runs in the pool's task-handler thread
        for chunk in _chunks(paths):
            while not slots.acquire(timeout=0.1):
                if stop.is_set():
                    return
            yield chunk

    try:
        for result in pool.imap(_encode_chunk, feed()):
            slots.release()
            yield result
    finally:
        stop.set()


@contextlib.contextmanager
def _worker_pool(workers: int, initargs: tuple):
    """``workers`` processes running :func:`_encode_chunk`; with one worker, None (encode in this process)."""
    if workers == 1:
        _init_worker(*initargs)
        try:
            yield None
        finally:
            _W.clear()
        return
    # fork shares the loaded tokenizer with the workers at no cost (the workers only run JSON parsing and
    # the Rust tokenizer, no torch); where fork is unavailable the tokenizer is pickled
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    # one tokenizer thread per worker process (and no fork warning from HF tokenizers)
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=initargs)
    finally:
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    try:
        yield pool
        pool.close()
    finally:
        pool.terminate()
        pool.join()
