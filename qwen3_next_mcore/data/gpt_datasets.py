"""Pretraining datasets: train/valid/test megatron-core ``GPTDataset``s over ``.bin/.idx`` prefixes.

Each sample is megatron-core's GPTDataset item: ``tokens``/``labels``/``position_ids`` int64 ``[seq_length]``,
``loss_mask`` float32 ``[seq_length]`` (and ``attention_mask`` bool ``[1, S, S]`` when
``create_attention_mask``). Works in one process without torch.distributed; when it is initialised,
megatron-core's builder builds on rank 0 first and the other ranks then read its cached indices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from .tokenizer import eod_id, load_tokenizer

log = logging.getLogger(__name__)


class PretrainDatasets(NamedTuple):
    """The three splits; a split is None when it gets no data (e.g. ``split="100,0,0"``)."""

    train: Any
    valid: Any
    test: Any


def parse_blend(paths: str | Sequence[str] | None) -> tuple[list[str], list[float] | None] | None:
    """Megatron's ``--data-path`` list as ``(prefixes, weights)``.

    Accepts ``"p"``, ``["p1", "p2"]`` (weights from dataset sizes), ``["0.3", "p1", "0.7", "p2"]`` or the
    same as one whitespace-separated string. Each prefix must name an existing ``.bin``/``.idx`` pair,
    given with or without the ``_text_document`` suffix that ``preprocess pretrain`` adds.
    """
    if paths is None:
        return None
    items = paths.split() if isinstance(paths, str) else [str(p) for p in paths]
    if not items:
        raise ValueError("empty data path list")
    weights: list[float] | None = None
    prefixes = items
    if len(items) % 2 == 0:
        try:
            weights = [float(w) for w in items[0::2]]
            prefixes = items[1::2]
        except ValueError:
            weights = None
    if weights is None and any(_is_number(p) for p in items):
        raise ValueError(f"data path list {items} mixes weights and prefixes: use 'w1 p1 w2 p2 ...'")
    if weights is not None and (any(w < 0 for w in weights) or sum(weights) <= 0):
        raise ValueError(f"blend weights {weights} must be >= 0 with a positive sum")
    return [resolve_prefix(p) for p in prefixes], weights


def resolve_prefix(prefix: str) -> str:
    """``prefix`` when ``prefix.bin/.idx`` exist, else ``prefix_text_document``; ValueError otherwise."""
    for candidate in (prefix, f"{prefix}_text_document"):
        if Path(candidate + ".bin").is_file() and Path(candidate + ".idx").is_file():
            return candidate
    raise ValueError(
        f"no dataset at prefix {prefix!r}: expected {prefix}.bin and {prefix}.idx "
        f"(or {prefix}_text_document.bin/.idx)"
    )


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def megatron_tokenizer(tokenizer, eod_token: str | None = None):
    """A megatron-core ``MegatronTokenizerBase`` view of a HF tokenizer, as ``GPTDatasetConfig`` needs.

    ``eod`` is the EOD id used when the data was written (default EOS). ``pad`` is -1, megatron-core's
    own "no pad token" value: GPTDataset masks and zeroes every token equal to ``pad``, so the HF pad
    (``<|endoftext|>`` for Qwen) must not be used there, since it can occur in real documents.
    """
    from megatron.core.tokenizers import MegatronTokenizerBase

    class HFTokenizerForMegatron(MegatronTokenizerBase):
        def __init__(self, hf, eod: int):
            super().__init__(str(getattr(hf, "name_or_path", "")), {})
            self._hf = hf
            self._eod = eod

        def tokenize(self, text: str) -> list[int]:
            return self._hf(text)["input_ids"]

        def detokenize(self, ids) -> str:
            return self._hf.decode(ids)

        @property
        def vocab(self):
            return self._hf.get_vocab()

        @property
        def vocab_size(self) -> int:
            return len(self._hf)

        def apply_chat_template(self, conversation, **kwargs):
            return self._hf.apply_chat_template(conversation, **kwargs)

        @property
        def eod(self) -> int:
            return self._eod

        @property
        def eos(self) -> int:
            return self._eod

        @property
        def pad(self) -> int:
            return -1

        @property
        def unique_identifiers(self) -> dict:
            # part of megatron-core's cache key for the sample indices
            return {
                "class": "HFTokenizerForMegatron",
                "tokenizer_path": self.path,
                "vocab_size": self.vocab_size,
                "eod": self._eod,
            }

    return HFTokenizerForMegatron(tokenizer, eod_id(tokenizer, eod_token))


def num_samples_per_split(
    global_batch_size: int, train_iters: int, eval_iters: int, eval_interval: int | None
) -> list[int]:
    """Samples to draw for train/valid/test, as Megatron-LM counts them.

    train = ``train_iters * gbs``; valid = ``(train_iters // eval_interval + 1) * eval_iters * gbs``
    (one evaluation every ``eval_interval`` iterations and one at the end); test = ``eval_iters * gbs``.
    """
    for name, v in (("global_batch_size", global_batch_size), ("train_iters", train_iters)):
        if v <= 0:
            raise ValueError(f"{name} must be > 0, got {v}")
    if eval_iters < 0:
        raise ValueError(f"eval_iters must be >= 0, got {eval_iters}")
    interval = eval_interval or train_iters
    if interval <= 0:
        raise ValueError(f"eval_interval must be > 0, got {eval_interval}")
    evals = (train_iters // interval + 1) * eval_iters
    return [train_iters * global_batch_size, evals * global_batch_size, eval_iters * global_batch_size]


def default_is_built_on_rank() -> bool:
    """Megatron-LM's rule once model parallelism is set up: TP rank 0 of the first and last PP stages."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return True
    first_or_last = ps.is_pipeline_first_stage(ignore_virtual=True) or ps.is_pipeline_last_stage(
        ignore_virtual=True
    )
    return first_or_last and ps.get_tensor_model_parallel_rank() == 0


def build_pretrain_datasets(
    data_path: str | Sequence[str] | None = None,
    *,
    tokenizer,
    seq_length: int,
    global_batch_size: int,
    train_iters: int,
    eval_iters: int = 0,
    eval_interval: int | None = None,
    split: str = "99,1,0",
    valid_data_path: str | Sequence[str] | None = None,
    test_data_path: str | Sequence[str] | None = None,
    seed: int = 1234,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    create_attention_mask: bool = False,
    eod_token: str | None = None,
    path_to_cache: str | Path | None = None,
    is_built_on_rank: Callable[[], bool] | None = None,
    num_dataset_builder_threads: int = 1,
) -> PretrainDatasets:
    """Train/valid/test ``GPTDataset``s through megatron-core's ``BlendedMegatronDatasetBuilder``.

    Args:
        data_path: the training blend (see :func:`parse_blend`); with ``split`` it also feeds valid/test,
            unless ``valid_data_path`` is given, in which case each split has its own blend.
        tokenizer: a tokenizer folder or loaded HF tokenizer (only its size and EOD id are used).
        seq_length: tokens per sample; each sample reads ``seq_length + 1`` tokens for the shifted labels.
        global_batch_size, train_iters, eval_iters, eval_interval: sizes per :func:`num_samples_per_split`.
        split: Megatron's ``"train,valid,test"`` weights over the documents of ``data_path``.
        reset_position_ids, reset_attention_mask, eod_mask_loss, create_attention_mask: megatron-core's
            ``GPTDatasetConfig`` options (positions/attention restart after each EOD; EOD not trained).
        path_to_cache: where the sample indices are cached (default: megatron-core's
            ``{prefix}/cache/GPTDataset_indices`` folder).
        is_built_on_rank: which ranks build (default :func:`default_is_built_on_rank`); the others get None.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if seq_length <= 0:
        raise ValueError(f"seq_length must be > 0, got {seq_length}")
    tok = megatron_tokenizer(load_tokenizer(tokenizer), eod_token)
    sizes = num_samples_per_split(global_batch_size, train_iters, eval_iters, eval_interval)
    if valid_data_path is None and test_data_path is None:
        if data_path is None:
            raise ValueError("give data_path (with split) or per-split paths")
        blend_args: dict[str, Any] = dict(blend=parse_blend(data_path), split=split)
    else:
        if data_path is None:
            raise ValueError("valid_data_path/test_data_path need a training data_path")
        per_split = [parse_blend(data_path), parse_blend(valid_data_path), parse_blend(test_data_path)]
        blend_args = dict(blend_per_split=per_split)
        sizes = [s if b is not None else None for s, b in zip(sizes, per_split)]
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        tokenizer=tok,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
        path_to_cache=str(path_to_cache) if path_to_cache is not None else None,
        num_dataset_builder_threads=num_dataset_builder_threads,
        **blend_args,
    )
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, is_built_on_rank or default_is_built_on_rank, config
    )
    train, valid, test = builder.build()
    log.info(
        "pretraining datasets: train=%s valid=%s test=%s samples of %d tokens",
        *(len(d) if d is not None else None for d in (train, valid, test)),
        seq_length,
    )
    return PretrainDatasets(train, valid, test)
