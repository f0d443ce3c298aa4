"""``qwen3-next-mcore convert``: HF <-> megatron-core checkpoints (see docs/convert.md)."""

from __future__ import annotations

import os


def register(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text)
    actions = p.add_subparsers(dest="convert_command", metavar="DIRECTION", required=True)

    h2m = actions.add_parser(
        "hf-to-mcore",
        help="HF safetensors folder -> megatron-core torch_dist checkpoint (Megatron-LM --load reads it)",
        description="Stream a Hugging Face Qwen3-Next folder into a megatron-core torch_dist checkpoint: "
        "OUTPUT/release/ plus OUTPUT/latest_checkpointed_iteration.txt, the configs and tokenizer files. "
        "One CPU process, bounded memory; under torchrun every rank writes a share (shared filesystem). "
        "The checkpoint loads at any parallel layout; the sizes below are checked and recorded.",
    )
    h2m.add_argument("--hf-dir", required=True, metavar="DIR", help="the HF folder (config.json, safetensors)")
    h2m.add_argument("--output", required=True, metavar="OUT", help="the checkpoint folder to create")
    h2m.add_argument("--tensor-parallel", type=int, default=1, metavar="N")
    h2m.add_argument("--pipeline-parallel", type=int, default=1, metavar="N")
    h2m.add_argument("--expert-parallel", type=int, default=1, metavar="N")
    h2m.add_argument("--expert-tensor-parallel", type=int, default=1, metavar="N")
    h2m.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                     help="store every tensor in this dtype (default: as stored in the HF folder)")
    h2m.add_argument("--allow-extra", action="store_true", help="skip HF tensors the model does not use")
    _common(h2m)
    h2m.set_defaults(func=_hf_to_mcore)

    m2h = actions.add_parser(
        "mcore-to-hf",
        help="megatron-core checkpoint (any TP/PP/EP) -> HF safetensors folder, mtp.* included",
        description="Stream a megatron-core checkpoint (converted, or saved by training at any TP/PP/EP) into "
        "a Hugging Face folder that transformers' from_pretrained loads: config.json, sharded safetensors "
        "and their index (mtp.* weights included, per-expert names), tokenizer files.",
    )
    m2h.add_argument("--mcore-dir", required=True, metavar="DIR",
                     help="a folder with latest_checkpointed_iteration.txt, or a torch_dist folder")
    m2h.add_argument("--output", required=True, metavar="DIR2", help="the HF folder to create")
    m2h.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default: 5GB)")
    m2h.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                     help="write every tensor in this dtype (default: as stored in the checkpoint)")
    m2h.add_argument("--config", default=None, metavar="PATH",
                     help="the model's HF config.json (only when none is stored beside the checkpoint)")
    _common(m2h)
    m2h.set_defaults(func=_mcore_to_hf)


def _common(p) -> None:
    p.add_argument("--bucket-size", default="512MiB",
                   help="bytes read and written per step; bounds memory (default: 512MiB)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    p.add_argument("--no-sync", action="store_true",
                   help="skip the fsync of the output before it is renamed into place (faster on slow disks; a "
                   "power loss soon after may then leave damaged files)")


def _hf_to_mcore(args) -> int:
    from ..convert import convert_hf_to_mcore

    report = convert_hf_to_mcore(
        args.hf_dir, args.output, tensor_parallel=args.tensor_parallel, pipeline_parallel=args.pipeline_parallel,
        expert_parallel=args.expert_parallel, expert_tensor_parallel=args.expert_tensor_parallel,
        dtype=args.dtype, allow_extra=args.allow_extra, bucket_size=args.bucket_size, sync=not args.no_sync,
        progress=False if args.no_progress else None)
    if os.environ.get("RANK", "0") == "0":
        print(report)
    return 0


def _mcore_to_hf(args) -> int:
    from ..convert import convert_mcore_to_hf

    report = convert_mcore_to_hf(args.mcore_dir, args.output, max_shard_size=args.max_shard_size, dtype=args.dtype,
                                 config=args.config, bucket_size=args.bucket_size, sync=not args.no_sync,
                                 progress=False if args.no_progress else None)
    print(report)
    return 0
