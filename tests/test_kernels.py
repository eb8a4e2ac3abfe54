"""ftkit.kernels on the CPU: every Triton kernel under TRITON_INTERPRET=1 (small, odd shapes), values and every
gradient against the plain-PyTorch reference in the same file (fp32 / fp64 inputs; bf16 precision is a GPU test)."""
import os

import torch  # noqa: E402

if not torch.cuda.is_available():                  # CPU machines (CI): Triton's interpreter, before the kernels exist
    os.environ.setdefault("TRITON_INTERPRET", "1")     # before the kernels are defined (triton.jit reads it)

import pytest
import torch

triton = pytest.importorskip("triton")

from ftkit.kernels import flce, glu, lora_mlp, lora_proj, nf4, rmsnorm, rope  # noqa: E402
from ftkit.kernels.lora_common import LoRAProj  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU-interpreter tests; on a GPU machine tests/test_gpu_kernels.py covers the kernels")


def close(a, b, tol=1e-5):
    a, b = a.double(), b.double()
    err = (a - b).abs().max().item()
    scale = b.abs().max().item() + 1e-12
    assert err <= tol * max(scale, 1.0), f"max abs err {err:.3e} (scale {scale:.3e})"


def grads(out, inputs, seed=0):
    outs = out if isinstance(out, (tuple, list)) else (out,)
    g = torch.Generator().manual_seed(seed)
    dys = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    return torch.autograd.grad(outs, inputs, dys, allow_unused=True)


# ------------------------------------------------------------------------------------------------------------- GLU
@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_pytorch_tanh"])
def test_glu_values_and_grads(act):
    torch.manual_seed(0)
    g = (3 * torch.randn(19, 77, dtype=torch.float64)).requires_grad_()
    u = torch.randn(19, 77, dtype=torch.float64, requires_grad=True)
    y, yr = glu.glu(g, u, act), glu.reference(g, u, act)
    close(y, yr, 1e-6)
    for a, b in zip(grads(y, (g, u)), grads(yr, (g, u))):
        close(a, b, 1e-6)


def test_glu_strided_halves_and_inplace_backward():
    "Phi-3 splits gate_up in halves (strided rows); the in-place backward writes h over dh, dg over g, du over u."
    torch.manual_seed(1)
    gu = torch.randn(11, 2 * 45)
    g, u = gu[:, :45], gu[:, 45:]
    close(glu.glu_forward(g, u, "silu"), glu.reference(g, u, "silu"), 1e-6)
    dh = torch.randn(11, 45)
    gr, ur = g.clone().requires_grad_(), u.clone().requires_grad_()
    dg_ref, du_ref = torch.autograd.grad(glu.reference(gr, ur, "silu"), (gr, ur), dh)
    h_ref = glu.reference(g, u, "silu")
    buf = gu.clone()
    dhb = dh.clone()
    h, dg, du = glu.glu_backward(dhb, buf[:, :45], buf[:, 45:], "silu", inplace=True)
    assert h.data_ptr() == dhb.data_ptr() and dg.data_ptr() == buf.data_ptr()
    close(h, h_ref, 1e-6); close(buf[:, :45], dg_ref, 1e-6); close(buf[:, 45:], du_ref, 1e-6)


def test_glu_rejects_inexact_activation():
    with pytest.raises(ValueError, match="gelu_new"):
        glu.glu_forward(torch.randn(2, 4), torch.randn(2, 4), "gelu_new")


# --------------------------------------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("offset", [False, True])
def test_rmsnorm_values_and_grads(offset):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 72, dtype=torch.float64, requires_grad=True)
    w = torch.randn(72, dtype=torch.float64, requires_grad=True)
    y, yr = rmsnorm.rms_norm(x, w, 1e-6, offset), rmsnorm.reference(x, w, 1e-6, offset)
    close(y, yr, 1e-6)
    for a, b in zip(grads(y, (x, w)), grads(yr, (x, w))):
        close(a, b, 1e-5)


def test_rmsnorm_frozen_weight_gets_no_grad():
    x = torch.randn(5, 40, requires_grad=True)
    w = torch.randn(40)
    y = rmsnorm.rms_norm(x, w, 1e-5)
    (dx,) = torch.autograd.grad(y.sum(), (x,))
    xr = x.detach().clone().requires_grad_()
    (dxr,) = torch.autograd.grad(rmsnorm.reference(xr, w, 1e-5).sum(), (xr,))
    close(dx, dxr, 1e-5)


@pytest.mark.parametrize("offset", [False, True])
def test_add_rmsnorm_values_and_grads(offset):
    torch.manual_seed(2)
    x = torch.randn(13, 48, dtype=torch.float64, requires_grad=True)
    r = torch.randn(13, 48, dtype=torch.float64, requires_grad=True)
    w = torch.randn(48, dtype=torch.float64, requires_grad=True)
    y, s = rmsnorm.add_rms_norm(x, r, w, 1e-6, offset)
    yr, sr = rmsnorm.reference(x, w, 1e-6, offset, residual=r)
    close(y, yr, 1e-6); close(s, sr, 1e-6)
    for a, b in zip(grads((y, s), (x, r, w)), grads((yr, sr), (x, r, w))):
        close(a, b, 1e-5)


# ------------------------------------------------------------------------------------------------------------ RoPE
@pytest.mark.parametrize("rot,batch_cos", [(16, False), (10, True)])
def test_rope_in_place_values_and_grads(rot, batch_cos):
    "Packed rows: cos/sin per token (positions restart inside the row); partial rotary dims stay untouched."
    torch.manual_seed(0)
    B, T, H, Hk, D = 2, 9, 4, 2, 16
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    f = pos[..., None].float() * inv
    emb = torch.cat([f, f], -1)
    cos, sin = emb.cos(), emb.sin()
    if not batch_cos:
        cos, sin = cos[:1], sin[:1]
    q = torch.randn(B, T, H, D, requires_grad=True)
    k = torch.randn(B, T, Hk, D, requires_grad=True)
    qo, ko = rope.rope_(q.clone(), k.clone(), cos, sin)
    qr, kr = rope.reference(q, k, cos, sin)
    close(qo, qr, 1e-6); close(ko, kr, 1e-6)
    if rot < D:
        assert torch.equal(qo[..., rot:], q[..., rot:])
    for a, b in zip(grads((qo, ko), (q, k)), grads((qr, kr), (q, k))):
        close(a, b, 1e-6)


def test_rope_is_in_place():
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 1, 8)
    cos, sin = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    p = q.data_ptr()
    qo, _ = rope.rope_(q, k, cos, sin)
    assert qo.data_ptr() == p


# ------------------------------------------------------------------------------------------------------------- NF4
@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nf4_dequant_bit_exact(double, dtype):
    torch.manual_seed(0)
    w = torch.randn(96, 80)
    packed, qs = nf4.quantize_reference(w, blocksize=64, double=double, blocksize2=32)
    a, b = nf4.dequantize(packed, qs, dtype), nf4.reference(packed, qs, dtype)
    assert a.dtype == dtype and a.shape == w.shape
    assert torch.equal(a, b)
    assert (a.float() - w).abs().max() < 0.25 * w.abs().max()      # a real dequantization, not zeros


def test_nf4_random_codes_bit_exact():
    "Every nibble value and every absmax code, bf16 out (the interpreter truncates; the kernel rounds itself)."
    g = torch.Generator().manual_seed(3)
    n = 64 * 40
    packed = torch.randint(0, 256, (n // 2, 1), dtype=torch.uint8, generator=g)
    from types import SimpleNamespace
    st2 = SimpleNamespace(absmax=torch.rand(3, generator=g) * 0.1, code=torch.sort(torch.randn(256, generator=g))[0],
                          blocksize=16)
    qs = SimpleNamespace(absmax=torch.randint(0, 256, (40,), dtype=torch.uint8, generator=g), shape=(40, 64),
                         dtype=torch.bfloat16, blocksize=64, code=torch.tensor(nf4.NF4_CODE),
                         offset=torch.tensor(0.0371), state2=st2)
    assert torch.equal(nf4.dequantize(packed, qs), nf4.reference(packed, qs))


# ------------------------------------------------------------------------------------------------------------ LoRA
def _proj(i, o, r=4, p=0.0, bias=False, s=0.5, nf4_base=False, g=None):
    A = (0.3 * torch.randn(r, i, generator=g)).requires_grad_()
    B = (0.3 * torch.randn(o, r, generator=g)).requires_grad_()
    W = torch.randn(o, i, generator=g) / i ** 0.5
    qs = None
    if nf4_base:
        W, qs = nf4.quantize_reference(W, double=True, blocksize2=16)
    return LoRAProj(weight=W, quant_state=qs, bias=torch.randn(o, generator=g) if bias else None, A=A, B=B, s=s, p=p,
                    dropout=torch.nn.Dropout(p) if p else None)


def _mask(shape, p, g):
    return (torch.rand(shape, generator=g) > p).float() / (1 - p)


@pytest.mark.parametrize("p,nf4_base", [(0.0, False), (0.25, False), (0.0, True)])
def test_lora_qkv_values_and_grads(p, nf4_base):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2, 7, 40, generator=g).requires_grad_()
    ps = [_proj(40, 32, bias=True, nf4_base=nf4_base, g=g), _proj(40, 16, nf4_base=nf4_base, g=g),
          _proj(40, 16, r=8, nf4_base=nf4_base, g=g)]
    masks = [_mask((14, 40), p, g) for _ in ps] if p else None
    outs = lora_proj.lora_qkv(X, *ps, masks=masks)
    refs = lora_proj.reference(X, ps, [m.view(2, 7, 40) for m in masks] if masks else None)
    for o, r in zip(outs, refs):
        close(o, r, 1e-5)
    params = [X] + [t for P in ps for t in (P.A, P.B)]
    for a, b in zip(grads(outs, params), grads(refs, params)):
        close(a, b, 1e-5)


def test_lora_o_saves_no_grad_for_frozen_input_and_base():
    g = torch.Generator().manual_seed(1)
    P = _proj(24, 24, g=g)
    P.weight.requires_grad_(False)
    X = torch.randn(9, 24, generator=g)                    # no grad wanted for X (first layer's input)
    y = lora_proj.lora_o(X, P)
    dA, dB = torch.autograd.grad(y.sum(), (P.A, P.B))
    yr = lora_proj.reference(X, [P])[0]
    dAr, dBr = torch.autograd.grad(yr.sum(), (P.A, P.B))
    close(y, yr); close(dA, dAr); close(dB, dBr)
    assert P.weight.grad is None


@pytest.mark.parametrize("fused,act,p,nf4_base", [(False, "silu", 0.0, False), (False, "gelu", 0.3, False),
                                                   (True, "silu", 0.0, False), (True, "gelu_pytorch_tanh", 0.2, False),
                                                   (False, "silu", 0.0, True)])
def test_lora_mlp_values_and_grads(fused, act, p, nf4_base):
    g = torch.Generator().manual_seed(0)
    d, F, N = 40, 56, 11
    X = torch.randn(N, d, generator=g).requires_grad_()
    ins = [_proj(d, 2 * F, p=p, nf4_base=nf4_base, g=g)] if fused else \
        [_proj(d, F, p=p, nf4_base=nf4_base, g=g), _proj(d, F, r=8, p=p, nf4_base=nf4_base, g=g)]
    down = _proj(F, d, p=p, nf4_base=nf4_base, g=g)
    masks = [_mask((N, d), p, g) for _ in ins] + [_mask((N, F), p, g)] if p else None
    y = lora_mlp.lora_mlp(X, ins, down, act, masks)
    yr = lora_mlp.reference(X, ins, down, act, masks)
    close(y, yr, 1e-5)
    params = [X] + [t for P in (*ins, down) for t in (P.A, P.B)]
    for a, b in zip(grads(y, params), grads(yr, params)):
        close(a, b, 1e-5)


def test_lora_mlp_saves_only_x_gate_up_and_small_products():
    "Saved activations: X, G, U (tokens × intermediate) and tokens × r products; never H or an fp32 copy."
    g = torch.Generator().manual_seed(0)
    d, F, N, r = 32, 48, 10, 4
    X = torch.randn(N, d, generator=g).requires_grad_()
    ins, down = [_proj(d, F, g=g), _proj(d, F, g=g)], _proj(F, d, g=g)
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lora_mlp.lora_mlp(X, ins, down, "silu")
    big = sorted(t.numel() for t in saved if t.numel() >= N * d)
    adapters = {P.A.numel() for P in (*ins, down)} | {P.B.numel() for P in (*ins, down)}
    small = [t for t in saved if t.numel() < N * d and t.numel() not in adapters]
    assert big == [N * d, N * F, N * F]                   # X, G, U
    assert all(t.numel() == N * r for t in small)         # X·Aᵀ (gate, up), H·A_downᵀ
    assert all(t.dtype == torch.float32 for t in saved)   # compute dtype (fp32 here): no extra copies


# ------------------------------------------------------------------------------------------------- linear + CE
@pytest.mark.parametrize("smoothing,softcap,bias,head_trains", [(0.0, None, False, False), (0.1, None, False, True),
                                                                 (0.0, 4.0, False, False), (0.2, 6.0, True, True)])
def test_flce_values_and_grads(smoothing, softcap, bias, head_trains):
    torch.manual_seed(0)
    N, d, V = 53, 24, 301
    h = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
    W = (torch.randn(V, d, dtype=torch.float64) / 3).requires_grad_(head_trains)
    b = torch.randn(V, dtype=torch.float64, requires_grad=True) if bias else None
    y = torch.randint(0, V, (N,))
    y[::4] = -100
    kw = dict(label_smoothing=smoothing, softcap=softcap, reduction="mean")
    loss = flce.linear_cross_entropy(h, W, y, b, chunk_bytes=16 * V * 8, **kw)     # several chunks
    ref = flce.reference(h, W, y, b, **kw)
    close(loss, ref, 1e-6)
    ins = [h] + ([W] if head_trains else []) + ([b] if bias else [])
    for a, c in zip(torch.autograd.grad(3 * loss, ins), torch.autograd.grad(3 * ref, ins)):
        close(a, c, 1e-6)


def test_flce_never_materialises_tokens_by_vocab():
    from torch.utils._python_dispatch import TorchDispatchMode
    N, d, V = 64, 16, 512
    h = torch.randn(N, d, requires_grad=True)
    W = torch.randn(V, d)
    y = torch.randint(0, V, (N,))
    biggest = []

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.dtype != torch.uint8:   # the interpreter's byte copies
                    biggest.append(t.numel())
            return out
    with Track():
        loss = flce.linear_cross_entropy(h, W, y, chunk_bytes=16 * V * 4)
        loss.backward()
    assert max(biggest) <= 16 * V < N * V
    close(loss, flce.reference(h, W, y))


def test_flce_all_ignored_rows_give_zero_sum_and_grad():
    h = torch.randn(8, 12, requires_grad=True)
    W = torch.randn(50, 12)
    y = torch.full((8,), -100)
    loss = flce.linear_cross_entropy(h, W, y)
    loss.backward()
    assert loss.item() == 0.0 and h.grad.abs().max().item() == 0.0
