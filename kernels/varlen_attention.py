"""Causal attention over packed rows, with a launch grid that depends only on the token count.

Inputs are one packed row: ``q`` (T, Hq, D), ``k`` and ``v`` (T, Hkv, D), Hq a multiple of Hkv (grouped-query
attention: q head h reads kv head ``h // (Hq // Hkv)``), and ``cu_seq_lens`` (n+1,) int32, the segments' offsets
(``cu[0] == 0``, ``cu[-1] == T``; repeated offsets are empty segments and are harmless, so ``cu`` can be padded to a
fixed length with its last offset). Each token attends causally within its own segment and never across segments:
query t sees key s iff ``start[t] <= s <= t``, where ``start[t]`` is the first token of t's segment.

Why: ftkit captures the whole decoder as one CUDA graph (``graphs.py``). flash-attn's varlen grid is
(ceil(max_seqlen / block) × segments × heads), which a graph fixes at capture time, so the graph has to run it on
``cu_seq_lens`` padded to a fixed segment count and longest segment, and most of its blocks are empty. Here the grids
are ``(cdiv(T, BLOCK_M), Hq)`` (forward, dQ) and ``(cdiv(T, BLOCK_N), Hkv)`` (dK/dV): each program finds its key
(or query) range on the device from per-token segment bounds, so the same launch serves every row of T tokens, with no
padding and no host ints.

- Prep (device only, no host sync): ``start[t]`` / ``end[t]`` (int32, (T,)), the bounds of t's segment, from
  ``searchsorted(cu[1:], arange(T), right=True)`` and two gathers.
- Forward: one program per (block of BLOCK_M queries, q head). Its keys run from the start of the block's first token's
  segment (starts never decrease, so that is the smallest start in the block) to the block's last token; online
  softmax in fp32 (exp2, scale folded in), masked by the rule above. Stores ``out`` (T, Hq, D) in the input dtype and
  the natural-log log-sum-exp (Hq, T) fp32.
- Saved for backward: q, k, v, out, the log-sum-exp, start, end.
- Backward: ``delta = rowsum(dO · O)`` (torch, fp32); a dK/dV kernel, one program per (block of BLOCK_N keys, kv head),
  looping over the group's q heads and over queries from the block's first key to ``end`` of its last key (so no
  atomics: each program owns its dK/dV rows); a dQ kernel over query blocks with the forward's key ranges. Softmax
  probabilities are recomputed from the log-sum-exp; all accumulation in fp32, results in the input dtype.

Limits: head dim D a power of two in [16, 128]; fp32, fp16 or bf16 inputs (q, k, v one dtype; fp32 dots use IEEE
precision, not TF32; under Triton's interpreter, whose fp16 / bf16 ``tl.dot`` is wrong, those operands are multiplied
as fp32 values); a last dim that is not contiguous is copied; no dropout, no sliding window, no soft-capping, no
ALiBi, no batch dim (callers flatten their packed rows into one).

Used by ``graphs.py`` (``triton_attention``): the whole-decoder CUDA graph runs attention with it where it applies, so
one capture serves every row of a shape. Measured on one H200 (``benchmarks/bench_attention.py``, Llama-1B attention,
T = 4096, bf16): 94 / 497 us forward / forward + backward, against 166 / 734 us for torch's varlen flash on the exact
segments and 394 / 1031 us for it padded as a graph needs; BLOCK_M 64, BLOCK_N 64, 4 warps (D <= 64) was the fastest
block shape tried.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._util import interpret

_LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    "a @ b with fp32 accumulation; UPCAST (interpreter only) multiplies fp16 / bf16 operands as exact fp32 values."
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, start_ptr, T, qk_scale,
                sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h, GROUP: tl.constexpr,
                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                UPCAST: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    kvh = h // GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    valid_m = offs_m < T
    offs_d = tl.arange(0, D)
    rows = offs_m.to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * sq_t + h * sq_h + offs_d[None, :], mask=valid_m[:, None], other=0.0)
    st_q = tl.load(start_ptr + offs_m, mask=valid_m, other=0)
    lo = tl.load(start_ptr + m0)
    hi = tl.minimum(m0 + BLOCK_M, T)
    m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid_n = offs_n < hi
        cols = offs_n.to(tl.int64)
        k = tl.load(k_ptr + cols[:, None] * sk_t + kvh * sk_h + offs_d[None, :], mask=valid_n[:, None], other=0.0)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
        keep = (offs_n[None, :] >= st_q[:, None]) & (offs_n[None, :] <= offs_m[:, None]) & valid_n[None, :]
        s = tl.where(keep, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + cols[:, None] * sv_t + kvh * sv_h + offs_d[None, :], mask=valid_n[:, None], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PREC, UPCAST)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(o_ptr + rows[:, None] * so_t + h * so_h + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=valid_m[:, None])
    # natural-log LSE of the unscaled-by-log2e logits: (m + log2 l) / log2(e)
    lse = (m_i + tl.log2(l_safe)) / 1.4426950408889634
    tl.store(lse_ptr + h.to(tl.int64) * T + offs_m, lse, mask=valid_m)


@triton.jit
def _bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, start_ptr, end_ptr, dk_ptr, dv_ptr, T,
                     qk_scale, scale, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdk_t, sdk_h, sdv_t, sdv_h,
                     GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     PREC: tl.constexpr, UPCAST: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    kvh = tl.program_id(1)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    valid_n = offs_n < T
    offs_d = tl.arange(0, D)
    cols = offs_n.to(tl.int64)
    k = tl.load(k_ptr + cols[:, None] * sk_t + kvh * sk_h + offs_d[None, :], mask=valid_n[:, None], other=0.0)
    v = tl.load(v_ptr + cols[:, None] * sv_t + kvh * sv_h + offs_d[None, :], mask=valid_n[:, None], other=0.0)
    # queries that can see a key of this block: from its first key to the end of its last key's segment
    q_hi = tl.load(end_ptr + tl.minimum(n0 + BLOCK_N, T) - 1)
    dk = tl.zeros((BLOCK_N, D), tl.float32)
    dv = tl.zeros((BLOCK_N, D), tl.float32)
    for g in range(GROUP):
        h = kvh * GROUP + g
        for m0 in range(n0, q_hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            valid_m = offs_m < q_hi
            rows = offs_m.to(tl.int64)
            q = tl.load(q_ptr + rows[:, None] * sq_t + h * sq_h + offs_d[None, :], mask=valid_m[:, None], other=0.0)
            do = tl.load(do_ptr + rows[:, None] * sdo_t + h * sdo_h + offs_d[None, :], mask=valid_m[:, None],
                         other=0.0)
            lse2 = tl.load(lse_ptr + h.to(tl.int64) * T + offs_m, mask=valid_m, other=0.0) * 1.4426950408889634
            dlt = tl.load(delta_ptr + h.to(tl.int64) * T + offs_m, mask=valid_m, other=0.0)
            st_q = tl.load(start_ptr + offs_m, mask=valid_m, other=T)
            # transposed scores: keys along rows, queries along columns
            s_t = _dot(k, tl.trans(q), PREC, UPCAST) * qk_scale
            keep = (offs_n[:, None] >= st_q[None, :]) & (offs_n[:, None] <= offs_m[None, :]) & valid_m[None, :]
            p_t = tl.where(keep, tl.exp2(s_t - lse2[None, :]), 0.0)
            dv += _dot(p_t.to(do.dtype), do, PREC, UPCAST)
            dp_t = _dot(v, tl.trans(do), PREC, UPCAST)
            ds_t = p_t * (dp_t - dlt[None, :])
            dk += _dot(ds_t.to(q.dtype), q, PREC, UPCAST)
    dk = dk * scale
    tl.store(dk_ptr + cols[:, None] * sdk_t + kvh * sdk_h + offs_d[None, :], dk.to(dk_ptr.dtype.element_ty),
             mask=valid_n[:, None])
    tl.store(dv_ptr + cols[:, None] * sdv_t + kvh * sdv_h + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=valid_n[:, None])


@triton.jit
def _bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, start_ptr, dq_ptr, T, qk_scale, scale,
                   sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, sdq_t, sdq_h, GROUP: tl.constexpr,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
                UPCAST: tl.constexpr):
    m0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    kvh = h // GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    valid_m = offs_m < T
    offs_d = tl.arange(0, D)
    rows = offs_m.to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * sq_t + h * sq_h + offs_d[None, :], mask=valid_m[:, None], other=0.0)
    do = tl.load(do_ptr + rows[:, None] * sdo_t + h * sdo_h + offs_d[None, :], mask=valid_m[:, None], other=0.0)
    lse2 = tl.load(lse_ptr + h.to(tl.int64) * T + offs_m, mask=valid_m, other=0.0) * 1.4426950408889634
    dlt = tl.load(delta_ptr + h.to(tl.int64) * T + offs_m, mask=valid_m, other=0.0)
    st_q = tl.load(start_ptr + offs_m, mask=valid_m, other=0)
    lo = tl.load(start_ptr + m0)
    hi = tl.minimum(m0 + BLOCK_M, T)
    dq = tl.zeros((BLOCK_M, D), tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid_n = offs_n < hi
        cols = offs_n.to(tl.int64)
        k = tl.load(k_ptr + cols[:, None] * sk_t + kvh * sk_h + offs_d[None, :], mask=valid_n[:, None], other=0.0)
        v = tl.load(v_ptr + cols[:, None] * sv_t + kvh * sv_h + offs_d[None, :], mask=valid_n[:, None], other=0.0)
        s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
        keep = (offs_n[None, :] >= st_q[:, None]) & (offs_n[None, :] <= offs_m[:, None]) & valid_n[None, :] \
            & valid_m[:, None]
        p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), PREC, UPCAST)
        ds = p * (dp - dlt[:, None])
        dq += _dot(ds.to(k.dtype), k, PREC, UPCAST)
    dq = dq * scale
    tl.store(dq_ptr + rows[:, None] * sdq_t + h * sdq_h + offs_d[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=valid_m[:, None])


# ----------------------------------------------------------------------------------------------------------- host
def _blocks(D: int) -> tuple[int, int, int]:
    "(BLOCK_M, BLOCK_N, num_warps); the interpreter gets small blocks (the tests' short rows span several)."
    if interpret():
        return 16, 16, 4
    return (64, 64, 4) if D <= 64 else (64, 32, 4)


def _upcast(dtype: torch.dtype) -> bool:
    "Triton 3.x's interpreter gets fp16 / bf16 tl.dot wrong: there the operands go in as fp32 (same values)."
    return interpret() and dtype != torch.float32


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 or _upcast(dtype) else "tf32"


def _lastdim(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def segment_bounds(cu_seq_lens: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (start, end) of its segment, int32 (T,), computed on cu's device without reading it on the host.
    Tokens past ``cu[-1]`` (offsets that do not cover the row) form one last segment up to T: no gather out of range."""
    cu = cu_seq_lens.to(torch.int32)
    tok = torch.arange(T, device=cu.device, dtype=torch.int32)
    seg = torch.searchsorted(cu[1:], tok, right=True)
    ends = torch.cat([cu[1:], torch.full((1,), T, device=cu.device, dtype=torch.int32)])
    start = cu.gather(0, seg)
    end = ends.gather(0, seg)
    return start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous()


def _check(q, k, v, cu_seq_lens):
    assert q.dim() == 3 and k.dim() == 3 and v.dim() == 3, "varlen_attention: q (T, Hq, D), k / v (T, Hkv, D)"
    T, Hq, D = q.shape
    assert k.shape == v.shape and k.shape[0] == T and k.shape[2] == D, "varlen_attention: k / v must be (T, Hkv, D)"
    assert Hq % k.shape[1] == 0, "varlen_attention: Hq must be a multiple of Hkv"
    assert D & (D - 1) == 0 and 16 <= D <= 128, "varlen_attention: head dim must be a power of two in [16, 128]"
    assert q.dtype == k.dtype == v.dtype and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
    assert cu_seq_lens.dim() == 1 and cu_seq_lens.numel() >= 2 and not cu_seq_lens.is_floating_point()


def attn_forward(q, k, v, start, scale, blocks=None):
    "out (T, Hq, D) in q's dtype and lse (Hq, T) fp32; `blocks` (BLOCK_M, BLOCK_N, warps) overrides `_blocks` (benchmarks)."
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((Hq, T), dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    BM, BN, warps = blocks or _blocks(D)
    _fwd_kernel[(triton.cdiv(T, BM), Hq)](
        q, k, v, out, lse, start, T, float(scale) * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        GROUP=Hq // Hkv, D=D, BLOCK_M=BM, BLOCK_N=BN, PREC=_prec(q.dtype), UPCAST=_upcast(q.dtype),
        num_warps=warps)
    return out, lse


def attn_backward(do, q, k, v, out, lse, start, end, scale, blocks=None):
    "(dq, dk, dv) in the inputs' dtype; `blocks` as in `attn_forward`."
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    do = _lastdim(do)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if T == 0:
        return dq, dk, dv
    delta = (do.float() * out.float()).sum(-1).t().contiguous()   # (Hq, T) fp32
    BM, BN, warps = blocks or _blocks(D)
    G, prec, qks = Hq // Hkv, _prec(q.dtype), float(scale) * _LOG2E
    _bwd_dkdv_kernel[(triton.cdiv(T, BN), Hkv)](
        q, k, v, do, lse, delta, start, end, dk, dv, T, qks, float(scale),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        GROUP=G, D=D, BLOCK_M=BM, BLOCK_N=BN, PREC=prec, UPCAST=_upcast(q.dtype), num_warps=warps)
    _bwd_dq_kernel[(triton.cdiv(T, BM), Hq)](
        q, k, v, do, lse, delta, start, dq, T, qks, float(scale),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
        dq.stride(0), dq.stride(1),
        GROUP=G, D=D, BLOCK_M=BM, BLOCK_N=BN, PREC=prec, UPCAST=_upcast(q.dtype), num_warps=warps)
    return dq, dk, dv


class VarlenAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seq_lens, scale):
        q, k, v = _lastdim(q), _lastdim(k), _lastdim(v)
        start, end = segment_bounds(cu_seq_lens, q.shape[0])
        out, lse = attn_forward(q, k, v, start, scale)
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, out, lse, start, end)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, start, end = ctx.saved_tensors
        dq, dk, dv = attn_backward(do, q, k, v, out, lse, start, end, ctx.scale)
        return dq, dk, dv, None, None


def varlen_attention(q, k, v, cu_seq_lens, scale=None):
    "Causal attention within the segments of ``cu_seq_lens``: q (T, Hq, D), k / v (T, Hkv, D) → (T, Hq, D)."
    _check(q, k, v, cu_seq_lens)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return VarlenAttentionFunction.apply(q, k, v, cu_seq_lens, scale)


def reference(q, k, v, cu_seq_lens, scale=None):
    "Plain PyTorch in fp32: per-segment causal SDPA, kv heads repeated for GQA (reads cu on the host)."
    T, Hq, D = q.shape
    G = Hq // k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    qf, kf, vf = q.float(), k.float().repeat_interleave(G, dim=1), v.float().repeat_interleave(G, dim=1)
    cu = [int(c) for c in cu_seq_lens.tolist()]
    outs = []
    for s, e in zip(cu[:-1], cu[1:]):
        if e > s:
            o = torch.nn.functional.scaled_dot_product_attention(
                qf[s:e].transpose(0, 1), kf[s:e].transpose(0, 1), vf[s:e].transpose(0, 1), is_causal=True,
                scale=scale)
            outs.append(o.transpose(0, 1))
    return torch.cat(outs, 0) if outs else qf.new_zeros((0, Hq, D))
