"""LoRA MLP: ``down(act(gate(X)) * up(X))`` with LoRA on all three projections, in one autograd node.

Gate and up are two projections (Llama, Qwen, Mistral, Gemma) or one fused ``gate_up_proj`` whose output is split in
halves (Phi-3). Saved for backward: X, the gate and up outputs G and U (tokens × intermediate each, compute dtype),
the small ``X·Aᵀ`` / ``H·A_downᵀ`` products and the dropout masks when dropout > 0. ``H = act(G)·U`` is not kept:
the backward GLU kernel recomputes it while it writes ``dG`` and ``dU`` over G and U. The activation is SwiGLU or
GeGLU (erf or tanh), chosen from ``hidden_act``; see ``glu.py``.
"""
from __future__ import annotations

import torch

from . import glu as _glu
from ._util import compute_dtype
from .lora_common import LoRAProj, adapters, lora_backward, lora_forward, make_mask, proj_reference


class LoRAMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, ins, down, act, masks, *AB):
        P0 = ins[0]
        dt = compute_dtype(X, P0.weight.dtype if P0.quant_state is None else P0.quant_state.dtype)
        with torch.autocast(X.device.type, enabled=False):
            X2 = X.reshape(-1, X.shape[-1])
            if X2.dtype != dt:
                X2 = X2.to(dt)
            m_in, m_down = masks[:-1], masks[-1]
            outs, xas, abs_ = [], [], []
            for P, m in zip(ins, m_in):
                AB = adapters(P, dt)
                abs_ += list(AB)
                Y, XA = lora_forward(X2, P, dt, m, AB)
                outs.append(Y)
                xas.append(XA)
            if len(ins) == 2:
                G, U = outs
            else:
                F = outs[0].shape[-1] // 2
                G, U = outs[0][:, :F], outs[0][:, F:]
            H = _glu.glu_forward(G, U, act)
            AB = adapters(down, dt)
            abs_ += list(AB)
            Y, HA = lora_forward(H, down, dt, m_down, AB)
            del H
        ctx.ins, ctx.down, ctx.act, ctx.dt, ctx.x_shape, ctx.x_dtype = ins, down, act, dt, X.shape, X.dtype
        ctx.has_mask = [m is not None for m in masks]
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
        nig = ctx.needs_input_grad            # X, ins, down, act, masks, A/B...
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
            dH, _, _, dYB = lora_backward(dY2, None, None, down, dt, m_down, None, True, False, False, AB=AB_d)
            H, dG, dU = _glu.glu_backward(dH, G, U, ctx.act, inplace=True)      # H over dH, dG over G, dU over U
            _, dA_d, dB_d, _ = lora_backward(dY2, H, HA, down, dt, m_down, None, False, nig[5 + 2 * n], nig[6 + 2 * n],
                                             AB=AB_d, dYB=dYB)
            del H, dH
            grads, dX = [], None
            d_outs = [dG, dU] if n == 2 else [outs[0]]               # Phi-3: [dG | dU] now fills the fused buffer
            for i, (P, dP, XA, m) in enumerate(zip(ins, d_outs, xas, m_in)):
                dX, dA, dB, _ = lora_backward(dP, X2, XA, P, dt, m, dX, nig[0], nig[5 + 2 * i], nig[6 + 2 * i],
                                              AB=abs_[2 * i:2 * i + 2])
                grads += [dA, dB]
        if dX is not None:
            dX = dX.view(ctx.x_shape)
            if dX.dtype != ctx.x_dtype:
                dX = dX.to(ctx.x_dtype)
        return (dX, None, None, None, None, *grads, dA_d, dB_d)


def lora_mlp(X, ins: list[LoRAProj], down: LoRAProj, act: str = "silu", masks=None):
    """The MLP output. ``ins`` is [gate, up] or [gate_up] (fused, split in halves). ``masks`` (optional) are the
    dropout masks for each input projection and then for down; by default they come from the peft dropout modules
    in peft's order (gate, up, down)."""
    if masks is None:
        X_shape = X.shape
        masks = [make_mask(P, X_shape, X) for P in ins]
        F = down.in_features
        masks.append(make_mask(down, (*X_shape[:-1], F), X))
    masks = [None if m is None else m.reshape(-1, m.shape[-1]) for m in masks]
    AB = [t for P in (*ins, down) for t in (P.A, P.B)]
    return LoRAMLPFunction.apply(X, list(ins), down, act, list(masks), *AB)


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
