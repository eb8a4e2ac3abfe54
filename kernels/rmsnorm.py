"""RMSNorm, optionally fused with the residual add before it.

``y = norm(x) * w`` with ``norm(x) = x * rsqrt(mean(x²) + eps)`` in fp32. Two rounding orders, as in transformers:

- ``offset=False`` (Llama, Qwen, Mistral, Phi-3): ``w * norm(x).to(x.dtype)``, the product in the promoted dtype;
- ``offset=True`` (Gemma): ``(norm(x) * (1 + w.float())).to(x.dtype)``.

With ``residual``: ``s = x + residual`` (rounded to the dtype, like ``residual + hidden_states``) is normalised and
returned beside ``y`` as the next residual. Saved for backward: the normalised input (x or s) and one fp32 rstd per
row. The weight gradient is computed only when the weight trains (full fine-tuning); for LoRA the norms are frozen.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import row_block


@triton.jit
def _rms_fwd_kernel(x_ptr, r_ptr, s_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, eps, sx, sr, ss, sy,
                    OFFSET: tl.constexpr, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < n_cols
    xr = tl.load(x_ptr + row * sx + cols, mask=m, other=0.0)
    if HAS_RES:
        rr = tl.load(r_ptr + row * sr + cols, mask=m, other=0.0)
        xr = (xr.to(tl.float32) + rr.to(tl.float32)).to(xr.dtype)
        tl.store(s_ptr + row * ss + cols, xr, mask=m)
    x = xr.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(rstd_ptr + row, rstd)
    xn = x * rstd
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    if OFFSET:
        y = xn * (1.0 + w)
    else:
        y = xn.to(xr.dtype).to(tl.float32) * w
    tl.store(y_ptr + row * sy + cols, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rms_bwd_kernel(dy_ptr, ds_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, n_cols, sdy, sds, sx, sdx,
                    rows_per_prog, OFFSET: tl.constexpr, HAS_DS: tl.constexpr, WANT_DW: tl.constexpr,
                    BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < n_cols
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    if OFFSET:
        w = w + 1.0
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    start = pid * rows_per_prog
    for i in range(0, rows_per_prog):
        row = (start + i).to(tl.int64)
        if row < n_rows:
            dy = tl.load(dy_ptr + row * sdy + cols, mask=m, other=0.0).to(tl.float32)
            xr = tl.load(x_ptr + row * sx + cols, mask=m, other=0.0)
            x = xr.to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            xn = x * rstd
            dyw = dy * w
            dx = rstd * (dyw - xn * (tl.sum(dyw * xn, axis=0) / n_cols))
            if HAS_DS:
                dx += tl.load(ds_ptr + row * sds + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(dx_ptr + row * sdx + cols, dx.to(dx_ptr.dtype.element_ty), mask=m)
            if WANT_DW:
                if OFFSET:
                    dw += dy * xn
                else:
                    dw += dy * xn.to(xr.dtype).to(tl.float32)
    if WANT_DW:
        tl.store(dw_ptr + pid * n_cols + cols, dw, mask=m)


def _2d(t):
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_forward(x, w, eps, offset=False, residual=None):
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
    BLOCK, warps = row_block(C)
    _rms_fwd_kernel[(R,)](x2, r2, s, w, y, rstd, C, float(eps), x2.stride(0), r2.stride(0), s.stride(0), y.stride(0),
                          OFFSET=bool(offset), HAS_RES=residual is not None, BLOCK=BLOCK, num_warps=warps)
    return y.view(*x.shape[:-1], C), (s if residual is not None else x2), rstd


def rms_backward(dy, ds, xin, w, rstd, offset, want_dw):
    dy2 = _2d(dy)
    R, C = xin.shape
    dx = torch.empty((R, C), dtype=xin.dtype, device=xin.device)
    BLOCK, warps = row_block(C)
    if want_dw:
        n_sm = torch.cuda.get_device_properties(xin.device).multi_processor_count if xin.is_cuda else 4
        progs = max(1, min(R, 4 * n_sm))
    else:
        progs = R
    rpp = triton.cdiv(R, progs)
    progs = triton.cdiv(R, rpp)
    dwp = torch.empty((progs, C), dtype=torch.float32, device=xin.device) if want_dw else rstd
    ds2 = _2d(ds) if ds is not None else dy2
    _rms_bwd_kernel[(progs,)](dy2, ds2, xin, w, rstd, dx, dwp, R, C, dy2.stride(0), ds2.stride(0), xin.stride(0),
                              dx.stride(0), rpp, OFFSET=bool(offset), HAS_DS=ds is not None, WANT_DW=bool(want_dw),
                              BLOCK=BLOCK, num_warps=warps)
    dw = dwp.sum(0).to(w.dtype) if want_dw else None
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps, offset=False):
        y, xin, rstd = rms_forward(x, w, eps, offset)
        ctx.offset, ctx.shape = offset, x.shape
        ctx.save_for_backward(xin, w, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        xin, w, rstd = ctx.saved_tensors
        dx, dw = rms_backward(dy, None, xin, w, rstd, ctx.offset, ctx.needs_input_grad[1])
        return dx.view(ctx.shape), dw, None, None


class AddRMSNormFunction(torch.autograd.Function):
    "(y, s) = (rmsnorm(x + residual), x + residual)."

    @staticmethod
    def forward(ctx, x, residual, w, eps, offset=False):
        y, s, rstd = rms_forward(x, w, eps, offset, residual)
        ctx.offset, ctx.shape = offset, x.shape
        ctx.save_for_backward(s, w, rstd)
        return y, s.view(x.shape)

    @staticmethod
    def backward(ctx, dy, ds):
        s, w, rstd = ctx.saved_tensors
        dx, dw = rms_backward(dy, ds, s, w, rstd, ctx.offset, ctx.needs_input_grad[2])
        dx = dx.view(ctx.shape)
        return dx, dx, dw, None, None


def rms_norm(x, w, eps, offset=False):
    return RMSNormFunction.apply(x, w, eps, offset)


def add_rms_norm(x, residual, w, eps, offset=False):
    return AddRMSNormFunction.apply(x, residual, w, eps, offset)


def reference(x, w, eps, offset=False, residual=None):
    "Plain PyTorch, as transformers' Llama/Gemma RMSNorm modules compute it; returns y, or (y, s) with residual."
    s = x if residual is None else residual + x
    xf = s.float()
    xn = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = (xn * (1.0 + w.float())).type_as(s) if offset else w * xn.to(s.dtype)
    return y if residual is None else (y, s)
