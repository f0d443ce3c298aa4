"""The Triton kernels of :mod:`qwen3_next_mcore.ops.moe_swiglu` (imported when first launched, so the package
imports without Triton).

A program takes ROWS rows; a row's gate and up halves (F values each, the ``[rows, 2F]`` projection's two
halves) fit in one tile of BLOCK_F >= F. Everything is computed in fp32 and rounded once on store.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _row_tiles(pid, R, F, ROWS: tl.constexpr, BLOCK_F: tl.constexpr):
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_F)
    ok = (rows < R)[:, None] & (cols < F)[None, :]
    return rows, rows[:, None].to(tl.int64), cols[None, :], ok


@triton.jit
def fwd_kernel(h_ptr, p_ptr, out_ptr, R, F, ROWS: tl.constexpr, BLOCK_F: tl.constexpr):
    """out [R, F] = silu(gate) * up * p, h [R, 2F] = [gate, up], p [R] fp32."""
    rows, r, c, ok = _row_tiles(tl.program_id(0), R, F, ROWS, BLOCK_F)
    gate = tl.load(h_ptr + r * (2 * F) + c, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + r * (2 * F) + F + c, mask=ok, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + rows, mask=rows < R, other=0.0).to(tl.float32)
    act = gate * tl.sigmoid(gate) * up * p[:, None]
    tl.store(out_ptr + r * F + c, act.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def bwd_kernel(h_ptr, p_ptr, g_ptr, dh_ptr, dp_ptr, R, F, ROWS: tl.constexpr, BLOCK_F: tl.constexpr):
    """From the output gradient g [R, F]: dh [R, 2F] (d gate, d up) and dp [R] fp32 = sum(silu(gate) * up * g)."""
    rows, r, c, ok = _row_tiles(tl.program_id(0), R, F, ROWS, BLOCK_F)
    gate = tl.load(h_ptr + r * (2 * F) + c, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(h_ptr + r * (2 * F) + F + c, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + r * F + c, mask=ok, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + rows, mask=rows < R, other=0.0).to(tl.float32)
    s = tl.sigmoid(gate)
    silu = gate * s
    gp = g * p[:, None]
    d_gate = gp * s * (1.0 + gate * (1.0 - s)) * up
    d_up = gp * silu
    tl.store(dh_ptr + r * (2 * F) + c, d_gate.to(dh_ptr.dtype.element_ty), mask=ok)
    tl.store(dh_ptr + r * (2 * F) + F + c, d_up.to(dh_ptr.dtype.element_ty), mask=ok)
    tl.store(dp_ptr + rows, tl.sum(silu * up * g, axis=1), mask=rows < R)
