"""Gated linear units: SwiGLU (``silu``) and GeGLU (exact ``gelu`` with erf, ``gelu_pytorch_tanh`` with tanh).

``h = act(g) * u``, rounded like Hugging Face's MLPs: ``act(g)`` is computed in fp32, rounded to the input dtype,
then multiplied by ``u`` (one more rounding). The backward recomputes ``act(g)`` from ``g`` and returns
``(h, dg, du)``; the LoRA MLP uses the in-place form (``h`` over ``dh``, ``dg`` over ``g``, ``du`` over ``u``) so that
the forward never has to keep ``h``.

Rows may be strided views (Phi-3's ``gate_up_proj`` output split in two); the last dimension must be contiguous.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

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


@triton.jit
def _glu_fwd_flat_kernel(g_ptr, u_ptr, h_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    "The forward over contiguous g, u, h seen as one flat array: no row tails (F need not fill the block)."
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=m, other=0.0)
    f, _ = _act_and_grad(g, ACT)
    f = f.to(u.dtype).to(tl.float32)
    tl.store(h_ptr + offs, (f * u.to(tl.float32)).to(h_ptr.dtype.element_ty), mask=m)


@triton.jit
def _glu_bwd_flat_kernel(dh_ptr, g_ptr, u_ptr, h_ptr, dg_ptr, du_ptr, n, ACT: tl.constexpr, STORE_H: tl.constexpr,
                         BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    dh = tl.load(dh_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u_raw = tl.load(u_ptr + offs, mask=m, other=0.0)
    u = u_raw.to(tl.float32)
    f, dfdg = _act_and_grad(g, ACT)
    f = f.to(u_raw.dtype).to(tl.float32)
    if STORE_H:
        tl.store(h_ptr + offs, (f * u).to(h_ptr.dtype.element_ty), mask=m)
    tl.store(du_ptr + offs, (dh * f).to(du_ptr.dtype.element_ty), mask=m)
    tl.store(dg_ptr + offs, (dh * u * dfdg).to(dg_ptr.dtype.element_ty), mask=m)


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


def glu_tile(n_cols: int, flat_ok: bool, flat: bool | None = None, block: int | None = None,
             num_warps: int | None = None) -> tuple[bool, int, int]:
    """(flat, BLOCK, num_warps). ``flat``: one 1-D grid over contiguous g/u/h (only where ``flat_ok``: every tensor's
    rows are back to back), else one program per (row, column block). The default: the flat grid with blocks of 2048
    elements where the tensors allow it, else rows in blocks of up to 1024 columns; 4 warps. On an H200 (2026-12-01,
    `benchmarks/results/tune_grids_H200.md`) flat 2048 / 4 warps was the fastest of the seven grids tried at every
    shape (fwd+bwd, Qwen2.5-0.5B / Llama-3.2-1B / Llama-3-8B at 4k and 16k tokens), most for exact-erf GeGLU, whose
    rows of F = 4864 left the row grid's last block part empty. The arguments override it (benchmark knobs)."""
    flat = (bool(flat) if flat is not None else True) and flat_ok
    if block is None:
        block = 2048 if flat else min(1024, triton.next_power_of_2(n_cols))
    if block < 1 or block & (block - 1):
        raise ValueError(f"GLU block must be a power of two, got {block}")
    return flat, int(block), int(num_warps or 4)


def _flat_ok(*ts: torch.Tensor) -> bool:
    return all(t.stride(0) == t.shape[1] for t in ts)


def glu_forward(g: torch.Tensor, u: torch.Tensor, act: str = "silu", out: torch.Tensor | None = None, *,
                flat: bool | None = None, block: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    "h = act(g) * u (Triton). flat / block / num_warps: `glu_tile`'s overrides."
    code = _act_code(act)
    g2, u2 = _rows(g), _rows(u)
    R, C = g2.shape
    h = out if out is not None else torch.empty(g.shape, dtype=u.dtype, device=u.device)
    h2 = _rows(h)
    is_flat, BLOCK, warps = glu_tile(C, _flat_ok(g2, u2, h2), flat, block, num_warps)
    if is_flat:
        _glu_fwd_flat_kernel[(triton.cdiv(R * C, BLOCK),)](g2, u2, h2, R * C, ACT=code, BLOCK=BLOCK, num_warps=warps)
    else:
        _glu_fwd_kernel[(R, triton.cdiv(C, BLOCK))](g2, u2, h2, C, g2.stride(0), u2.stride(0), h2.stride(0), ACT=code,
                                                    BLOCK=BLOCK, num_warps=warps)
    return h


def glu_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, act: str = "silu", *, inplace: bool = False,
                 want_h: bool = True, flat: bool | None = None, block: int | None = None, num_warps: int | None = None):
    """(h, dg, du) from the incoming gradient. ``inplace=True`` writes h over dh, dg over g and du over u
    (all three must then be writable, row-contiguous buffers that nothing else needs). flat / block / num_warps:
    `glu_tile`'s overrides."""
    code = _act_code(act)
    dh2, g2, u2 = _rows(dh), _rows(g), _rows(u)
    R, C = g2.shape
    if inplace:
        h2, dg2, du2 = dh2, g2, u2
    else:
        h2 = torch.empty((R, C), dtype=u.dtype, device=u.device) if want_h else dh2
        dg2 = torch.empty((R, C), dtype=g.dtype, device=g.device)
        du2 = torch.empty((R, C), dtype=u.dtype, device=u.device)
    is_flat, BLOCK, warps = glu_tile(C, _flat_ok(dh2, g2, u2, h2, dg2, du2), flat, block, num_warps)
    if is_flat:
        _glu_bwd_flat_kernel[(triton.cdiv(R * C, BLOCK),)](dh2, g2, u2, h2, dg2, du2, R * C, ACT=code, STORE_H=want_h,
                                                           BLOCK=BLOCK, num_warps=warps)
    else:
        _glu_bwd_kernel[(R, triton.cdiv(C, BLOCK))](dh2, g2, u2, h2, dg2, du2, C, dh2.stride(0), g2.stride(0),
                                                    u2.stride(0), h2.stride(0), dg2.stride(0), du2.stride(0), ACT=code,
                                                    STORE_H=want_h, BLOCK=BLOCK, num_warps=warps)
    shape = g.shape
    return (h2.view(shape) if want_h else None), dg2.view(shape), du2.view(shape)


class GLUFunction(torch.autograd.Function):
    "Autograd wrapper: saves g and u only."

    @staticmethod
    def forward(ctx, g, u, act: str = "silu", tile: dict | None = None):
        ctx.act, ctx.tile = act, tile or {}
        ctx.save_for_backward(g, u)
        return glu_forward(g, u, act, **ctx.tile)

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        _, dg, du = glu_backward(dh.contiguous(), g, u, ctx.act, want_h=False, **ctx.tile)
        return dg, du, None, None


def glu(g: torch.Tensor, u: torch.Tensor, act: str = "silu", *, flat: bool | None = None, block: int | None = None,
        num_warps: int | None = None) -> torch.Tensor:
    "act(g) * u with its backward. flat / block / num_warps: `glu_tile`'s overrides (benchmark knobs)."
    tile = {k: v for k, v in (("flat", flat), ("block", block), ("num_warps", num_warps)) if v is not None}
    return GLUFunction.apply(g, u, act, tile or None)


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
