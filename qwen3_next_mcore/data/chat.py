"""SFT rows -> chat messages -> (tokens, labels) with loss only on the assistant replies.

Rows are alpaca style (``instruction``|``query``, optional ``input``, ``output``|``content``|``response``,
optional ``system``) or chat style (``messages: [{role, content}, ...]``). The tokenizer's chat template
renders the conversation. For every assistant turn ``i`` we render messages ``[:i]`` with the generation
prompt and messages ``[:i+1]`` without it; both must be prefixes of the whole conversation's rendering
(else the template is not prefix-stable and we raise). The text between them is the reply: it is
tokenised as its own piece, exactly as at inference time, when the prompt ends at the generation prefix
and the model produces the reply. Loss covers the reply's tokens up to and including the end-of-turn
token (``<|im_end|>``); the generation prefix, the prompt and anything after the end-of-turn are not
trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .json_rows import Row
from .packing import IGNORE_INDEX, Sample
from .tokenizer import end_of_turn_id

ROLES = ("system", "user", "assistant", "tool")
INSTRUCTION_KEYS = ("instruction", "query")
OUTPUT_KEYS = ("output", "content", "response")


def row_to_messages(row: Row, path: str | Path) -> list[dict[str, Any]]:
    """The chat messages of one row (alpaca rows become ``[system], user, assistant``)."""
    data, where = row.data, row.where(path)
    if "messages" in data:
        return _check_messages(data["messages"], where)
    instruction = next((k for k in INSTRUCTION_KEYS if k in data), None)
    output = next((k for k in OUTPUT_KEYS if k in data), None)
    if instruction is None or output is None:
        missing = []
        if instruction is None:
            missing.append(" or ".join(repr(k) for k in INSTRUCTION_KEYS))
        if output is None:
            missing.append(" or ".join(repr(k) for k in OUTPUT_KEYS))
        raise ValueError(
            f"{where}: missing key {' and '.join(missing)} (or a 'messages' list); "
            f"the row has keys {sorted(data)}"
        )
    text = {k: _string(data, k, where) for k in (instruction, output, "input", "system")}
    user = text[instruction] + ("\n" + text["input"] if text["input"] else "")
    messages = [{"role": "system", "content": text["system"]}] if text["system"] else []
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": text[output]}]


def _string(data: dict, key: str, where: str) -> str:
    value = data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: key {key!r} must hold a string, got {type(value).__name__}")
    return value


def _check_messages(messages: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for j, m in enumerate(messages, start=1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: message {j} must be an object with keys 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: message {j} has role {m['role']!r}; expected one of {ROLES}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}: message {j} content must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant message, so nothing to train on")
    if messages[0]["role"] == "assistant":
        raise ValueError(f"{where}: the conversation starts with an assistant message (no prompt before it)")
    return messages


class ChatEncoder:
    """Encode conversations with a tokenizer's chat template into samples (``tokens``, shifted ``labels``).

    ``template_kwargs`` go to ``apply_chat_template`` (e.g. ``{"enable_thinking": False}`` for Qwen3's
    hybrid template, which then puts the empty think block in the prompt).
    """

    def __init__(self, tokenizer, template_kwargs: dict[str, Any] | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template (load it with data.load_tokenizer)")
        self.tokenizer = tokenizer
        self.template_kwargs = dict(template_kwargs or {})
        self.end_of_turn = end_of_turn_id(tokenizer)

    def render(self, messages: list[dict], add_generation_prompt: bool, where: str) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **self.template_kwargs
            )
        except Exception as e:  # jinja errors, e.g. a template's own role checks
            raise ValueError(f"{where}: the chat template failed on this conversation: {e}") from e

    def pieces(self, messages: list[dict], where: str) -> list[tuple[str, bool]]:
        """The rendered conversation cut into ``(text, is_reply)`` pieces, in order."""
        full = self.render(messages, False, where)
        pieces: list[tuple[str, bool]] = []
        pos = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], True, where)
            upto = self.render(messages[: i + 1], False, where)
            if not upto.startswith(prompt) or not full.startswith(upto) or len(prompt) < pos:
                raise ValueError(
                    f"{where}: the chat template is not prefix-stable at message {i + 1}: the rendering "
                    "up to this assistant turn (with and without the generation prompt) is not a prefix of "
                    "the whole conversation's rendering, so the reply's tokens cannot be located. Templates "
                    "that rewrite earlier turns (Qwen3's thinking template drops <think> from past turns) "
                    "cannot encode multi-turn rows: use chat_template='qwen3_next_instruct'."
                )
            if len(prompt) > pos:
                pieces.append((full[pos : len(prompt)], False))
            pieces.append((full[len(prompt) : len(upto)], True))
            pos = len(upto)
        if pos < len(full):
            pieces.append((full[pos:], False))
        return pieces

    def encode(self, conversations: Sequence[list[dict]], wheres: Sequence[str]) -> list[Sample]:
        """One sample per conversation: int64 ``tokens`` [n] and ``labels`` [n] (IGNORE_INDEX off-reply)."""
        all_pieces = [self.pieces(msgs, w) for msgs, w in zip(conversations, wheres)]
        flat = [text for pieces in all_pieces for text, _ in pieces]
        ids = iter(self._tokenize(flat))
        samples = []
        for pieces, where in zip(all_pieces, wheres):
            tokens: list[int] = []
            in_loss: list[bool] = []
            for _, is_reply in pieces:
                piece = next(ids)
                k = len(piece) if not is_reply else self._reply_length(piece)
                tokens += piece
                in_loss += [is_reply] * k + [False] * (len(piece) - k)
            t = np.asarray(tokens, dtype=np.int64)
            mask = np.asarray(in_loss, dtype=bool)
            labels = np.full(len(t), IGNORE_INDEX, dtype=np.int64)
            labels[:-1] = np.where(mask[1:], t[1:], IGNORE_INDEX)
            samples.append((t, labels))
        return samples

    def _reply_length(self, piece: list[int]) -> int:
        # the reply's tokens up to and including its end-of-turn token
        if self.end_of_turn is not None and self.end_of_turn in piece:
            return piece.index(self.end_of_turn) + 1
        return len(piece)

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        tok = self.tokenizer
        backend = getattr(tok, "backend_tokenizer", None) if getattr(tok, "is_fast", False) else None
        encode = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
        if encode is not None:
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
