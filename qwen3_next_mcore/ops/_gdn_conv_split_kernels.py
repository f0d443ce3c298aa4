"""The Triton kernels of :mod:`qwen3_next_mcore.ops.gdn_conv_split` (imported only when they are first
launched, so the package imports without Triton).

Layout: the projection ``x`` is ``[B, T, G, C]`` per key-head group g with ``C = 2*DK + 2*RDV`` channels
``[q (DK), k (DK), v (RDV), z (RDV)]``, batch and token strides free, the ``[G, C]`` dims contiguous; the
conv weight is ``[G*CC, W]`` over the ``CC = 2*DK + RDV`` conv channels of each group. A program takes BD
channels of one group (never straddling two parts: BD divides DK and RDV) and BT tokens of one sequence.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _program(T, C: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """This program's group g, first channel c0 within it, tokens t [BT], channel offsets j [BD], the mask
    of tokens inside the sequence, the batch index b and the flat rows ``b*T + t`` (int64)."""
    NB: tl.constexpr = C // BD
    pid_c, pid_t, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_t * BT + tl.arange(0, BT)
    return pid_c // NB, (pid_c % NB) * BD, t, tl.arange(0, BD), t < T, b, b.to(tl.int64) * T + t


@triton.jit
def _tap(x_row, t, t_ok, p_t, sxt, W: tl.constexpr, i: tl.constexpr, HAS_POS: tl.constexpr):
    """The fp32 ``[BT, BD]`` tile of x that tap i multiplies for output tokens t: token ``t - (W - 1 - i)``,
    zero before the sequence (with packed sequences, ``p_t`` = each token's position in its own)."""
    tt = t - (W - 1 - i)
    ok = t_ok & (tt >= 0)
    if HAS_POS:
        ok = ok & (p_t >= W - 1 - i)  # same packed sequence
    return tl.load(x_row + tt[:, None].to(tl.int64) * sxt, mask=ok[:, None], other=0.0).to(tl.float32)


@triton.jit
def _pre_activation(x_row, wc, t, t_ok, p_t, sxt, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
                    HAS_POS: tl.constexpr):
    """The conv's output before the SiLU for tokens t: ``sum_i w[:, i] * tap_i``, fp32 ``[BT, BD]``."""
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    for i in tl.static_range(W):
        acc += _tap(x_row, t, t_ok, p_t, sxt, W, i, HAS_POS) * tl.load(wc + i).to(tl.float32)[None, :]
    return acc


@triton.jit
def fwd_kernel(x, w, out, pos, T, sxb, sxt, n_q, n_v, G: tl.constexpr, DK: tl.constexpr, RDV: tl.constexpr,
               W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, HAS_POS: tl.constexpr):
    # forward: q, k, v = silu(conv) and z copied, into one allocation q | k | v | z (q, k [B,T,G,DK]; v, z
    # [B,T,G*r,dv])
    C: tl.constexpr = 2 * DK + 2 * RDV
    CC: tl.constexpr = 2 * DK + RDV
    g, c0, t, j, t_ok, b, rows = _program(T, C, BT, BD)
    x_row = x + b.to(tl.int64) * sxb + g * C + c0 + j[None, :]
    is_k = c0 >= DK
    is_v = c0 >= 2 * DK
    is_z = c0 >= CC
    base = tl.where(is_z, 2 * n_q + n_v, tl.where(is_v, 2 * n_q, tl.where(is_k, n_q, 0))).to(tl.int64)
    width = tl.where(is_v, G * RDV, G * DK)
    col = tl.where(is_z, g * RDV + c0 - CC, tl.where(is_v, g * RDV + c0 - 2 * DK,
                                                      tl.where(is_k, g * DK + c0 - DK, g * DK + c0)))
    p_out = out + base + rows[:, None] * width + col + j[None, :]
    if is_z:
        zv = tl.load(x_row + t[:, None].to(tl.int64) * sxt, mask=t_ok[:, None], other=0.0)
        tl.store(p_out, zv, mask=t_ok[:, None])
    else:
        p_t = tl.load(pos + t, mask=t_ok, other=0) if HAS_POS else t
        pre = _pre_activation(x_row, w + (g * CC + c0 + j) * W, t, t_ok, p_t, sxt, W, BT, BD, HAS_POS)
        tl.store(p_out, (pre * tl.sigmoid(pre)).to(out.dtype.element_ty), mask=t_ok[:, None])


@triton.jit
def bwd_dpre_kernel(x, w, dq, dk, dv, dpre, dw, pos, T, sxb, sxt, NT, G: tl.constexpr, DK: tl.constexpr,
                    RDV: tl.constexpr, W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, HAS_POS: tl.constexpr):
    # backward, pass 1 over the conv channels: dpre[t] = dy[t] * silu'(pre[t]) with the pre-activation
    # recomputed from x, written for pass 2; this block's partial dw[c, i] = sum_t dpre[t] x[t-(W-1)+i]
    C: tl.constexpr = 2 * DK + 2 * RDV
    CC: tl.constexpr = 2 * DK + RDV
    g, c0, t, j, t_ok, b, rows = _program(T, CC, BT, BD)
    # this block's gradient: dq [B,T,G,DK], dk like it, dv [B,T,G*r,dv], each where autograd left it
    is_k = c0 >= DK
    is_v = c0 >= 2 * DK
    dy_row = tl.where(is_v, G * RDV, G * DK)
    col = tl.where(is_v, g * RDV + c0 - 2 * DK, tl.where(is_k, g * DK + c0 - DK, g * DK + c0))
    off = rows[:, None] * dy_row + col + j[None, :]
    if is_v:
        p_dy = dv + off
    elif is_k:
        p_dy = dk + off
    else:
        p_dy = dq + off
    x_row = x + b.to(tl.int64) * sxb + g * C + c0 + j[None, :]
    p_t = tl.load(pos + t, mask=t_ok, other=0) if HAS_POS else t
    pre = _pre_activation(x_row, w + (g * CC + c0 + j) * W, t, t_ok, p_t, sxt, W, BT, BD, HAS_POS)
    dyv = tl.load(p_dy, mask=t_ok[:, None], other=0.0).to(tl.float32)
    sig = tl.sigmoid(pre)
    dp = dyv * sig * (1.0 + pre * (1.0 - sig))
    tl.store(dpre + rows[:, None] * (G * CC) + g * CC + c0 + j[None, :], dp.to(dpre.dtype.element_ty),
             mask=t_ok[:, None])
    p_dw = dw + ((b * NT + tl.program_id(1)).to(tl.int64) * (G * CC) + g * CC + c0 + j) * W
    for i in tl.static_range(W):
        tl.store(p_dw + i, tl.sum(dp * _tap(x_row, t, t_ok, p_t, sxt, W, i, HAS_POS), axis=0))


@triton.jit
def bwd_dx_kernel(w, dpre, dz, dx, pos, T, sdb, sdt, G: tl.constexpr, DK: tl.constexpr, RDV: tl.constexpr,
                  W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, HAS_POS: tl.constexpr):
    # backward, pass 2 over all projection channels: dx[t] = sum_s w[W-1-s] dpre[t+s] for the conv
    # channels, dz copied for z: the projection's whole gradient written once
    C: tl.constexpr = 2 * DK + 2 * RDV
    CC: tl.constexpr = 2 * DK + RDV
    g, c0, t, j, t_ok, b, rows = _program(T, C, BT, BD)
    p_dx = dx + b.to(tl.int64) * sdb + t[:, None].to(tl.int64) * sdt + g * C + c0 + j[None, :]
    if c0 >= CC:  # z: its gradient copied into place
        dzv = tl.load(dz + rows[:, None] * (G * RDV) + g * RDV + c0 - CC + j[None, :], mask=t_ok[:, None],
                      other=0.0)
        tl.store(p_dx, dzv, mask=t_ok[:, None])
    else:
        wc = w + (g * CC + c0 + j) * W
        p_dp = dpre + rows[:, None] * (G * CC) + g * CC + c0 + j[None, :]
        acc = tl.zeros((BT, BD), dtype=tl.float32)
        for s in tl.static_range(W):  # x[t] feeds out[t + s] through tap W - 1 - s
            u_ok = (t + s) < T
            if HAS_POS:
                u_ok = u_ok & (tl.load(pos + t + s, mask=u_ok, other=0) >= s)  # inside one sequence
            dp = tl.load(p_dp + s * (G * CC), mask=u_ok[:, None], other=0.0).to(tl.float32)
            acc += dp * tl.load(wc + (W - 1 - s)).to(tl.float32)[None, :]
        tl.store(p_dx, acc.to(dx.dtype.element_ty), mask=t_ok[:, None])
