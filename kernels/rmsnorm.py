"""RMSNorm, optionally fused with the residual add before it.

``y = norm(x) * w`` with ``norm(x) = x * rsqrt(mean(x²) + eps)`` in fp32. Two rounding orders, as in transformers:

- ``offset=False`` (Llama, Qwen, Mistral, Phi-3): ``w * norm(x).to(x.dtype)``, the product in the promoted dtype;
- ``offset=True`` (Gemma): ``(norm(x) * (1 + w.float())).to(x.dtype)``.

With ``residual``: ``s = x + residual`` (rounded to the dtype, like ``residual + hidden_states``) is normalised and
returned beside ``y`` as the next residual. Saved for backward: the normalised input (x or s) and one fp32 rstd per
row. The weight gradient is computed only when the weight trains (full fine-tuning); for LoRA the norms are frozen.

A program handles a tile of ROWS rows (`rms_tile`): one row by default, which measured fastest on an H200 (several
rows per program, ~16 KiB of input each, was 4-15 % slower at every shape); the per-element arithmetic does not depend
on the tile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import next_pow2


# Each program takes a tile of ROWS rows x BLOCK columns (BLOCK = the row length rounded up to a power of two). One row
# per program is the default: on an H200 (2026-12-01, `benchmarks/results/kernels_graphtimed_H200.md`, fwd+bwd timed from a
# CUDA graph) it beat tiles of ~16 KiB of input (8 / 4 / 2 rows at d = 896 / 2048 / 4096) at every T: e.g. Llama-1B at
# 4k tokens 73 % of the copy bandwidth against 63 %. `rows` (a power of two) is a tuning knob for the benchmark. The
# warps per tile were also swept (1 to 16, `benchmarks/results/tune_grids_H200.md`): none beat this choice.


def rms_tile(n_cols: int, rows: int | None = None) -> tuple[int, int, int]:
    """(BLOCK, ROWS, num_warps) for rows of `n_cols` elements: one row per program, or `rows` (a power of two) when
    given; num_warps from the tile's element count (≈ 32 elements per thread, 4 to 16 warps)."""
    block = next_pow2(n_cols)
    if rows is None:
        rows = 1
    elif rows < 1 or rows & (rows - 1):
        raise ValueError(f"rows per program must be a power of two, got {rows}")
    n = rows * block
    warps = 4 if n <= 2048 else 8 if n <= 8192 else 16
    return block, int(rows), warps


@triton.jit
def _rms_fwd_kernel(x_ptr, r_ptr, s_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, n_cols, eps, sx, sr, ss, sy,
                    OFFSET: tl.constexpr, HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    rm = rows < n_rows
    cm = cols < n_cols
    m = rm[:, None] & cm[None, :]
    r64 = rows.to(tl.int64)[:, None]
    c2 = cols[None, :]
    xr = tl.load(x_ptr + r64 * sx + c2, mask=m, other=0.0)
    if HAS_RES:
        rr = tl.load(r_ptr + r64 * sr + c2, mask=m, other=0.0)
        xr = (xr.to(tl.float32) + rr.to(tl.float32)).to(xr.dtype)
        tl.store(s_ptr + r64 * ss + c2, xr, mask=m)
    x = xr.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    tl.store(rstd_ptr + rows, rstd, mask=rm)
    xn = x * rstd[:, None]
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    if OFFSET:
        y = xn * (1.0 + w)
    else:
        y = xn.to(xr.dtype).to(tl.float32) * w
    tl.store(y_ptr + r64 * sy + c2, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rms_bwd_kernel(dy_ptr, ds_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, n_cols, sdy, sds, sx, sdx,
                    tiles_per_prog, OFFSET: tl.constexpr, HAS_DS: tl.constexpr, WANT_DW: tl.constexpr,
                    ROWS: tl.constexpr, BLOCK: tl.constexpr):
    "Program p takes tiles p·tiles_per_prog … (p+1)·tiles_per_prog - 1 of ROWS rows; with WANT_DW it writes row p of dw."
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    cm = cols < n_cols
    c2 = cols[None, :]
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    if OFFSET:
        w = w + 1.0
    w = w[None, :]
    dw = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    for t in range(0, tiles_per_prog):
        rows = (pid * tiles_per_prog + t) * ROWS + tl.arange(0, ROWS)
        rm = rows < n_rows
        m = rm[:, None] & cm[None, :]
        r64 = rows.to(tl.int64)[:, None]
        dy = tl.load(dy_ptr + r64 * sdy + c2, mask=m, other=0.0).to(tl.float32)
        xr = tl.load(x_ptr + r64 * sx + c2, mask=m, other=0.0)
        x = xr.to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rm, other=0.0)[:, None]
        xn = x * rstd
        dyw = dy * w
        dx = rstd * (dyw - xn * (tl.sum(dyw * xn, axis=1) / n_cols)[:, None])
        if HAS_DS:
            dx += tl.load(ds_ptr + r64 * sds + c2, mask=m, other=0.0).to(tl.float32)
        tl.store(dx_ptr + r64 * sdx + c2, dx.to(dx_ptr.dtype.element_ty), mask=m)
        if WANT_DW:
            if OFFSET:
                dw += dy * xn
            else:
                dw += dy * xn.to(xr.dtype).to(tl.float32)
    if WANT_DW:
        tl.store(dw_ptr + pid * n_cols + cols, tl.sum(dw, axis=0), mask=cm)


def _2d(t):
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_forward(x, w, eps, offset=False, residual=None, rows=None):
    """(y, the normalised input s or x as 2-D rows, rstd per row). rows: rows per program (a power of two; None:
    `rms_tile`'s choice)."""
    x2 = _2d(x)
    R, C = x2.shape
    ydt = x.dtype if offset else torch.promote_types(x.dtype, w.dtype)
    y = torch.empty((R, C), dtype=ydt, device=x.device)
    rstd = torch.empty(R, dtype=torch.float32, device=x.device)
    if residual is not None:
        r2 = _2d(residual)
        s = torch.empty((R, C), dtype=x.dtype, device=x.device)
    else:
        r2 = s = x2
    BLOCK, ROWS, warps = rms_tile(C, rows)
    _rms_fwd_kernel[(triton.cdiv(R, ROWS),)](x2, r2, s, w, y, rstd, R, C, float(eps), x2.stride(0), r2.stride(0),
                                              s.stride(0), y.stride(0), OFFSET=bool(offset),
                                              HAS_RES=residual is not None, ROWS=ROWS, BLOCK=BLOCK, num_warps=warps)
    return y.view(*x.shape[:-1], C), (s if residual is not None else x2), rstd


def rms_backward(dy, ds, xin, w, rstd, offset, want_dw, rows=None):
    """(dx, dw or None). Frozen weight: one tile of rows per program. Trainable weight: at most 4 programs per SM, each
    looping over its tiles and writing one fp32 row of partial dw sums, which one torch sum then reduces."""
    dy2 = _2d(dy)
    R, C = xin.shape
    dx = torch.empty((R, C), dtype=xin.dtype, device=xin.device)
    BLOCK, ROWS, warps = rms_tile(C, rows)
    tiles = max(1, triton.cdiv(R, ROWS))
    if want_dw:
        n_sm = torch.cuda.get_device_properties(xin.device).multi_processor_count if xin.is_cuda else 4
        progs = max(1, min(tiles, 4 * n_sm))
    else:
        progs = tiles
    tpp = triton.cdiv(tiles, progs)
    progs = triton.cdiv(tiles, tpp)
    dwp = torch.empty((progs, C), dtype=torch.float32, device=xin.device) if want_dw else rstd
    ds2 = _2d(ds) if ds is not None else dy2
    _rms_bwd_kernel[(progs,)](dy2, ds2, xin, w, rstd, dx, dwp, R, C, dy2.stride(0), ds2.stride(0), xin.stride(0),
                              dx.stride(0), tpp, OFFSET=bool(offset), HAS_DS=ds is not None, WANT_DW=bool(want_dw),
                              ROWS=ROWS, BLOCK=BLOCK, num_warps=warps)
    dw = dwp.sum(0).to(w.dtype) if want_dw else None
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps, offset=False, rows=None):
        y, xin, rstd = rms_forward(x, w, eps, offset, rows=rows)
        ctx.offset, ctx.shape, ctx.rows = offset, x.shape, rows
        ctx.save_for_backward(xin, w, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        xin, w, rstd = ctx.saved_tensors
        dx, dw = rms_backward(dy, None, xin, w, rstd, ctx.offset, ctx.needs_input_grad[1], rows=ctx.rows)
        return dx.view(ctx.shape), dw, None, None, None


class AddRMSNormFunction(torch.autograd.Function):
    "(y, s) = (rmsnorm(x + residual), x + residual)."

    @staticmethod
    def forward(ctx, x, residual, w, eps, offset=False, rows=None):
        y, s, rstd = rms_forward(x, w, eps, offset, residual, rows=rows)
        ctx.offset, ctx.shape, ctx.rows = offset, x.shape, rows
        ctx.save_for_backward(s, w, rstd)
        return y, s.view(x.shape)

    @staticmethod
    def backward(ctx, dy, ds):
        s, w, rstd = ctx.saved_tensors
        dx, dw = rms_backward(dy, ds, s, w, rstd, ctx.offset, ctx.needs_input_grad[2], rows=ctx.rows)
        dx = dx.view(ctx.shape)
        return dx, dx, dw, None, None, None


def rms_norm(x, w, eps, offset=False, rows: int | None = None):
    "rows: rows per program (a power of two) instead of `rms_tile`'s choice (a tuning knob for the benchmark)."
    return RMSNormFunction.apply(x, w, eps, offset, rows)


def add_rms_norm(x, residual, w, eps, offset=False, rows: int | None = None):
    return AddRMSNormFunction.apply(x, residual, w, eps, offset, rows)


def reference(x, w, eps, offset=False, residual=None):
    "Plain PyTorch, as transformers' Llama/Gemma RMSNorm modules compute it; returns y, or (y, s) with residual."
    s = x if residual is None else residual + x
    xf = s.float()
    xn = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = (xn * (1.0 + w.float())).type_as(s) if offset else w * xn.to(s.dtype)
    return y if residual is None else (y, s)
