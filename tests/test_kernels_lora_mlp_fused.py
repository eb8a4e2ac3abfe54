"""The LoRA MLP with the rank-r LoRA terms fused into the GLU kernels (``lora_mlp(..., fuse_lora_b=True)``, the
default) on the CPU under TRITON_INTERPRET=1: fused against unfused against the plain-PyTorch reference, every
gradient, for SwiGLU and both GeGLUs, r 8 / 16 / 64, dropout, bias, Phi-3's gate_up_proj, an NF4 base, and shapes that
are no multiple of the blocks (small blocks force several row blocks, column groups and a ragged last tile).

Tolerances: in fp32 the fused sums differ from addmm_ only in the order of the r products and of the column-group
partial sums of H·A_downᵀ, dG·B_gate and dU·B_up (fp32 rounding, ~1e-7 relative), so the reference bound of
test_kernels.py (1e-5) holds. In bf16 each path rounds G, U, H, dH, dG, dU once to bf16 (2^-8 relative), but at
possibly different points of a value's last bit, so fused and unfused agree to a few bf16 ulps of each tensor's
scale: bound 3e-2 relative to the max, the GPU tests' bf16 tolerance."""
import os

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

triton = pytest.importorskip("triton")

from ftkit.kernels import glu, lora_mlp, nf4  # noqa: E402
from ftkit.kernels.lora_common import LoRAProj  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU-interpreter tests; on a GPU machine tests/test_gpu_kernels.py covers "
                                       "the kernels")


def close(a, b, tol=1e-5):
    a, b = a.double(), b.double()
    err = (a - b).abs().max().item()
    scale = b.abs().max().item() + 1e-12
    assert err <= tol * max(scale, 1.0), f"max abs err {err:.3e} (scale {scale:.3e})"


def _proj(i, o, r=4, p=0.0, bias=False, s=0.5, nf4_base=False, g=None, dtype=torch.float32):
    A = (0.3 * torch.randn(r, i, generator=g)).to(dtype).requires_grad_()
    B = (0.3 * torch.randn(o, r, generator=g)).to(dtype).requires_grad_()
    W = torch.randn(o, i, generator=g) / i ** 0.5
    qs = None
    if nf4_base:
        W, qs = nf4.quantize_reference(W, double=True, blocksize2=16)
    else:
        W = W.to(dtype)
    return LoRAProj(weight=W, quant_state=qs, bias=torch.randn(o, generator=g).to(dtype) if bias else None, A=A, B=B,
                    s=s, p=p, dropout=torch.nn.Dropout(p) if p else None)


def _mask(shape, p, g, dtype=torch.float32):
    return ((torch.rand(shape, generator=g) > p).float() / (1 - p)).to(dtype)


@pytest.fixture
def small_blocks(monkeypatch):
    "Blocks of 16 rows × 16 columns, 2 tiles per program: several row blocks, column groups and ragged edges."
    monkeypatch.setitem(glu.LORA_GLU_BLOCKS, "fwd", (16, 16, 2, 4))
    monkeypatch.setitem(glu.LORA_GLU_BLOCKS, "bwd", (16, 16, 2, 4))


def _run(X, ins, down, act, masks, fuse, dy):
    Xl = X.detach().clone().requires_grad_()
    y = lora_mlp.lora_mlp(Xl, ins, down, act, masks, fuse_lora_b=fuse) if fuse is not None else \
        lora_mlp.reference(Xl, ins, down, act, [m.view(*X.shape[:-1], -1) for m in masks] if masks else None)
    params = [Xl] + [t for P in (*ins, down) for t in (P.A, P.B)]
    return y.detach(), torch.autograd.grad(y, params, dy)


CASES = [  # gate_up fused (Phi-3), act, p, nf4 base, bias, ranks (gate, up, down)
    (False, "silu", 0.0, False, False, (8, 8, 8)),
    (False, "gelu", 0.3, False, True, (16, 8, 16)),
    (False, "gelu_pytorch_tanh", 0.0, False, False, (64, 64, 64)),
    (True, "silu", 0.2, False, True, (16, 16, 16)),
    (True, "gelu", 0.0, False, False, (64, 64, 8)),
    (False, "silu", 0.1, True, False, (16, 16, 16)),
    (True, "gelu_pytorch_tanh", 0.0, True, False, (8, 8, 8)),
]


@pytest.mark.parametrize("fused_gu,act,p,nf4_base,bias,rs", CASES)
def test_fused_matches_unfused_and_reference(small_blocks, fused_gu, act, p, nf4_base, bias, rs):
    g = torch.Generator().manual_seed(7)
    d, F, N = 64, 83, 37                 # F, N: no multiple of 16 (d = 64: the NF4 quantizer wants 64-blocks)
    X = torch.randn(N, d, generator=g)
    if fused_gu:
        ins = [_proj(d, 2 * F, rs[0], p, bias, nf4_base=nf4_base, g=g)]
    else:
        ins = [_proj(d, F, rs[0], p, bias, nf4_base=nf4_base, g=g), _proj(d, F, rs[1], p, bias, s=2.0,
                                                                            nf4_base=nf4_base, g=g)]
    down = _proj(F, d, rs[2], p, bias, s=1.5, nf4_base=nf4_base, g=g)
    masks = [_mask((N, d), p, g) for _ in ins] + [_mask((N, F), p, g)] if p else None
    dy = torch.randn(N, d, generator=g)
    yf, gf = _run(X, ins, down, act, masks, True, dy)
    yu, gu = _run(X, ins, down, act, masks, False, dy)
    yr, gr = _run(X, ins, down, act, masks, None, dy)
    close(yf, yr); close(yf, yu)
    for a, b, c in zip(gf, gu, gr):
        close(a, c); close(a, b)


def test_module_default_switch(small_blocks, monkeypatch):
    "lora_mlp without the keyword follows lora_mlp.FUSE_LORA_B (what a benchmark flips for the unfused row)."
    g = torch.Generator().manual_seed(3)
    d, F, N = 24, 40, 19
    X = torch.randn(N, d, generator=g)
    ins, down = [_proj(d, F, 16, g=g), _proj(d, F, 16, g=g)], _proj(F, d, 16, g=g)
    calls = []
    real = glu.glu_lora_forward
    monkeypatch.setattr(glu, "glu_lora_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    y1 = lora_mlp.lora_mlp(X, ins, down)
    monkeypatch.setattr(lora_mlp, "FUSE_LORA_B", False)
    y0 = lora_mlp.lora_mlp(X, ins, down)
    assert len(calls) == 1
    close(y1, y0)
    monkeypatch.setattr(lora_mlp, "FUSE_LORA_B", True)

    class MLP(torch.nn.Module):                         # stands for a patched MLP: calls lora_mlp without the keyword
        def __init__(self):
            super().__init__()
            self.p = torch.nn.ParameterList([ins[0].A, ins[0].B])

        def forward(self, x):
            return lora_mlp.lora_mlp(x, ins, down)
    m = MLP()
    wrapped = lora_mlp.Unfused(m)
    assert [id(p) for p in wrapped.parameters()] == [id(p) for p in m.parameters()]
    y2 = wrapped(X)
    assert len(calls) == 1 and lora_mlp.FUSE_LORA_B is True    # unfused inside, the default restored after
    m(X)
    assert len(calls) == 2
    close(y2, y0)


def test_saved_tensors_are_base_products(small_blocks):
    "Fused: saved X, G0, U0 (no LoRA term, no H) and tokens × r products, in the compute dtype."
    g = torch.Generator().manual_seed(0)
    d, F, N, r = 32, 48, 10, 16
    X = torch.randn(N, d, generator=g).requires_grad_()
    ins, down = [_proj(d, F, r, g=g), _proj(d, F, r, g=g)], _proj(F, d, r, g=g)
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lora_mlp.lora_mlp(X, ins, down, "silu")
    big = [t for t in saved if t.dim() == 2 and t.shape[0] == N and t.numel() >= N * d]     # not A, B
    assert sorted(t.numel() for t in big) == [N * d, N * F, N * F]
    G0 = X.detach() @ ins[0].weight.t()
    assert any(t.shape == G0.shape and torch.allclose(t, G0) for t in big)    # the base product, without s·XA·Bᵀ


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_pytorch_tanh"])
def test_glu_lora_kernels_strided_halves(small_blocks, act):
    "The kernels alone on Phi-3's layout (G0, U0: halves of one buffer), against plain PyTorch, in place."
    g = torch.Generator().manual_seed(5)
    T, F, r, rd = 21, 45, 16, 8
    gu0 = torch.randn(T, 2 * F, generator=g)
    xa = torch.randn(T, r, generator=g)
    B = 0.3 * torch.randn(2 * F, r, generator=g)
    Ad = 0.3 * torch.randn(rd, F, generator=g)
    md = _mask((T, F), 0.25, g)
    G = gu0[:, :F] + 0.5 * xa @ B[:F].t()
    U = gu0[:, F:] + 0.5 * xa @ B[F:].t()
    H_ref = glu.reference(G, U, act)
    h, ha = glu.glu_lora_forward(gu0[:, :F], gu0[:, F:], xa, xa, B[:F], B[F:], 0.5, 0.5, act, a_down=Ad, mask_down=md)
    close(h, H_ref); close(ha, (H_ref * md) @ Ad.t())
    dh0 = torch.randn(T, F, generator=g)
    dyb = torch.randn(T, rd, generator=g)
    dH = dh0 + 1.5 * (dyb @ Ad) * md
    Gr, Ur = G.clone().requires_grad_(), U.clone().requires_grad_()
    dG, dU = torch.autograd.grad(glu.reference(Gr, Ur, act), (Gr, Ur), dH)
    buf, dhb = gu0.clone(), dh0.clone()
    H, dg, du, dyb_gu, none = glu.glu_lora_backward(dhb, buf[:, :F], buf[:, F:], xa, xa, B[:F], B[F:], 0.5, 0.5, dyb,
                                                    Ad, 1.5, act, mask_down=md, sum_gu=True)
    assert none is None and H.data_ptr() == dhb.data_ptr() and dg.data_ptr() == buf.data_ptr()
    close(dhb, H_ref); close(buf[:, :F], dG); close(buf[:, F:], dU)
    close(dyb_gu, torch.cat([dG, dU], 1) @ B)


def test_bf16_fused_within_rounding_of_unfused(small_blocks):
    "bf16 compute: fused and unfused round at the same points; they agree to a few bf16 ulps (see the module doc)."
    g = torch.Generator().manual_seed(11)
    d, F, N, dt = 32, 72, 29, torch.bfloat16
    X = torch.randn(N, d, generator=g).to(dt)
    ins = [_proj(d, F, 16, g=g, dtype=dt), _proj(d, F, 16, g=g, dtype=dt)]
    down = _proj(F, d, 16, g=g, dtype=dt)
    dy = torch.randn(N, d, generator=g).to(dt)
    yf, gf = _run(X, ins, down, "silu", None, True, dy)
    yu, gu = _run(X, ins, down, "silu", None, False, dy)
    assert yf.dtype == dt and all(t.dtype == dt for t in gf)
    close(yf.float(), yu.float(), 3e-2)
    for a, b in zip(gf, gu):
        close(a.float(), b.float(), 3e-2)
