"""RoPE on the CPU (TRITON_INTERPRET=1): the one-launch forward on q/k with different head counts and strides (views
into one fused qkv buffer, a (B, T) that does not flatten), the out-of-place backward on strided / expanded gradients
(never written), partial rotary, head blocks that need a loop, and the tile choice."""
import pytest
import torch

from test_kernels import close, pytestmark  # noqa: F401   the interpreter preamble, its skip mark, the comparison
from ftkit.kernels import rope  # noqa: E402


def tables(B, T, R, restart=5, dtype=torch.float32):
    "Per-token cos/sin of packed rows (positions restart every `restart` tokens, shifted per row)."
    pos = (torch.arange(T)[None] + torch.arange(B)[:, None]) % restart
    inv = 1.0 / (10000 ** (torch.arange(0, R, 2).double() / R))
    emb = torch.cat([pos[..., None] * inv] * 2, -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def ref_grads(q, k, cos, sin, dq, dk):
    "Reference outputs and gradients for incoming gradients dq, dk."
    qr, kr = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    oq, ok = rope.reference(qr, kr, cos, sin)
    return (oq, ok), torch.autograd.grad((oq, ok), (qr, kr), (dq, dk))


def test_tile_choice():
    "Several tokens per program for few, narrow heads; one token and a head loop when one token's heads fill the tile."
    assert rope.rope_tile(14, 2, 32) == (2, 16, 2, 32, 4)       # Qwen2.5-0.5B
    assert rope.rope_tile(32, 8, 32) == (1, 32, 8, 32, 4)       # Llama-3.2-1B
    assert rope.rope_tile(32, 8, 64) == (1, 16, 8, 64, 4)       # Llama-3-8B: two blocks of 16 q heads
    assert rope.rope_tile(4, 2, 8) == (16, 4, 2, 8, 2)
    assert rope.rope_tile(130, 2, 32) == (1, 32, 2, 32, 4)      # 130 query heads: five head blocks
    assert rope.rope_tile(1, 1, 5) == (16, 1, 1, 8, 1)
    assert rope.rope_tile(32, 8, 32, tile_elems=2048) == (2, 32, 8, 32, 8)   # the benchmark knob
    assert rope.rope_tile(1, 1, 4096) == (1, 1, 1, 4096, 8)     # one head wider than the tile: still one head a step


@pytest.mark.parametrize("B,T,Hq,Hk,D,R,batch_cos", [(2, 19, 14, 2, 16, 16, False), (3, 7, 4, 1, 24, 4, True),
                                                     (1, 3, 130, 3, 64, 64, False), (2, 5, 3, 3, 10, 6, True)])
def test_values_and_grads_shapes(B, T, Hq, Hk, D, R, batch_cos):
    "Ragged token tiles, head loops (130 heads), MQA (Hk = 1), partial rotary; fp64 in (fp32 arithmetic)."
    torch.manual_seed(B * 100 + Hq)
    cos, sin = tables(B if batch_cos else 1, T, R, dtype=torch.float64)
    q = torch.randn(B, T, Hq, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, T, Hk, D, dtype=torch.float64, requires_grad=True)
    qo, ko = rope.rope_(q * 1, k * 1, cos, sin)
    dq, dk = torch.randn_like(qo), torch.randn_like(ko)
    (qr, kr), (gqr, gkr) = ref_grads(q, k, cos, sin, dq, dk)
    close(qo, qr, 1e-6); close(ko, kr, 1e-6)
    gq, gk = torch.autograd.grad((qo, ko), (q, k), (dq, dk))
    close(gq, gqr, 1e-6); close(gk, gkr, 1e-6)
    if R < D:           # dims R..D untouched forward, passed through backward, bit for bit
        assert torch.equal(qo[..., R:], q[..., R:]) and torch.equal(ko[..., R:], k[..., R:])
        assert torch.equal(gq[..., R:], dq[..., R:]) and torch.equal(gk[..., R:], dk[..., R:])


@pytest.mark.parametrize("R", [16, 6])
def test_backward_strided_gradients_not_modified(R):
    """The attention's gradients come back heads-first, transposed to (B, T, H, D) (no (B, T) flattening); an expanded
    gradient (batch stride 0) and one with a strided head dim (copied) work too. The incoming gradients stay as they
    were."""
    torch.manual_seed(R)
    B, T, Hq, Hk, D = 2, 11, 5, 2, 16
    cos, sin = tables(1, T, R)
    q = torch.randn(B, T, Hq, D, requires_grad=True)
    k = torch.randn(B, T, Hk, D, requires_grad=True)
    cases = [
        (torch.randn(B, Hq, T, D).transpose(1, 2), torch.randn(B, Hk, T, D).transpose(1, 2)),
        (torch.randn(1, T, Hq, D).expand(B, T, Hq, D), torch.randn(T, 1, Hk, D).transpose(0, 1).expand(B, T, Hk, D)),
        (torch.randn(B, T, Hq, 2 * D)[..., ::2], torch.randn(B, T, Hk, D)),
    ]
    for dq, dk in cases:
        dq0, dk0 = dq.clone(), dk.clone()
        qo, ko = rope.rope_(q * 1, k * 1, cos, sin)
        gq, gk = torch.autograd.grad((qo, ko), (q, k), (dq, dk))
        _, (gqr, gkr) = ref_grads(q, k, cos, sin, dq, dk)
        close(gq, gqr, 1e-6); close(gk, gkr, 1e-6)
        assert torch.equal(dq, dq0) and torch.equal(dk, dk0), "the backward wrote into its incoming gradient"
        assert gq.data_ptr() != dq.data_ptr() and gk.data_ptr() != dk.data_ptr()


def test_backward_contiguous_gradients_not_modified():
    "Contiguous incoming gradients (the shape of the outputs): fresh gradient tensors, the incoming ones untouched."
    torch.manual_seed(3)
    B, T, Hq, Hk, D, R = 1, 6, 3, 1, 8, 8
    cos, sin = tables(1, T, R)
    dq, dk = torch.randn(B, T, Hq, D), torch.randn(B, T, Hk, D)
    dq0, dk0 = dq.clone(), dk.clone()
    q, k = torch.randn(B, T, Hq, D, requires_grad=True), torch.randn(B, T, Hk, D, requires_grad=True)
    qo, ko = rope.rope_(q * 1, k * 1, cos, sin)
    gq, gk = torch.autograd.grad((qo, ko), (q, k), (dq, dk))
    assert torch.equal(dq, dq0) and torch.equal(dk, dk0)
    _, (gqr, gkr) = ref_grads(q, k, cos, sin, dq, dk)
    close(gq, gqr, 1e-6); close(gk, gkr, 1e-6)


@pytest.mark.parametrize("R", [16, 10])
def test_fused_qkv_views_forward(R):
    """q and k as views into one fused qkv projection output (token stride (Hq + 2·Hk)·D, different head counts),
    rotated in place in the buffer, v untouched. Without autograd: autograd refuses a Function that writes into a view
    and returns two tensors, so under grad kernels/patch.py's `_rotate` copies such views first."""
    torch.manual_seed(R)
    B, T, Hq, Hk, D = 2, 13, 6, 2, 16
    cos, sin = tables(B, T, R)
    buf = torch.randn(B, T, (Hq + 2 * Hk) * D)
    w = buf.clone()
    q = buf[..., : Hq * D].view(B, T, Hq, D)
    k = buf[..., Hq * D: (Hq + Hk) * D].view(B, T, Hk, D)
    assert not q.is_contiguous() and q.stride(1) == k.stride(1) == (Hq + 2 * Hk) * D
    qo, ko = rope.rope_(q, k, cos, sin)
    assert qo is q and ko is k
    qr, kr = rope.reference(w[..., : Hq * D].view(B, T, Hq, D), w[..., Hq * D: (Hq + Hk) * D].view(B, T, Hk, D),
                            cos, sin)
    close(buf[..., : Hq * D].view(B, T, Hq, D), qr, 1e-6)                      # the buffer itself is rotated
    close(buf[..., Hq * D: (Hq + Hk) * D].view(B, T, Hk, D), kr, 1e-6)
    assert torch.equal(buf[..., (Hq + Hk) * D:], w[..., (Hq + Hk) * D:])      # v
    with torch.no_grad():       # the same under no_grad with tensors that would want grad
        wg = w.clone().requires_grad_()
        bg = wg * 1
        rope.rope_(bg[..., : Hq * D].view(B, T, Hq, D), bg[..., Hq * D: (Hq + Hk) * D].view(B, T, Hk, D), cos, sin)
    assert torch.equal(bg, buf)


@pytest.mark.parametrize("R", [16, 10])
def test_fused_layouts_backward(R):
    """Under autograd: q stored time-major ((B, T) does not flatten) and k head-first, different head counts; the
    incoming gradients are views into one fused dqkv buffer (token stride (Hq + 2·Hk)·D). Values and gradients."""
    torch.manual_seed(R + 1)
    B, T, Hq, Hk, D = 2, 13, 6, 2, 16
    cos, sin = tables(1, T, R)
    q = torch.randn(T, B, Hq, D).transpose(0, 1).requires_grad_()
    k = torch.randn(B, Hk, T, D).transpose(1, 2).requires_grad_()
    qa, ka = q * 1, k * 1                                # keep the layouts, not views: rotated in place
    assert qa._base is None and qa.stride(0) == Hq * D and ka.stride(2) == T * D
    qo, ko = rope.rope_(qa, ka, cos, sin)
    dqkv = torch.randn(B, T, (Hq + 2 * Hk) * D)
    d0 = dqkv.clone()
    dq, dk = dqkv[..., : Hq * D].view(B, T, Hq, D), dqkv[..., Hq * D: (Hq + Hk) * D].view(B, T, Hk, D)
    (qr, kr), (gqr, gkr) = ref_grads(q, k, cos, sin, dq, dk)
    close(qo, qr, 1e-6); close(ko, kr, 1e-6)
    gq, gk = torch.autograd.grad((qo, ko), (q, k), (dq, dk))
    close(gq, gqr, 1e-6); close(gk, gkr, 1e-6)
    assert torch.equal(dqkv, d0)


def test_forward_any_strides():
    "q whose (B, T) does not flatten (time-major storage) and k with padded heads (head stride D + 3), in place."
    torch.manual_seed(7)
    B, T, Hq, Hk, D, R = 3, 9, 4, 2, 12, 8
    cos, sin = tables(B, T, R)
    q = torch.randn(T, B, Hq, D).transpose(0, 1)
    k = torch.randn(B, T, Hk, D + 3)[..., :D]
    q0, k0, pad = q.clone(), k.clone(), k._base[..., D:].clone()
    qr, kr = rope.reference(q0, k0, cos, sin)
    qo, ko = rope.rope_(q, k, cos, sin)
    assert qo is q and ko is k
    close(q, qr, 1e-6); close(k, kr, 1e-6)
    assert torch.equal(k._base[..., D:], pad)                           # the padding between heads: not written
    assert torch.equal(q[..., R:], q0[..., R:]) and torch.equal(k[..., R:], k0[..., R:])


def test_bf16_one_rounding_step():
    """bf16 in and out, fp32 arithmetic: every element within one bf16 step of the fp32 reference, forward and backward
    (the interpreter truncates fp32 → bf16 where a GPU rounds to nearest, so not bit-equal here)."""
    torch.manual_seed(11)
    B, T, Hq, Hk, D, R = 2, 10, 3, 1, 32, 24
    cos, sin = tables(B, T, R, dtype=torch.bfloat16)
    q = torch.randn(B, T, Hq, D, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, T, Hk, D, dtype=torch.bfloat16, requires_grad=True)
    qo, ko = rope.rope_(q * 1, k * 1, cos, sin)
    dq, dk = torch.randn_like(qo), torch.randn_like(ko)
    gq, gk = torch.autograd.grad((qo, ko), (q, k), (dq, dk))
    c, s_ = cos.float(), sin.float()
    (qr, kr), (gqr, gkr) = ref_grads(q.float(), k.float(), c, s_, dq.float(), dk.float())
    for a, b in [(qo, qr), (ko, kr), (gq, gqr), (gk, gkr)]:
        assert a.dtype == torch.bfloat16
        assert ((a.float() - b).abs() <= 2 ** -7 * b.abs() + 1e-6).all()


def test_one_launch_each_way(monkeypatch):
    "q and k together: one kernel launch in the forward, one in the backward."
    launches = []

    class Counted:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launches.append(grid)
            return self.kernel[grid]
    monkeypatch.setattr(rope, "_rope_kernel", Counted(rope._rope_kernel))
    q = torch.randn(2, 5, 3, 8, requires_grad=True)
    k = torch.randn(2, 5, 1, 8, requires_grad=True)
    qo, ko = rope.rope_(q * 1, k * 1, *tables(2, 5, 8))
    assert len(launches) == 1
    (qo.sum() + 2 * ko.sum()).backward()
    assert len(launches) == 2


def test_rejects_bad_inputs():
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 1, 8)
    cos, sin = tables(1, 4, 8)
    with pytest.raises(AssertionError, match="expanded"):
        rope.rope_(torch.randn(1, 4, 2, 8).expand(3, 4, 2, 8), torch.randn(3, 4, 1, 8), cos, sin)
    with pytest.raises(AssertionError, match="contiguous"):
        rope.rope_(torch.randn(1, 4, 2, 16)[..., ::2], k, cos, sin)
    with pytest.raises(AssertionError, match="rotary dim"):
        rope.rope_(q, k, *tables(1, 4, 10))
    with pytest.raises(AssertionError, match="cos/sin"):
        rope.rope_(q, k, *tables(2, 4, 8))
    with pytest.raises(AssertionError, match="same B, T, D"):
        rope.rope_(q, torch.randn(1, 5, 1, 8), cos, sin)
