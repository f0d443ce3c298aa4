"""Registers, spills and global load/store widths of our Triton kernels for Hopper, without a GPU.

    python -m benchmarks.kernel_resources            # any machine with Triton (its wheel carries ptxas)

Compiles the fused GDN conv + split kernels (ops/gdn_conv_split.py) for sm_90 at the 80B widths with the
block sizes in use (FWD_BLOCKS, BWD_BLOCKS) and the argument specialisations a real launch gets (every
pointer 16-byte aligned, every integer a multiple of 16), then reads the cubin's resource usage with the
cuobjdump that Triton ships and counts the PTX's global loads and stores by width: ``v4.b32`` is a
16-byte vector access, ``b16`` one bf16 element. What it cannot tell is time: that needs the GPU
(``python -m benchmarks.conv_split_blocks``). The Triton here may be newer than the GPU machine's.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from qwen3_next_mcore.ops.gdn_conv_split import BWD_BLOCKS, FWD_BLOCKS, _kernels

G, DK, RDV, W = 16, 128, 256, 4  # Qwen3-Next-80B: 16 key-head groups, dk = dv = 128, 2 value heads per group
BF16 = "*bf16"


def resources(kernel, signature: dict, constexprs: dict, num_warps: int) -> dict:
    """Compile ``kernel`` for sm_90 and return its registers, spill stores, shared memory and the counts of
    global loads/stores by PTX width."""
    attrs = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(signature.values()) if kind != "constexpr"}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    ptx = compiled.asm["ptx"]
    return {"registers": int(fields.get("REG", 0)), "local_bytes": int(fields.get("LOCAL", 0)),
            "shared_bytes": int(fields.get("SHARED", 0)),
            "loads": dict(Counter(re.findall(r"ld\.global((?:\.[a-z0-9]+)*)", ptx))),
            "stores": dict(Counter(re.findall(r"st\.global((?:\.[a-z0-9]+)*)", ptx)))}


def report() -> list[tuple[str, dict, int, dict]]:
    """(kernel name, its blocks, its warps, :func:`resources`) for each conv + split kernel."""
    fwd, dpre, dx = _kernels()
    common = {"G": G, "DK": DK, "RDV": RDV, "W": W, "HAS_POS": False, "pos": None}
    tail = {"G": "constexpr", "DK": "constexpr", "RDV": "constexpr", "W": "constexpr", "BT": "constexpr",
            "BD": "constexpr", "HAS_POS": "constexpr"}
    cases = [
        ("forward", fwd, {"x": BF16, "w": BF16, "out": BF16, "pos": "constexpr", "T": "i32", "sxb": "i32",
                          "sxt": "i32", "n_q": "i32", "n_v": "i32", **tail},
         {"BT": FWD_BLOCKS["block_t"], "BD": FWD_BLOCKS["block_d"]}, FWD_BLOCKS["num_warps"]),
        ("backward pass 1 (pre-SiLU gradient, dw)", dpre,
         {"x": BF16, "w": BF16, "dq": BF16, "dk": BF16, "dv": BF16, "dpre": BF16, "dw": "*fp32", "pos": "constexpr",
          "T": "i32", "sxb": "i32", "sxt": "i32", "NT": "i32", **tail},
         {"BT": BWD_BLOCKS["dpre_block_t"], "BD": BWD_BLOCKS["dpre_block_d"]}, BWD_BLOCKS["dpre_warps"]),
        ("backward pass 2 (dx)", dx, {"w": BF16, "dpre": BF16, "dz": BF16, "dx": BF16, "pos": "constexpr",
                                      "T": "i32", "sdb": "i32", "sdt": "i32", **tail},
         {"BT": BWD_BLOCKS["dx_block_t"], "BD": BWD_BLOCKS["dx_block_d"]}, BWD_BLOCKS["dx_warps"]),
    ]
    return [(name, blocks, warps, resources(kernel, signature, {**common, **blocks}, warps))
            for name, kernel, signature, blocks, warps in cases]


def main() -> None:
    print(f"Triton {triton.__version__}, sm_90, G={G} dk={DK} r*dv={RDV} W={W}, bf16")
    print("| kernel | BT x BD, warps | registers | spilled bytes | shared bytes | global loads | global stores |")
    print("|---|---|---|---|---|---|---|")
    for name, blocks, warps, r in report():
        print(f"| {name} | {blocks['BT']} x {blocks['BD']}, {warps} | {r['registers']} | {r['local_bytes']} | "
              f"{r['shared_bytes']} | {r['loads']} | {r['stores']} |")


if __name__ == "__main__":
    main()
