"""``qwen3-next-mcore config``: inspect presets and HF configs."""

from __future__ import annotations

import json


def register(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text)
    cmds = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = cmds.add_parser("show", help="print a preset or a HF config as our typed config (JSON)")
    src = show.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a preset name (see 'config list')")
    src.add_argument("--hf", metavar="PATH", help="a HF config.json or a checkpoint folder")
    show.add_argument("--as-hf", action="store_true", help="print the HF config.json form instead")
    show.set_defaults(func=_show)
    lst = cmds.add_parser("list", help="list the presets")
    lst.set_defaults(func=_list)


def _show(args) -> int:
    from ..config import Qwen3NextConfig, get_preset

    cfg = get_preset(args.preset) if args.preset else Qwen3NextConfig.from_hf(args.hf)
    data = cfg.to_hf() if args.as_hf else cfg.model_dump(mode="json")
    print(json.dumps(data, indent=2))
    return 0


def _list(args) -> int:
    from ..config import get_preset, preset_names

    for name in preset_names():
        c = get_preset(name)
        print(f"{name:22s} layers={c.num_hidden_layers:<3d} hidden={c.hidden_size:<5d} "
              f"experts={c.num_experts}x top{c.num_experts_per_tok} mtp={c.mtp_num_layers}")
    return 0
