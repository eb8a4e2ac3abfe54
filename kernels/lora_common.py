"""What the fused LoRA functions share: reading a peft LoRA layer, the base weight in the compute dtype (NF4
dequantized on the fly), dropout masks and the fused ``X·Wᵀ + s·(X·Aᵀ)·Bᵀ + b`` product.

Nothing here keeps state between calls; a dequantized NF4 weight lives only for the matmul that needs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import nf4


@dataclass
class LoRAProj:
    "One LoRA projection: frozen base (dense or NF4) + trainable A (r, in), B (out, r), scale s, dropout p."
    weight: torch.Tensor              # dense (out, in), or the packed NF4 bytes
    quant_state: Any = None           # bitsandbytes QuantState when the base is NF4
    bias: torch.Tensor | None = None
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    s: float = 1.0
    p: float = 0.0
    dropout: Any = None               # the peft dropout module (makes the masks, so RNG use matches peft's)

    @property
    def out_features(self) -> int:
        return int(self.quant_state.shape[0]) if self.quant_state is not None else int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.quant_state.shape[1]) if self.quant_state is not None else int(self.weight.shape[1])


def dense_weight(P: LoRAProj, dt: torch.dtype) -> torch.Tensor:
    "The base weight (out, in) in dtype dt (NF4: dequantized by the Triton kernel, or bitsandbytes off-GPU)."
    if P.quant_state is not None:
        if P.weight.is_cuda or nf4.torch_fallback_not_needed(P.weight):
            return nf4.dequantize(P.weight, P.quant_state, dt)
        return nf4.reference(P.weight, P.quant_state, dt)
    w = P.weight
    return w if w.dtype == dt else w.to(dt)


def make_mask(P: LoRAProj, shape, like: torch.Tensor):
    "Dropout mask for the LoRA branch (values 0 or 1/(1-p) in like's dtype), or None when there is no dropout."
    if P.p <= 0 or P.dropout is None or not P.dropout.training:
        return None
    return P.dropout(torch.ones(shape, dtype=like.dtype, device=like.device))


def adapters(P: LoRAProj, dt):
    "A and B in the compute dtype (cast once per forward; the backward reuses them)."
    return (P.A if P.A.dtype == dt else P.A.to(dt)), (P.B if P.B.dtype == dt else P.B.to(dt))


def lora_forward(X2: torch.Tensor, P: LoRAProj, dt, mask=None, AB=None):
    "Y = X·Wᵀ + b + s·(Xd·Aᵀ)·Bᵀ and XA = Xd·Aᵀ (kept for dB), all in dt. `AB`: A, B already in dt."
    Ac, Bc = AB if AB is not None else adapters(P, dt)
    W = dense_weight(P, dt)
    Y = torch.addmm(P.bias.to(dt), X2, W.t()) if P.bias is not None else X2 @ W.t()
    del W
    Xl = X2 if mask is None else X2 * mask
    XA = Xl @ Ac.t()
    Y.addmm_(XA, Bc.t(), alpha=P.s)
    return Y, XA


def lora_backward(dY: torch.Tensor, Xin: torch.Tensor, XA: torch.Tensor, P: LoRAProj, dt, mask, dX, need_dx: bool,
                  need_a: bool, need_b: bool, AB=None, dYB=None):
    """Gradients of one projection: adds dY·W + s·(dY·B)·A (masked) into dX (allocating it when None) and returns
    (dX, dA, dB, dY·B) with dA = s·(dY·B)ᵀ·Xd and dB = s·dYᵀ·XA. `AB`: A, B in dt from the forward; `dYB`: dY·B
    when already computed."""
    Ac, Bc = AB if AB is not None else adapters(P, dt)
    if dYB is None:
        dYB = dY @ Bc
    if need_dx:
        W = dense_weight(P, dt)
        if dX is None:
            dX = dY @ W
        else:
            dX.addmm_(dY, W)
        del W
        if mask is None:
            dX.addmm_(dYB, Ac, alpha=P.s)
        else:
            dX.add_((dYB @ Ac).mul_(mask), alpha=P.s)
    dA = dB = None
    if need_a:
        Xl = Xin if mask is None else Xin * mask
        dA = (dYB.t() @ Xl).mul_(P.s).to(P.A.dtype)
    if need_b:
        dB = (dY.t() @ XA).mul_(P.s).to(P.B.dtype)
    return dX, dA, dB, dYB


def proj_reference(X: torch.Tensor, P: LoRAProj, mask=None) -> torch.Tensor:
    "Plain PyTorch (what peft computes): base(X) + s·B(A(dropout(X)))."
    W = P.weight if P.quant_state is None else nf4.reference(P.weight, P.quant_state, X.dtype)
    Y = torch.nn.functional.linear(X, W.to(X.dtype), None if P.bias is None else P.bias.to(X.dtype))
    Xl = X if mask is None else X * mask
    return Y + P.s * ((Xl @ P.A.to(X.dtype).t()) @ P.B.to(X.dtype).t())
