"""Fused linear cross-entropy: ``CE(h·Wᵀ + b, labels)`` without ever holding the tokens × vocabulary logits.

The tokens are processed in chunks of C rows. For each chunk the logits are one matmul in the compute dtype; a Triton
kernel then computes, per row and in fp32, the log-sum-exp, the loss and the gradient of the summed loss with respect
to the logits, written in place over the logits buffer (no fp32 copy); two more matmuls turn that into the chunk's dh
and (only when the head trains) its contribution to dW, accumulated in fp32. The backward only scales the stored dh /
dW by the incoming gradient, so there is no host sync anywhere.

Chunk size and peak memory: C is the largest multiple of 128 rows (a power of two below 128) whose logits fit in
``chunk_bytes`` (C·V·elt ≤ chunk_bytes; 256 MiB by default: 768 rows at V = 151936 in bf16, 1024 at V = 128256), at
least 16 rows. ``min_chunk_rows`` raises C to at least that many rows (a multiple of 128) whatever ``chunk_bytes``
says: for small hidden sizes (Qwen2.5-0.5B, d = 896) the dh matmul of a chunk, (C × V)·(V × d), has only C·d outputs,
and more rows give it (and the CE kernel) more parallel work, at a memory cost of min_chunk_rows·V·elt bytes for the
logits buffer (V = 151936, bf16: 1024 rows = 297 MiB, 2048 rows = 594 MiB, 4096 rows = 1.16 GiB). Peak memory above
the inputs is that buffer plus dh (N·d·elt) plus, when the head trains, the fp32 dW (V·d·4).

One program per row reads its logits twice (log-sum-exp, then the gradient). Measured slower on an H200 (2026-12-01,
`benchmarks/results/tune_grids_H200.md`): a persistent grid of 1-4 programs per SM looping over rows, so that a row's
second read would find it in L2 (Qwen2.5-0.5B at 4k: 62-64 % of the GEMM peak against 67 %); it was removed.

Supported: ``ignore_index`` rows (no loss, no gradient), label smoothing ε (``(1-ε)·nll + ε·mean_v(-log p_v)``, as
``F.cross_entropy``), logit soft-capping ``z = c·tanh(x/c)`` (Gemma-2), an optional bias. The returned loss is the
sum over rows (fp32); ``reduction='mean'`` divides by the count of non-ignored rows, and callers pass their own
divisor (e.g. transformers' ``num_items_in_batch``) by taking the sum.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._util import compute_dtype


@triton.jit
def _ce_rows_kernel(logits_ptr, labels_ptr, loss_ptr, V, stride, ignore_index, smoothing, softcap,
                    HAS_SOFTCAP: tl.constexpr, HAS_SMOOTH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    y_raw = tl.load(labels_ptr + row).to(tl.int64)
    valid = y_raw != ignore_index
    y = tl.where(valid, y_raw, 0)
    vf = valid.to(tl.float32)
    m = -float("inf")
    s = 0.0
    zsum = 0.0
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        msk = cols < V
        x = tl.load(base + cols, mask=msk, other=-float("inf")).to(tl.float32)
        if HAS_SOFTCAP:
            x = tl.where(msk, softcap * (2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0), -float("inf"))
        if HAS_SMOOTH:
            zsum += tl.sum(tl.where(msk, x, 0.0), axis=0)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    zy = tl.load(base + y).to(tl.float32)
    if HAS_SOFTCAP:
        zy = softcap * (2.0 * tl.sigmoid(2.0 * zy / softcap) - 1.0)
    loss = lse - (1.0 - smoothing) * zy
    if HAS_SMOOTH:
        loss -= smoothing * zsum / V
    tl.store(loss_ptr + row, loss * vf)
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        msk = cols < V
        x = tl.load(base + cols, mask=msk, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            t = 2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0
            z = softcap * t
        else:
            z = x
        g = tl.exp(z - lse) - tl.where(cols == y, 1.0 - smoothing, 0.0)
        if HAS_SMOOTH:
            g -= smoothing / V
        if HAS_SOFTCAP:
            g = g * (1.0 - t * t)
        g = g * vf
        tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=msk)


def chunk_rows(N: int, V: int, elt: int, chunk_bytes: int, min_chunk_rows: int | None = None) -> int:
    """Rows per chunk: the largest multiple of 128 (a power of two when fewer) with C·V·elt ≤ chunk_bytes, at least 16,
    raised to ``min_chunk_rows`` rounded up to a multiple of 128 when given; never more than N."""
    c = max(1, chunk_bytes // max(V * elt, 1))
    c = c // 128 * 128 if c >= 128 else 1 << (c.bit_length() - 1)
    c = max(16, c)
    if min_chunk_rows:
        c = max(c, -(-int(min_chunk_rows) // 128) * 128)
    return min(c, N) if N > 0 else 1


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, W, bias, labels, ignore_index=-100, smoothing=0.0, softcap=None, chunk_bytes=256 << 20,
                min_chunk_rows=None):
        dt = compute_dtype(h, W.dtype)
        N, d = h.shape
        V = W.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        with torch.autocast(h.device.type, enabled=False):
            hc_all = h if h.dtype == dt else h.to(dt)
            Wc = W if W.dtype == dt else W.to(dt)
            bc = None if bias is None else bias.to(dt)
            dh = torch.empty((N, d), dtype=dt, device=h.device) if need_h else None
            dW = torch.zeros((V, d), dtype=torch.float32, device=h.device) if need_w else None
            db = torch.zeros((V,), dtype=torch.float32, device=h.device) if need_b else None
            losses = torch.empty(N, dtype=torch.float32, device=h.device)
            C = chunk_rows(N, V, torch.finfo(dt).bits // 8, chunk_bytes, min_chunk_rows)
            BLOCK = min(4096, triton.next_power_of_2(V))
            for s0 in range(0, N, C):
                s1 = min(N, s0 + C)
                hc = hc_all[s0:s1]
                logits = torch.addmm(bc, hc, Wc.t()) if bc is not None else hc @ Wc.t()
                _ce_rows_kernel[(s1 - s0,)](logits, labels[s0:s1], losses[s0:s1], V, logits.stride(0),
                                            int(ignore_index), float(smoothing), float(softcap or 1.0),
                                            HAS_SOFTCAP=softcap is not None and softcap > 0,
                                            HAS_SMOOTH=smoothing > 0, BLOCK=BLOCK, num_warps=8)
                if need_h:
                    torch.mm(logits, Wc, out=dh[s0:s1])
                if need_w:
                    dW.add_(logits.t() @ hc)
                if need_b:
                    db += logits.sum(0, dtype=torch.float32)
                del logits
        ctx.save_for_backward(dh, dW, db)
        ctx.h_dtype, ctx.W_dtype = h.dtype, W.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        return losses.sum()

    @staticmethod
    def backward(ctx, g):
        dh, dW, db = ctx.saved_tensors
        gh = gw = gb = None
        if dh is not None:
            gh = (dh * g.to(dh.dtype)).to(ctx.h_dtype)
        if dW is not None:
            gw = (dW * g).to(ctx.W_dtype)
        if db is not None:
            gb = (db * g).to(ctx.b_dtype)
        return gh, gw, gb, None, None, None, None, None, None


def linear_cross_entropy(h, W, labels, bias=None, *, ignore_index=-100, label_smoothing=0.0, softcap=None,
                         reduction="sum", chunk_bytes: int = 256 << 20, min_chunk_rows: int | None = None):
    """Cross-entropy of ``h (N, d) · W (V, d)ᵀ`` against ``labels (N,)``, never materialising (N, V).
    reduction: 'sum' (fp32 scalar) or 'mean' (over non-ignored rows). chunk_bytes / min_chunk_rows: the logits chunk
    (module docstring: its peak memory is max(chunk_bytes, min_chunk_rows·V·elt) at most)."""
    h2 = h.reshape(-1, h.shape[-1])
    lab = labels.reshape(-1).contiguous()
    loss = LinearCrossEntropyFunction.apply(h2, W, bias, lab, ignore_index, float(label_smoothing), softcap,
                                            chunk_bytes, min_chunk_rows)
    if reduction == "mean":
        return loss / (lab != ignore_index).sum()
    return loss


def reference(h, W, labels, bias=None, *, ignore_index=-100, label_smoothing=0.0, softcap=None, reduction="sum"):
    "Plain PyTorch: full logits, upcast to fp32, F.cross_entropy (as transformers' loss does)."
    logits = torch.nn.functional.linear(h.reshape(-1, h.shape[-1]), W, bias).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.nn.functional.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index,
                                             label_smoothing=label_smoothing, reduction=reduction)
