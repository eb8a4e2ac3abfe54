"""LoRA MLP: ``down(act(gate(X)) * up(X))`` with LoRA on all three projections, in one autograd node.

Gate and up are two projections (Llama, Qwen, Mistral, Gemma) or one fused ``gate_up_proj`` whose output is split in
halves (Phi-3). Saved for backward: X, the gate and up outputs G and U (tokens × intermediate each, compute dtype),
the small ``X·Aᵀ`` / ``H·A_downᵀ`` products and the dropout masks when dropout > 0. ``H = act(G)·U`` is not kept:
the backward GLU kernel recomputes it while it writes ``dG`` and ``dU`` over G and U. The activation is SwiGLU or
GeGLU (erf or tanh), chosen from ``hidden_act``; see ``glu.py``.

``fuse_lora_b=True`` (the default) keeps the rank-r LoRA terms of gate, up and down out of separate passes over the
tokens × intermediate tensors: the base GEMMs write G0 and U0 once; the GLU kernel adds s·(X·Aᵀ)·Bᵀ to each tile in
fp32 before the activation, writes H and accumulates H·A_downᵀ; the backward kernel recomputes G and U, adds the down
LoRA term to dH, writes H, dG, dU in place and accumulates dG·B_gate and dU·B_up. Saved: G0 and U0 (without the LoRA
term) instead of G and U, same sizes. The sums differ from the unfused path's addmm_ only in the order in which the
r products are summed (both accumulate in fp32 and round once). ``fuse_lora_b=False`` is the unfused path (addmm_
into G and U, one GEMM per rank-r product); fp64 always takes it.
"""
from __future__ import annotations

import contextlib

import torch

from . import glu as _glu
from ._util import compute_dtype
from .lora_common import (LoRAProj, adapters, dense_weight, lora_backward, lora_forward, make_mask,
                          proj_reference)


def _base(X2, P, dt, mask, AB):
    "X·Wᵀ + b (no LoRA term) and XA = Xd·Aᵀ, in dt."
    W = dense_weight(P, dt)
    Y = torch.addmm(P.bias.to(dt), X2, W.t()) if P.bias is not None else X2 @ W.t()
    del W
    XA = (X2 if mask is None else X2 * mask) @ AB[0].t()
    return Y, XA


def _gate_up_lora(ins, xas, abs_, F):
    "(XA_g, XA_u, B_g, B_u, s_g, s_u) for the GLU kernels: two projections, or the halves of one gate_up B."
    if len(ins) == 2:
        return xas[0], xas[1], abs_[1], abs_[3], ins[0].s, ins[1].s
    B = abs_[1]
    return xas[0], xas[0], B[:F], B[F:], ins[0].s, ins[0].s


# The default of lora_mlp(fuse_lora_b=None). The patched modules call lora_mlp without the keyword; `Unfused` runs one
# with the unfused path (benchmarks: both paths in one run, on the same parameters).
FUSE_LORA_B = True


@contextlib.contextmanager
def lora_b_fusion(on: bool):
    "Within the block, lora_mlp calls without ``fuse_lora_b`` take ``on``; the previous default comes back after."
    global FUSE_LORA_B
    old, FUSE_LORA_B = FUSE_LORA_B, bool(on)
    try:
        yield
    finally:
        FUSE_LORA_B = old


class Unfused(torch.nn.Module):
    "Wraps a module (a patched MLP or a model holding them): its forward runs with ``fuse_lora_b=False``."

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        with lora_b_fusion(False):
            return self.inner(*args, **kwargs)


class LoRAMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, ins, down, act, masks, fuse, *AB):
        P0 = ins[0]
        dt = compute_dtype(X, P0.weight.dtype if P0.quant_state is None else P0.quant_state.dtype)
        with torch.autocast(X.device.type, enabled=False):
            X2 = X.reshape(-1, X.shape[-1])
            if X2.dtype != dt:
                X2 = X2.to(dt)
            m_in, m_down = masks[:-1], masks[-1]
            fuse = fuse and dt in (torch.bfloat16, torch.float16, torch.float32)
            outs, xas, abs_ = [], [], []
            for P, m in zip(ins, m_in):
                AB = adapters(P, dt)
                abs_ += list(AB)
                Y, XA = _base(X2, P, dt, m, AB) if fuse else lora_forward(X2, P, dt, m, AB)
                outs.append(Y)
                xas.append(XA)
            if len(ins) == 2:
                G, U = outs
            else:
                F = outs[0].shape[-1] // 2
                G, U = outs[0][:, :F], outs[0][:, F:]
            AB = adapters(down, dt)
            if fuse:                    # G, U hold the base products only; the kernel adds the LoRA terms per tile
                xg, xu, Bg, Bu, sg, su = _gate_up_lora(ins, xas, abs_, G.shape[-1])
                H, HA = _glu.glu_lora_forward(G, U, xg, xu, Bg, Bu, sg, su, act, a_down=AB[0], mask_down=m_down)
                W = dense_weight(down, dt)
                Y = torch.addmm(down.bias.to(dt), H, W.t()) if down.bias is not None else H @ W.t()
                del W
                Y.addmm_(HA, AB[1].t(), alpha=down.s)
            else:
                H = _glu.glu_forward(G, U, act)
                Y, HA = lora_forward(H, down, dt, m_down, AB)
            abs_ += list(AB)
            del H
        ctx.ins, ctx.down, ctx.act, ctx.dt, ctx.x_shape, ctx.x_dtype = ins, down, act, dt, X.shape, X.dtype
        ctx.has_mask, ctx.fuse = [m is not None for m in masks], fuse
        ctx.save_for_backward(X2, *outs, *xas, HA, *abs_, *[m for m in masks if m is not None])
        return Y.view(*X.shape[:-1], Y.shape[-1])

    @staticmethod
    def backward(ctx, dY):
        ins, down, dt = ctx.ins, ctx.down, ctx.dt
        n = len(ins)
        saved = list(ctx.saved_tensors)
        X2, outs, xas, HA = saved[0], saved[1:1 + n], saved[1 + n:1 + 2 * n], saved[1 + 2 * n]
        abs_ = saved[2 + 2 * n:4 + 4 * n]
        rest = saved[4 + 4 * n:]
        masks = [rest.pop(0) if h else None for h in ctx.has_mask]
        m_in, m_down = masks[:-1], masks[-1]
        nig = ctx.needs_input_grad            # X, ins, down, act, masks, fuse, A/B...
        with torch.autocast(X2.device.type, enabled=False):
            dY2 = dY.reshape(-1, dY.shape[-1])
            if dY2.dtype != dt:
                dY2 = dY2.to(dt)
            if n == 2:
                G, U = outs
            else:
                F = outs[0].shape[-1] // 2
                G, U = outs[0][:, :F], outs[0][:, F:]
            # dH = dY·W_d + s·(dY·B_d)·A_d  (masked when the down adapter has dropout)
            AB_d = abs_[2 * n:2 * n + 2]
            dYBs = [None] * n
            if ctx.fuse:                # the kernel adds the LoRA term to dH and returns dG·B_g, dU·B_u
                W = dense_weight(down, dt)
                dH = dY2 @ W
                del W
                dYB = dY2 @ AB_d[1]
                xg, xu, Bg, Bu, sg, su = _gate_up_lora(ins, xas, abs_, G.shape[-1])
                H, dG, dU, dYBg, dYBu = _glu.glu_lora_backward(dH, G, U, xg, xu, Bg, Bu, sg, su, dYB, AB_d[0], down.s,
                                                               ctx.act, mask_down=m_down, sum_gu=n == 1)
                dYBs = [dYBg, dYBu] if n == 2 else [dYBg]
            else:
                dH, _, _, dYB = lora_backward(dY2, None, None, down, dt, m_down, None, True, False, False, AB=AB_d)
                H, dG, dU = _glu.glu_backward(dH, G, U, ctx.act, inplace=True)      # H over dH, dG over G, dU over U
            _, dA_d, dB_d, _ = lora_backward(dY2, H, HA, down, dt, m_down, None, False, nig[6 + 2 * n], nig[7 + 2 * n],
                                             AB=AB_d, dYB=dYB)
            del H, dH
            grads, dX = [], None
            d_outs = [dG, dU] if n == 2 else [outs[0]]               # Phi-3: [dG | dU] now fills the fused buffer
            for i, (P, dP, XA, m, dYBp) in enumerate(zip(ins, d_outs, xas, m_in, dYBs)):
                dX, dA, dB, _ = lora_backward(dP, X2, XA, P, dt, m, dX, nig[0], nig[6 + 2 * i], nig[7 + 2 * i],
                                              AB=abs_[2 * i:2 * i + 2], dYB=dYBp)
                grads += [dA, dB]
        if dX is not None:
            dX = dX.view(ctx.x_shape)
            if dX.dtype != ctx.x_dtype:
                dX = dX.to(ctx.x_dtype)
        return (dX, None, None, None, None, None, *grads, dA_d, dB_d)


def lora_mlp(X, ins: list[LoRAProj], down: LoRAProj, act: str = "silu", masks=None, fuse_lora_b: bool | None = None):
    """The MLP output. ``ins`` is [gate, up] or [gate_up] (fused, split in halves). ``masks`` (optional) are the
    dropout masks for each input projection and then for down; by default they come from the peft dropout modules
    in peft's order (gate, up, down). ``fuse_lora_b``: add the rank-r LoRA terms inside the GLU kernels (see the
    module docstring); None takes the module default ``FUSE_LORA_B`` (True)."""
    if fuse_lora_b is None:
        fuse_lora_b = FUSE_LORA_B
    if masks is None:
        X_shape = X.shape
        masks = [make_mask(P, X_shape, X) for P in ins]
        F = down.in_features
        masks.append(make_mask(down, (*X_shape[:-1], F), X))
    masks = [None if m is None else m.reshape(-1, m.shape[-1]) for m in masks]
    AB = [t for P in (*ins, down) for t in (P.A, P.B)]
    return LoRAMLPFunction.apply(X, list(ins), down, act, list(masks), bool(fuse_lora_b), *AB)


def reference(X, ins, down, act="silu", masks=None):
    "Plain PyTorch, as peft + transformers compute the MLP."
    masks = masks or [None] * (len(ins) + 1)
    outs = [proj_reference(X, P, m.view(*X.shape[:-1], -1) if m is not None else None) for P, m in zip(ins, masks[:-1])]
    if len(ins) == 2:
        G, U = outs
    else:
        G, U = outs[0].chunk(2, dim=-1)
    H = _glu.reference(G, U, act)
    m = masks[-1]
    return proj_reference(H, down, m.view(*H.shape[:-1], -1) if m is not None else None)
