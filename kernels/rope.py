"""Rotary position embedding applied in place to q and k, for packed rows.

``cos``/``sin`` are the per-token tables that the model's rotary module computed from ``position_ids`` (shape
``(B or 1, T, R)``, R ≤ head dim; so packed rows, where positions restart inside a row, and every rope scaling type
are handled exactly as the model does). q and k are the projection outputs laid out ``(B, T, H, D)`` (before the
transpose to heads-first), rotated in place: ``x1' = x1·c1 − x2·s1``, ``x2' = x2·c2 + x1·s2`` over the first R dims
(halves of R/2), the rest untouched. Computed in fp32 and rounded once (transformers rounds three times in bf16).
The backward is the transposed rotation of the incoming gradient; nothing is saved but cos and sin.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, T, n_heads, sx_tok, sx_head, sc_b, sc_t, HALF: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    b = tok // T
    t = tok % T
    d = tl.arange(0, BLOCK_D)
    md = d < HALF
    cbase = b * sc_b + t * sc_t
    c1 = tl.load(cos_ptr + cbase + d, mask=md, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + cbase + HALF + d, mask=md, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + cbase + d, mask=md, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + cbase + HALF + d, mask=md, other=0.0).to(tl.float32)
    if BACKWARD:
        s1 = -s1
        s2 = -s2
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mh = h < n_heads
        off = tok * sx_tok + h[:, None] * sx_head + d[None, :]
        mm = mh[:, None] & md[None, :]
        x1r = tl.load(x_ptr + off, mask=mm, other=0.0)
        x1 = x1r.to(tl.float32)
        x2 = tl.load(x_ptr + off + HALF, mask=mm, other=0.0).to(tl.float32)
        if BACKWARD:
            # dx1 = d1 c1 + d2 s2 ; dx2 = d2 c2 - d1 s1   (s already negated)
            o1 = x1 * c1[None, :] - x2 * s2[None, :]
            o2 = x2 * c2[None, :] + x1 * s1[None, :]
        else:
            o1 = x1 * c1[None, :] - x2 * s1[None, :]
            o2 = x2 * c2[None, :] + x1 * s2[None, :]
        tl.store(x_ptr + off, o1.to(x1r.dtype), mask=mm)
        tl.store(x_ptr + off + HALF, o2.to(x1r.dtype), mask=mm)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool):
    "Rotate x (B, T, H, D) in place."
    B, T, H, D = x.shape
    R = cos.shape[-1]
    assert R % 2 == 0 and R <= D and x.stride(-1) == 1, "rope: head dim must be contiguous and >= the rotary dim"
    assert x.stride(0) == T * x.stride(1), "rope: (B, T) must be flattenable"
    cos = cos if cos.stride(-1) == 1 else cos.contiguous()
    sin = sin if sin.stride(-1) == 1 else sin.contiguous()
    assert cos.stride() == sin.stride()
    sc_b = cos.stride(0) if cos.shape[0] > 1 else 0
    half = R // 2
    BLOCK_D = triton.next_power_of_2(half)
    BLOCK_H = min(triton.next_power_of_2(H), max(1, 4096 // BLOCK_D))
    _rope_kernel[(B * T,)](x, cos, sin, T, H, x.stride(1), x.stride(2), sc_b, cos.stride(1), HALF=half,
                           BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D, BACKWARD=backward)
    return x


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        _apply(q, cos, sin, False)
        _apply(k, cos, sin, False)
        ctx.mark_dirty(q, k)
        ctx.save_for_backward(cos, sin)
        return q, k

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq = _apply(dq.contiguous().clone() if not dq.is_contiguous() else dq.clone(), cos, sin, True)
        dk = _apply(dk.contiguous().clone() if not dk.is_contiguous() else dk.clone(), cos, sin, True)
        return dq, dk, None, None


def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    "In-place rotary embedding of q (B, T, Hq, D) and k (B, T, Hk, D); returns (q, k)."
    return RoPEFunction.apply(q, k, cos, sin)


def reference(q, k, cos, sin):
    "transformers' apply_rotary_pos_emb for (B, T, H, D) tensors (unsqueeze_dim=2), with partial rotary dims."
    R = cos.shape[-1]

    def rot(x):
        xr, xp = x[..., :R], x[..., R:]
        x1, x2 = xr[..., : R // 2], xr[..., R // 2:]
        c, s = cos.unsqueeze(2), sin.unsqueeze(2)
        return torch.cat([xr * c + torch.cat((-x2, x1), -1) * s, xp], -1)

    return rot(q), rot(k)
