"""Rotary position embedding applied in place to q and k, for packed rows.

``cos``/``sin`` are the per-token tables that the model's rotary module computed from ``position_ids`` (shape
``(B or 1, T, R)``, R ≤ head dim; so packed rows, where positions restart inside a row, and every rope scaling type
are handled exactly as the model does). q and k are the projection outputs laid out ``(B, T, H, D)`` (before the
transpose to heads-first), rotated in place: ``x1' = x1·c1 − x2·s1``, ``x2' = x2·c2 + x1·s2`` over the first R dims
(halves of R/2), the rest untouched. Computed in fp32 and rounded once (transformers rounds three times in bf16).
The backward is the transposed rotation of the incoming gradient (``dx1 = d1·c1 + d2·s2``, ``dx2 = d2·c2 − d1·s1``;
dims R..D passed through); nothing is saved but cos and sin.

Launches: one per direction. A program takes TOK consecutive tokens of the flattened B·T (`rope_tile`), loads their
cos/sin once, then rotates the Hq query heads (BLOCK_HQ at a time) and the Hk key heads (BLOCK_HK at a time) of those
tokens. The forward reads and writes q and k in place (any batch / token / head strides, last dim contiguous) and
returns the same tensors (``mark_dirty``). The backward reads dq and dk where they lie (any batch / token / head
strides; copied only when the last dim is not contiguous), never writes them, and writes the rotated gradients, with
dims R..D copied, into new contiguous tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import next_pow2

# Tile size: tokens x heads x half-dims per block of heads (each of the two halves x1, x2 is one such tile), and warps
# for ~8 elements per thread (a 16-byte vector of bf16). 1024 elements measured fastest of 1024 / 2048 / 4096 / 8192
# on an H200 at every shape (fwd + bwd, CUDA-graph time; `benchmarks/results/tune_grids_rope_H200.md`): e.g.
# Llama-3-8B heads at 16k tokens 0.182 ms (87 % of the copy bandwidth) against 0.212 ms with 2048.
_TILE_ELEMS = 1024


def rope_tile(n_heads_q: int, n_heads_k: int, half: int, tile_elems: int | None = None) -> tuple[int, int, int, int, int]:
    """(TOK, BLOCK_HQ, BLOCK_HK, BLOCK_D, num_warps) for heads of `half` = R/2 rotated pairs.

    BLOCK_D is `half` rounded up to a power of two. TOK (tokens per program) is the largest power of two ≤ 16 with
    TOK · next_pow2(max(Hq, Hk)) · BLOCK_D ≤ `_TILE_ELEMS` (1024), so models with few, narrow heads take several tokens
    per program (Qwen2.5-0.5B, 14 + 2 heads of 32 pairs: 2 tokens) and wider ones one (Llama-3.2-1B, 32 + 8 of 32;
    Llama-3-8B, 32 + 8 of 64). BLOCK_HQ / BLOCK_HK cover all heads of a kind at once where the tile allows, else the
    largest power of two that fits (the kernel loops over head blocks: Llama-3-8B's 32 q heads in two blocks of 16).
    num_warps: the larger tile / 256 (8 elements per thread), 1 to 8. `tile_elems` replaces the 1024 (a benchmark
    knob)."""
    limit = int(tile_elems or _TILE_ELEMS)
    block_d = next_pow2(max(half, 1))
    widest = next_pow2(max(n_heads_q, n_heads_k, 1)) * block_d
    tok = 1
    while tok < 16 and 2 * tok * widest <= limit:
        tok *= 2
    cap_h = max(1, limit // (tok * block_d))                  # a power of two (both operands are)
    bq, bk = min(next_pow2(n_heads_q), cap_h), min(next_pow2(n_heads_k), cap_h)
    warps = min(8, max(1, tok * max(bq, bk) * block_d // 256))
    return tok, bq, bk, block_d, warps


@triton.jit
def _rope_heads(x_ptr, y_ptr, b, t, tm, n_heads, sx_b, sx_t, sx_h, sy_b, sy_t, sy_h, c1, c2, s1, s2,
                HALF: tl.constexpr, PASS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                BACKWARD: tl.constexpr):
    "Rotate all heads of TOK tokens: x -> y (y is x in the forward). b, t, tm: (TOK,); c1..s2: (TOK, 1, BLOCK_D) fp32."
    d = tl.arange(0, BLOCK_D)[None, None, :]
    md = d < HALF
    xt = (b * sx_b + t * sx_t)[:, None, None]
    yt = (b * sy_b + t * sy_t)[:, None, None]
    for h0 in range(0, n_heads, BLOCK_H):
        h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)[None, :, None]   # int64: a head stride may be T·D
        m = tm[:, None, None] & (h < n_heads)
        mm = m & md
        xo = xt + h * sx_h + d
        yo = yt + h * sy_h + d
        x1 = tl.load(x_ptr + xo, mask=mm, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + xo + HALF, mask=mm, other=0.0).to(tl.float32)
        if BACKWARD:        # the transpose of [[c1, -s1], [s2, c2]]; s1, s2 arrive negated (the forward's op order)
            o1 = x1 * c1 - x2 * s2
            o2 = x2 * c2 + x1 * s1
        else:
            o1 = x1 * c1 - x2 * s1
            o2 = x2 * c2 + x1 * s2
        tl.store(y_ptr + yo, o1.to(y_ptr.dtype.element_ty), mask=mm)
        tl.store(y_ptr + yo + HALF, o2.to(y_ptr.dtype.element_ty), mask=mm)
        # only the out-of-place backward has PASS > 0: dims R..D pass through unchanged, in tiles of the same shape
        for p0 in range(2 * HALF, 2 * HALF + PASS, BLOCK_D):
            mp = m & (d < 2 * HALF + PASS - p0)
            v = tl.load(x_ptr + xt + h * sx_h + p0 + d, mask=mp, other=0.0)
            tl.store(y_ptr + yt + h * sy_h + p0 + d, v.to(y_ptr.dtype.element_ty), mask=mp)


@triton.jit
def _rope_kernel(xq_ptr, yq_ptr, xk_ptr, yk_ptr, cos_ptr, sin_ptr, N, T, Hq, Hk,
                 sxq_b, sxq_t, sxq_h, syq_b, syq_t, syq_h, sxk_b, sxk_t, sxk_h, syk_b, syk_t, syk_h,
                 sc_b, sc_t, ss_b, ss_t, HALF: tl.constexpr, PASS: tl.constexpr, TOK: tl.constexpr,
                 BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_D: tl.constexpr, BACKWARD: tl.constexpr):
    "TOK tokens of the flattened B·T: their cos/sin once, then the q heads, then the k heads."
    n = tl.program_id(0).to(tl.int64) * TOK + tl.arange(0, TOK)
    tm = n < N
    b = n // T
    t = n % T
    d = tl.arange(0, BLOCK_D)[None, :]
    mc = tm[:, None] & (d < HALF)
    cb = (b * sc_b + t * sc_t)[:, None] + d
    sb = (b * ss_b + t * ss_t)[:, None] + d
    c1 = tl.load(cos_ptr + cb, mask=mc, other=0.0).to(tl.float32)[:, None, :]
    c2 = tl.load(cos_ptr + cb + HALF, mask=mc, other=0.0).to(tl.float32)[:, None, :]
    s1 = tl.load(sin_ptr + sb, mask=mc, other=0.0).to(tl.float32)[:, None, :]
    s2 = tl.load(sin_ptr + sb + HALF, mask=mc, other=0.0).to(tl.float32)[:, None, :]
    if BACKWARD:
        s1 = -s1
        s2 = -s2
    _rope_heads(xq_ptr, yq_ptr, b, t, tm, Hq, sxq_b, sxq_t, sxq_h, syq_b, syq_t, syq_h, c1, c2, s1, s2,
                HALF, PASS, BLOCK_HQ, BLOCK_D, BACKWARD)
    _rope_heads(xk_ptr, yk_ptr, b, t, tm, Hk, sxk_b, sxk_t, sxk_h, syk_b, syk_t, syk_h, c1, c2, s1, s2,
                HALF, PASS, BLOCK_HK, BLOCK_D, BACKWARD)


def _table(c: torch.Tensor, B: int, T: int, R: int) -> tuple[torch.Tensor, int, int]:
    "cos or sin with a contiguous last dim, and its (batch, token) strides (batch stride 0 when broadcast, B = 1)."
    assert c.dim() == 3 and c.shape[0] in (1, B) and c.shape[1] == T and c.shape[2] == R, \
        f"rope: cos/sin must be (1 or {B}, {T}, {R}), got {tuple(c.shape)}"
    c = c if c.stride(-1) == 1 else c.contiguous()
    return c, (c.stride(0) if c.shape[0] > 1 else 0), c.stride(1)


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    assert x.stride(-1) == 1, "rope: the head dim must be contiguous"
    return x.stride(0), x.stride(1), x.stride(2)


def _apply(q, k, cos, sin, backward: bool = False, out=None, tile_elems: int | None = None):
    """One launch over q (B, T, Hq, D) and k (B, T, Hk, D): rotated in place (out None), or into out = (q', k')
    (the backward: the transposed rotation, dims R..D copied). Returns the written pair. tile_elems: `rope_tile`'s."""
    B, T, Hq, D = q.shape
    assert k.dim() == 4 and k.shape[:2] == (B, T) and k.shape[3] == D, \
        f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be (B, T, H, D) with the same B, T, D"
    R = cos.shape[-1]
    assert 0 < R <= D and R % 2 == 0, f"rope: rotary dim {R} must be even and within the head dim {D}"
    Hk = k.shape[2]
    cos, sc_b, sc_t = _table(cos, B, T, R)
    sin, ss_b, ss_t = _table(sin, B, T, R)
    qo, ko = (q, k) if out is None else out
    for x in (qo, ko):      # written: an expanded dim (stride 0) would be rotated more than once
        assert all(st != 0 or n == 1 for n, st in zip(x.shape, x.stride())), "rope: cannot write an expanded tensor"
    assert qo.shape == q.shape and ko.shape == k.shape
    half, tail = R // 2, (D - R if out is not None else 0)     # in place, dims R..D are simply left alone
    tok, bq, bk, block_d, warps = rope_tile(Hq, Hk, half, tile_elems)
    N = B * T
    if N == 0:
        return qo, ko
    _rope_kernel[(triton.cdiv(N, tok),)](
        q, qo, k, ko, cos, sin, N, T, Hq, Hk, *_strides(q), *_strides(qo), *_strides(k), *_strides(ko),
        sc_b, sc_t, ss_b, ss_t, HALF=half, PASS=tail, TOK=tok, BLOCK_HQ=bq, BLOCK_HK=bk, BLOCK_D=block_d,
        BACKWARD=backward, num_warps=warps)
    return qo, ko


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        _apply(q, k, cos, sin)
        ctx.mark_dirty(q, k)
        ctx.save_for_backward(cos, sin)
        return q, k

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        # read where they lie (any batch/token/head strides); a copy only when the head dim is strided
        dq = dq if dq.stride(-1) == 1 else dq.contiguous()
        dk = dk if dk.stride(-1) == 1 else dk.contiguous()
        out = (torch.empty(dq.shape, dtype=dq.dtype, device=dq.device),
               torch.empty(dk.shape, dtype=dk.dtype, device=dk.device))
        gq, gk = _apply(dq, dk, cos, sin, backward=True, out=out)
        return gq, gk, None, None


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
