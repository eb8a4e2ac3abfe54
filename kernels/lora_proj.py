"""LoRA QKV and LoRA O: n LoRA projections of one input in one autograd node.

``Y_i = X·W_iᵀ + b_i + s_i·(Xd_i·A_iᵀ)·B_iᵀ`` for i = 1..n (QKV: n=3; O, Phi-3's fused qkv_proj or any other single
LoRA linear: n=1). Saved for backward: X (once, in the compute dtype: no fp32 copy), the n small ``Xd·Aᵀ`` products
(tokens × r), the dropout masks when dropout > 0, and the adapter matrices. The base weights get no gradient; the
backward sums ``dY_i·W_i + s_i·(dY_i·B_i)·A_i`` into one dX and returns ``dA_i = s·(dY_i·B_i)ᵀ·Xd_i``,
``dB_i = s·dY_iᵀ·(Xd_i·A_iᵀ)`` in the adapters' dtype (fp32 adapters stay fp32; only the matmuls run in bf16/fp16).
"""
from __future__ import annotations

import torch

from ._util import compute_dtype
from .lora_common import LoRAProj, adapters, lora_backward, lora_forward, make_mask, proj_reference


class LoRAProjFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, projs, masks, *AB):
        dt = compute_dtype(X, projs[0].weight.dtype if projs[0].quant_state is None else projs[0].quant_state.dtype)
        with torch.autocast(X.device.type, enabled=False):
            X2 = X.reshape(-1, X.shape[-1])
            if X2.dtype != dt:
                X2 = X2.to(dt)
            outs, xas, abs_ = [], [], []
            for P, m in zip(projs, masks):
                AB = adapters(P, dt)
                abs_ += list(AB)
                Y, XA = lora_forward(X2, P, dt, m, AB)
                outs.append(Y.view(*X.shape[:-1], Y.shape[-1]))
                xas.append(XA)
        ctx.projs, ctx.dt, ctx.x_shape, ctx.x_dtype = projs, dt, X.shape, X.dtype
        ctx.has_mask = [m is not None for m in masks]
        ctx.save_for_backward(X2, *xas, *abs_, *[m for m in masks if m is not None])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dYs):
        projs, dt = ctx.projs, ctx.dt
        saved = ctx.saved_tensors
        n = len(projs)
        X2, xas, abs_, rest = saved[0], saved[1:1 + n], saved[1 + n:1 + 3 * n], list(saved[1 + 3 * n:])
        masks = [rest.pop(0) if h else None for h in ctx.has_mask]
        need_dx = ctx.needs_input_grad[0]
        dX, grads = None, []
        with torch.autocast(X2.device.type, enabled=False):
            for i, (P, dY, XA, m) in enumerate(zip(projs, dYs, xas, masks)):
                dY2 = dY.reshape(-1, dY.shape[-1])
                if dY2.dtype != dt:
                    dY2 = dY2.to(dt)
                dX, dA, dB, _ = lora_backward(dY2, X2, XA, P, dt, m, dX, need_dx, ctx.needs_input_grad[3 + 2 * i],
                                              ctx.needs_input_grad[4 + 2 * i], AB=abs_[2 * i:2 * i + 2])
                grads += [dA, dB]
        if dX is not None:
            dX = dX.view(ctx.x_shape)
            if dX.dtype != ctx.x_dtype:
                dX = dX.to(ctx.x_dtype)
        return (dX, None, None, *grads)


def lora_projections(X: torch.Tensor, projs: list[LoRAProj], masks=None):
    "Fused forward of n LoRA projections of X; returns a tuple of n outputs."
    if masks is None:
        masks = [make_mask(P, X.shape, X) for P in projs]
    masks = [None if m is None else m.reshape(-1, m.shape[-1]) for m in masks]
    AB = [t for P in projs for t in (P.A, P.B)]
    return LoRAProjFunction.apply(X, list(projs), list(masks), *AB)


def lora_qkv(X, q: LoRAProj, k: LoRAProj, v: LoRAProj, masks=None):
    "(Q, K, V) of X in one autograd node."
    return lora_projections(X, [q, k, v], masks)


def lora_o(X, o: LoRAProj, mask=None):
    "One LoRA projection (the attention output, or any other LoRA linear) in one autograd node."
    return lora_projections(X, [o], None if mask is None and o.p > 0 else [mask])[0]


def reference(X, projs, masks=None):
    masks = masks or [None] * len(projs)
    return tuple(proj_reference(X, P, m) for P, m in zip(projs, masks))
