"""The Triton kernel of :mod:`qwen3_next_mcore.ops.router_topk` (imported when first launched, so the package
imports without Triton).

A program takes ROWS rows of the ``[N, E]`` scores. Each score becomes one int64 key that orders exactly as
the floats do and breaks ties by column: the high 32 bits are the float32's bits made sortable as a signed
integer (negative floats have their magnitude bits flipped), the low 32 bits ``BLOCK_E - 1 - column``, so
equal scores prefer the lower column (-0.0 is made +0.0 first: it equals +0.0). Every key is distinct, so
K rounds of "take the row's largest key, then knock it out" give the top K in descending order, whatever
the values (equal scores, -inf).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def row_topk_kernel(x_ptr, out_ptr, N, E, stride_n, K: tl.constexpr, BLOCK_E: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < N
    ok = row_ok[:, None] & (cols[None, :] < E)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_n + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 -> +0.0: equal scores, ordered by column like every other tie
    bits = x.to(tl.int32, bitcast=True)
    sortable = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed order of the ints == order of the floats
    low = (BLOCK_E - 1 - cols).to(tl.int64)
    key = (sortable.to(tl.int64) << 32) | low[None, :]
    gone = -9223372036854775807 - 1  # int64 min: below every key
    key = tl.where(ok, key, gone)
    for j in tl.static_range(K):
        best = tl.max(key, axis=1)
        col = BLOCK_E - 1 - (best & 0xFFFFFFFF)
        tl.store(out_ptr + rows.to(tl.int64) * K + j, col, mask=row_ok)
        key = tl.where(key == best[:, None], gone, key)
