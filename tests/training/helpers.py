"""Small, fast fixtures for the training tests: a byte-level BPE tokenizer with a 1,024-id vocabulary
trained on the demo texts, the ``tiny`` model at that vocabulary, and pretraining ``.bin/.idx`` data.

The real Qwen vocabulary (151,936 rows) makes the embedding, output layer and Adam dominate a CPU step;
at 1,024 ids a step takes a fraction of a second and the loss falls within a few dozen iterations.
"""

from __future__ import annotations

import json
from pathlib import Path

VOCAB = 1024
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _texts(shared_data: Path):
    text_dir = shared_data / "text"
    for line in (text_dir / "c4_demo.jsonl").read_text().splitlines():
        if line.strip():
            yield json.loads(line)["text"]
    for row in json.loads((text_dir / "alpaca_zh_demo.json").read_text())[:500]:
        yield row["instruction"] + "\n" + row.get("input", "") + "\n" + row["output"]


def make_tokenizer(shared_data: Path, out: Path) -> Path:
    """A byte-level BPE tokenizer (HF folder, Qwen's special tokens, our instruct chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qwen3_next_mcore.data.tokenizer import QWEN3_NEXT_INSTRUCT, read_chat_template

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_texts(shared_data), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = read_chat_template(QWEN3_NEXT_INSTRUCT)
    fast.save_pretrained(out)
    return out


def make_model_config(out: Path) -> Path:
    """The ``tiny`` preset with a 1,024-id vocabulary, as a HF config.json folder (``--model-config``)."""
    from qwen3_next_mcore.config import get_preset

    out.mkdir(parents=True, exist_ok=True)
    get_preset("tiny", vocab_size=VOCAB, bos_token_id=0, eos_token_id=2).save_hf(out)
    return out


def make_pretrain_data(shared_data: Path, tokenizer: Path, out_prefix: Path) -> Path:
    from qwen3_next_mcore.data import preprocess_pretrain

    preprocess_pretrain(shared_data / "text" / "c4_demo.jsonl", out_prefix, tokenizer=tokenizer, append_eod=True,
                        workers=1, progress=False)
    return Path(f"{out_prefix}_text_document")


def train_on_rank(rank: int, fields: dict) -> list[dict]:
    """``train(make_config(**fields))`` on one rank of :func:`run_distributed` (module-level, importable)."""
    from qwen3_next_mcore import parallel
    from qwen3_next_mcore.training.arguments import make_config
    from qwen3_next_mcore.training.loop import train

    try:
        return train(make_config(**fields))
    finally:
        parallel.destroy()


def make_hf_weights(model_config: Path, out: Path) -> Path:
    """A random HF checkpoint (with MTP tensors) of the model at ``model_config``: initial weights that do
    not depend on the parallel layout, for comparing layouts."""
    from qwen3_next_mcore.config import Qwen3NextConfig
    from qwen3_next_mcore.testing.tiny_hf import make_hf_checkpoint

    make_hf_checkpoint(Qwen3NextConfig.from_hf(model_config), out)
    return out
