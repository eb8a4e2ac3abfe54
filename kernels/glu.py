"""Gated linear units: SwiGLU (``silu``) and GeGLU (exact ``gelu`` with erf, ``gelu_pytorch_tanh`` with tanh).

``h = act(g) * u``, rounded like Hugging Face's MLPs: ``act(g)`` is computed in fp32, rounded to the input dtype,
then multiplied by ``u`` (one more rounding). The backward recomputes ``act(g)`` from ``g`` and returns
``(h, dg, du)``; the LoRA MLP uses the in-place form (``h`` over ``dh``, ``dg`` over ``g``, ``du`` over ``u``) so that
the forward never has to keep ``h``.

Rows may be strided views (Phi-3's ``gate_up_proj`` output split in two); the last dimension must be contiguous.

``glu_lora_forward`` / ``glu_lora_backward`` are the LoRA MLP's variants: they add the gate / up LoRA terms
(tokens × r times r × intermediate) to each tile before the activation and fold in the down projection's rank-r
products, so that no tokens × intermediate tensor is passed over only for a rank-r term (see below).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._util import interpret

# hidden_act -> kernel code. gelu_new / gelu_fast are computed by transformers in the input dtype with several
# roundings, so no kernel here reproduces them exactly: they are not listed (the patch step says so).
ACTIVATIONS = {"silu": 0, "swish": 0, "gelu": 1, "gelu_pytorch_tanh": 2}

_SQRT1_2 = 1 / math.sqrt(2)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)
_K_TANH = math.sqrt(2 / math.pi)


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    "f(g) and f'(g) in fp32."
    if ACT == 0:
        s = tl.sigmoid(g)
        f = g * s
        df = s * (1.0 + g * (1.0 - s))
    elif ACT == 1:
        e = tl.math.erf(g * 0.7071067811865476)
        f = 0.5 * g * (1.0 + e)
        df = 0.5 * (1.0 + e) + g * tl.exp(-0.5 * g * g) * 0.3989422804014327
    else:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        f = 0.5 * g * (1.0 + t)
        df = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
    return f, df


@triton.jit
def _glu_fwd_kernel(g_ptr, u_ptr, h_ptr, n_cols, sg, su, sh, ACT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < n_cols
    g = tl.load(g_ptr + row * sg + cols, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * su + cols, mask=m, other=0.0)
    f, _ = _act_and_grad(g, ACT)
    f = f.to(u.dtype).to(tl.float32)                      # HF rounds act(g) to the dtype before the product
    tl.store(h_ptr + row * sh + cols, (f * u.to(tl.float32)).to(h_ptr.dtype.element_ty), mask=m)


@triton.jit
def _glu_bwd_kernel(dh_ptr, g_ptr, u_ptr, h_ptr, dg_ptr, du_ptr, n_cols, sdh, sg, su, sh, sdg, sdu,
                    ACT: tl.constexpr, STORE_H: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < n_cols
    dh = tl.load(dh_ptr + row * sdh + cols, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row * sg + cols, mask=m, other=0.0).to(tl.float32)
    u_raw = tl.load(u_ptr + row * su + cols, mask=m, other=0.0)
    u = u_raw.to(tl.float32)
    f, dfdg = _act_and_grad(g, ACT)
    f = f.to(u_raw.dtype).to(tl.float32)
    if STORE_H:
        tl.store(h_ptr + row * sh + cols, (f * u).to(h_ptr.dtype.element_ty), mask=m)
    tl.store(du_ptr + row * sdu + cols, (dh * f).to(du_ptr.dtype.element_ty), mask=m)
    tl.store(dg_ptr + row * sdg + cols, (dh * u * dfdg).to(dg_ptr.dtype.element_ty), mask=m)


def _rows(t: torch.Tensor) -> torch.Tensor:
    "2-D (rows, cols) view with a contiguous last dim (no copy when possible)."
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def _act_code(act: str) -> int:
    try:
        return ACTIVATIONS[act]
    except KeyError:
        raise ValueError(f"no GLU kernel for hidden_act={act!r}; kernels exist for {sorted(ACTIVATIONS)}") from None


def _grid(rows, cols, block):
    return (rows, triton.cdiv(cols, block))


def glu_forward(g: torch.Tensor, u: torch.Tensor, act: str = "silu", out: torch.Tensor | None = None) -> torch.Tensor:
    "h = act(g) * u (Triton)."
    code = _act_code(act)
    g2, u2 = _rows(g), _rows(u)
    R, C = g2.shape
    h = out if out is not None else torch.empty(g.shape, dtype=u.dtype, device=u.device)
    h2 = _rows(h)
    BLOCK = min(1024, triton.next_power_of_2(C))
    _glu_fwd_kernel[_grid(R, C, BLOCK)](g2, u2, h2, C, g2.stride(0), u2.stride(0), h2.stride(0), ACT=code, BLOCK=BLOCK)
    return h


def glu_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, act: str = "silu", *, inplace: bool = False,
                 want_h: bool = True):
    """(h, dg, du) from the incoming gradient. ``inplace=True`` writes h over dh, dg over g and du over u
    (all three must then be writable, row-contiguous buffers that nothing else needs)."""
    code = _act_code(act)
    dh2, g2, u2 = _rows(dh), _rows(g), _rows(u)
    R, C = g2.shape
    if inplace:
        h2, dg2, du2 = dh2, g2, u2
    else:
        h2 = torch.empty((R, C), dtype=u.dtype, device=u.device) if want_h else dh2
        dg2 = torch.empty((R, C), dtype=g.dtype, device=g.device)
        du2 = torch.empty((R, C), dtype=u.dtype, device=u.device)
    BLOCK = min(1024, triton.next_power_of_2(C))
    _glu_bwd_kernel[_grid(R, C, BLOCK)](dh2, g2, u2, h2, dg2, du2, C, dh2.stride(0), g2.stride(0), u2.stride(0),
                                        h2.stride(0), dg2.stride(0), du2.stride(0), ACT=code, STORE_H=want_h,
                                        BLOCK=BLOCK)
    shape = g.shape
    return (h2.view(shape) if want_h else None), dg2.view(shape), du2.view(shape)


class GLUFunction(torch.autograd.Function):
    "Autograd wrapper: saves g and u only."

    @staticmethod
    def forward(ctx, g, u, act: str = "silu"):
        ctx.act = act
        ctx.save_for_backward(g, u)
        return glu_forward(g, u, act)

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        _, dg, du = glu_backward(dh.contiguous(), g, u, ctx.act, want_h=False)
        return dg, du, None


def glu(g: torch.Tensor, u: torch.Tensor, act: str = "silu") -> torch.Tensor:
    return GLUFunction.apply(g, u, act)


def reference(g: torch.Tensor, u: torch.Tensor, act: str = "silu") -> torch.Tensor:
    "Plain PyTorch, exactly as transformers' MLPs compute it."
    import torch.nn.functional as F
    if act in ("silu", "swish"):
        f = F.silu(g)
    elif act == "gelu":
        f = F.gelu(g)
    elif act == "gelu_pytorch_tanh":
        f = F.gelu(g, approximate="tanh")
    else:
        raise ValueError(act)
    return f * u


# ------------------------------------------------------------------------------------------ GLU with LoRA-B fused
# The LoRA MLP's gate and up outputs are G = G0 + s_g·(XA_g·B_gᵀ), U = U0 + s_u·(XA_u·B_uᵀ) (G0, U0: the base GEMMs,
# XA: tokens × r). Instead of adding the rank-r term into G0 / U0 with two addmm_ passes over tokens × intermediate,
# the kernels below add it to each tile in fp32 (one tl.dot, K = r) and round once to the compute dtype -- what
# addmm_ does, up to the summation order of the r products. Only G0 and U0 are kept for the backward, which recomputes
# G and U the same way. The forward also accumulates HA = (H·m_down)·A_downᵀ (the down projection's tokens × r
# product) and the backward adds the down LoRA term into dH, writes H, dG, dU in place and accumulates dG·B_g and
# dU·B_u. Passes over tokens × intermediate tensors: forward 11 -> 6 (the two addmm_ read + write, H·A_downᵀ reads H),
# backward 16 -> 12 (dH's addmm_ read + write, dG·B_g and dU·B_u read dG and dU). Programs own BT rows × NCHUNK·BF
# columns; the row sums over columns go to fp32 partials (one per column group, summed by the caller: deterministic,
# no atomics).

def _upcast(dtype: torch.dtype) -> bool:
    "Triton's interpreter gets fp16 / bf16 tl.dot wrong: there the operands go in as fp32 (same values)."
    return interpret() and dtype != torch.float32


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 or _upcast(dtype) else "tf32"


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    "a @ b, fp32 accumulation (fp16 / bf16 products are exact in fp32; fp32 operands: IEEE, never tf32)."
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _lora_tile(b0_ptr, sb0, xa, b_ptr, sb, s, rows, cols, ks, m2, bm, PREC: tl.constexpr, UPCAST: tl.constexpr):
    "(b0 + s·xa·B[cols]ᵀ) rounded to b0's dtype, in fp32; also the B tile [BF, R] for the backward's dot."
    b = tl.load(b_ptr + cols[:, None] * sb + ks[None, :], mask=bm, other=0.0)
    x0 = tl.load(b0_ptr + rows[:, None] * sb0 + cols[None, :], mask=m2, other=0.0)
    y = x0.to(tl.float32) + s * _dot(xa, tl.trans(b), PREC, UPCAST)
    return y.to(x0.dtype).to(tl.float32), b


@triton.jit
def _glu_lora_fwd_kernel(g_ptr, u_ptr, h_ptr, xag_ptr, xau_ptr, bg_ptr, bu_ptr, ad_ptr, md_ptr, ha_ptr,
                         T, F, rg, ru, rd, sg, su, sh, sxg, sxu, sbg, sbu, sad, smd, s_g, s_u,
                         ACT: tl.constexpr, HAS_HA: tl.constexpr, HAS_MASK: tl.constexpr, BT: tl.constexpr,
                         BF: tl.constexpr, R: tl.constexpr, NCHUNK: tl.constexpr, PREC: tl.constexpr,
                         UPCAST: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    rm = rows < T
    ks = tl.arange(0, R)
    xag = tl.load(xag_ptr + rows[:, None] * sxg + ks[None, :], mask=rm[:, None] & (ks[None, :] < rg), other=0.0)
    xau = tl.load(xau_ptr + rows[:, None] * sxu + ks[None, :], mask=rm[:, None] & (ks[None, :] < ru), other=0.0)
    acc = tl.zeros([BT, R], dtype=tl.float32)
    for c in range(NCHUNK):
        cols = (tl.program_id(1) * NCHUNK + c).to(tl.int64) * BF + tl.arange(0, BF)
        cm = cols < F
        m2 = rm[:, None] & cm[None, :]
        g, _b = _lora_tile(g_ptr, sg, xag, bg_ptr, sbg, s_g, rows, cols, ks, m2, cm[:, None] & (ks[None, :] < rg),
                           PREC, UPCAST)
        u, _b = _lora_tile(u_ptr, su, xau, bu_ptr, sbu, s_u, rows, cols, ks, m2, cm[:, None] & (ks[None, :] < ru),
                           PREC, UPCAST)
        f, _ = _act_and_grad(g, ACT)
        f = f.to(h_ptr.dtype.element_ty).to(tl.float32)         # HF rounds act(g) to the dtype before the product
        h = (f * u).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + rows[:, None] * sh + cols[None, :], h, mask=m2)
        if HAS_HA:
            if HAS_MASK:
                md = tl.load(md_ptr + rows[:, None] * smd + cols[None, :], mask=m2, other=0.0)
                h = (h.to(tl.float32) * md.to(tl.float32)).to(h_ptr.dtype.element_ty)
            ad = tl.load(ad_ptr + ks[None, :] * sad + cols[:, None], mask=cm[:, None] & (ks[None, :] < rd), other=0.0)
            acc += _dot(h, ad, PREC, UPCAST)
    if HAS_HA:
        part = ha_ptr + tl.program_id(1).to(tl.int64) * T * R
        tl.store(part + rows[:, None] * R + ks[None, :], acc, mask=rm[:, None])


@triton.jit
def _glu_lora_bwd_kernel(dh_ptr, g_ptr, u_ptr, xag_ptr, xau_ptr, bg_ptr, bu_ptr, dyb_ptr, ad_ptr, md_ptr, out_ptr,
                         T, F, rg, ru, rd, sdh, sg, su, sxg, sxu, sbg, sbu, sdyb, sad, smd, s_g, s_u, s_d,
                         ACT: tl.constexpr, HAS_MASK: tl.constexpr, SUM_GU: tl.constexpr, BT: tl.constexpr,
                         BF: tl.constexpr, R: tl.constexpr, NCHUNK: tl.constexpr, PREC: tl.constexpr,
                         UPCAST: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    rm = rows < T
    ks = tl.arange(0, R)
    xag = tl.load(xag_ptr + rows[:, None] * sxg + ks[None, :], mask=rm[:, None] & (ks[None, :] < rg), other=0.0)
    xau = tl.load(xau_ptr + rows[:, None] * sxu + ks[None, :], mask=rm[:, None] & (ks[None, :] < ru), other=0.0)
    dyb = tl.load(dyb_ptr + rows[:, None] * sdyb + ks[None, :], mask=rm[:, None] & (ks[None, :] < rd), other=0.0)
    acc_g = tl.zeros([BT, R], dtype=tl.float32)
    acc_u = tl.zeros([BT, R], dtype=tl.float32)
    for c in range(NCHUNK):
        cols = (tl.program_id(1) * NCHUNK + c).to(tl.int64) * BF + tl.arange(0, BF)
        cm = cols < F
        m2 = rm[:, None] & cm[None, :]
        g, bg = _lora_tile(g_ptr, sg, xag, bg_ptr, sbg, s_g, rows, cols, ks, m2, cm[:, None] & (ks[None, :] < rg),
                           PREC, UPCAST)
        u, bu = _lora_tile(u_ptr, su, xau, bu_ptr, sbu, s_u, rows, cols, ks, m2, cm[:, None] & (ks[None, :] < ru),
                           PREC, UPCAST)
        # dH = dH0 + s_d·(dY·B_d)·A_d (masked by the down adapter's dropout), rounded like dX.addmm_ / add_
        ad = tl.load(ad_ptr + ks[:, None] * sad + cols[None, :], mask=(ks[:, None] < rd) & cm[None, :], other=0.0)
        dlo = _dot(dyb, ad, PREC, UPCAST)
        if HAS_MASK:
            dlo = dlo * tl.load(md_ptr + rows[:, None] * smd + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        dh0 = tl.load(dh_ptr + rows[:, None] * sdh + cols[None, :], mask=m2, other=0.0)
        dh = (dh0.to(tl.float32) + s_d * dlo).to(dh0.dtype).to(tl.float32)
        f, dfdg = _act_and_grad(g, ACT)
        f = f.to(dh0.dtype).to(tl.float32)
        tl.store(dh_ptr + rows[:, None] * sdh + cols[None, :], (f * u).to(dh0.dtype), mask=m2)       # H over dH0
        du = (dh * f).to(dh0.dtype)
        dg = (dh * u * dfdg).to(dh0.dtype)
        tl.store(u_ptr + rows[:, None] * su + cols[None, :], du, mask=m2)                             # dU over U0
        tl.store(g_ptr + rows[:, None] * sg + cols[None, :], dg, mask=m2)                             # dG over G0
        acc_g += _dot(dg, bg, PREC, UPCAST)
        acc_u += _dot(du, bu, PREC, UPCAST)
    part = out_ptr + tl.program_id(1).to(tl.int64) * (2 * T * R)
    if SUM_GU:                                      # one fused gate_up projection: dY·B = dG·B_g + dU·B_u
        tl.store(part + rows[:, None] * R + ks[None, :], acc_g + acc_u, mask=rm[:, None])
    else:
        tl.store(part + rows[:, None] * R + ks[None, :], acc_g, mask=rm[:, None])
        tl.store(part + T * R + rows[:, None] * R + ks[None, :], acc_u, mask=rm[:, None])


# (BT, BF, NCHUNK, num_warps) for the forward and the backward: rows per program, columns per tile, tiles per program.
# Not tuned on a GPU yet; the lead's benchmark may change them.
LORA_GLU_BLOCKS = {"fwd": (32, 128, 8, 4), "bwd": (32, 128, 8, 8)}


def _lora_cfg(which: str, T: int, F: int, r: int):
    BT, BF, NCH, W = LORA_GLU_BLOCKS[which]
    BF = max(16, min(BF, triton.next_power_of_2(F)))
    NCH = max(1, min(NCH, triton.cdiv(F, BF)))
    R = max(16, triton.next_power_of_2(r))
    return BT, BF, NCH, W, R, (triton.cdiv(T, BT), triton.cdiv(F, BF * NCH))


def _small(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def glu_lora_forward(g0, u0, xa_g, xa_u, b_g, b_u, s_g: float, s_u: float, act: str = "silu", a_down=None,
                     mask_down=None):
    """H = act(G)·U with G = g0 + s_g·xa_g·b_gᵀ, U = u0 + s_u·xa_u·b_uᵀ (g0, u0: tokens × F rows, possibly strided
    halves; xa: tokens × r; b: F × r). With ``a_down`` (r_d × F) also returns HA = (H·mask_down)·a_downᵀ (tokens × r_d,
    in H's dtype), else None. g0 and u0 are not changed."""
    code = _act_code(act)
    g2, u2 = _rows(g0), _rows(u0)
    T, F = g2.shape
    xa_g, xa_u, b_g, b_u = _small(xa_g), _small(xa_u), _small(b_g), _small(b_u)
    rg, ru = xa_g.shape[1], xa_u.shape[1]
    rd = a_down.shape[0] if a_down is not None else 1
    BT, BF, NCH, W, R, grid = _lora_cfg("fwd", T, F, max(rg, ru, rd))
    h = torch.empty((T, F), dtype=u2.dtype, device=u2.device)
    has_ha = a_down is not None
    ad = _small(a_down) if has_ha else b_g
    md = _rows(mask_down) if mask_down is not None else h
    part = torch.empty((grid[1], T, R) if has_ha else (1,), dtype=torch.float32, device=h.device)
    _glu_lora_fwd_kernel[grid](g2, u2, h, xa_g, xa_u, b_g, b_u, ad, md, part, T, F, rg, ru, rd,
                               g2.stride(0), u2.stride(0), h.stride(0), xa_g.stride(0), xa_u.stride(0),
                               b_g.stride(0), b_u.stride(0), ad.stride(0), md.stride(0), float(s_g), float(s_u),
                               ACT=code, HAS_HA=has_ha, HAS_MASK=mask_down is not None, BT=BT, BF=BF, R=R, NCHUNK=NCH,
                               PREC=_prec(h.dtype), UPCAST=_upcast(h.dtype), num_warps=W)
    ha = None
    if has_ha:
        ha = (part[0] if grid[1] == 1 else part.sum(0))[:, :rd].to(h.dtype)
    return h.view(g0.shape), ha


def glu_lora_backward(dh0, g0, u0, xa_g, xa_u, b_g, b_u, s_g: float, s_u: float, dyb_down, a_down, s_d: float,
                      act: str = "silu", mask_down=None, sum_gu: bool = False):
    """In place: dH = dh0 + s_d·(dyb_down·a_down)·mask_down; H over dh0, dG over g0, dU over u0 (G, U recomputed as
    in ``glu_lora_forward``). Returns (H, dG, dU, dG·b_g, dU·b_u), the last two tokens × r in the dtype; with
    ``sum_gu`` (Phi-3's one gate_up projection, b_g / b_u the halves of its B) (H, dG, dU, dG·b_g + dU·b_u, None).
    dh0 must be a row-contiguous buffer; g0 / u0 writable rows (strided halves allowed)."""
    code = _act_code(act)
    dh2, g2, u2 = _rows(dh0), _rows(g0), _rows(u0)
    assert dh2.data_ptr() == dh0.data_ptr() and g2.data_ptr() == g0.data_ptr() and u2.data_ptr() == u0.data_ptr(), \
        "glu_lora_backward writes in place: row-contiguous buffers needed"
    T, F = g2.shape
    xa_g, xa_u, b_g, b_u = _small(xa_g), _small(xa_u), _small(b_g), _small(b_u)
    dyb, ad = _small(dyb_down), _small(a_down)
    rg, ru, rd = xa_g.shape[1], xa_u.shape[1], ad.shape[0]
    BT, BF, NCH, W, R, grid = _lora_cfg("bwd", T, F, max(rg, ru, rd))
    md = _rows(mask_down) if mask_down is not None else dh2
    part = torch.empty((grid[1], 2, T, R), dtype=torch.float32, device=dh2.device)
    _glu_lora_bwd_kernel[grid](dh2, g2, u2, xa_g, xa_u, b_g, b_u, dyb, ad, md, part, T, F, rg, ru, rd,
                               dh2.stride(0), g2.stride(0), u2.stride(0), xa_g.stride(0), xa_u.stride(0),
                               b_g.stride(0), b_u.stride(0), dyb.stride(0), ad.stride(0), md.stride(0),
                               float(s_g), float(s_u), float(s_d), ACT=code, HAS_MASK=mask_down is not None,
                               SUM_GU=sum_gu, BT=BT, BF=BF, R=R, NCHUNK=NCH, PREC=_prec(dh2.dtype),
                               UPCAST=_upcast(dh2.dtype), num_warps=W)
    red = part[0] if grid[1] == 1 else part.sum(0)
    dt = dh2.dtype
    if sum_gu:
        return dh0, g0, u0, red[0, :, :rg].to(dt), None
    return dh0, g0, u0, red[0, :, :rg].to(dt), red[1, :, :ru].to(dt)
