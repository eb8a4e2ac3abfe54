"""Grid knobs of the bandwidth-bound kernels on the CPU (TRITON_INTERPRET=1): the GLU's flat 1-D grid and the fused
CE's persistent grid compute bit for bit what the default grids compute, forward and backward."""
import pytest
import torch

from test_kernels import close, pytestmark  # noqa: F401   Triton's interpreter on a CPU machine, its skip mark, the comparison
from ftkit.kernels import flce, glu  # noqa: E402


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("tile", [dict(flat=True, block=64, num_warps=2), dict(flat=True, block=256),
                                  dict(flat=False, block=32, num_warps=8)])
def test_glu_grids_match_the_default_bit_for_bit(act, tile):
    torch.manual_seed(0)
    R, F = 7, 45                       # F not a multiple of any block: the flat grid crosses row ends
    g = torch.randn(R, F, dtype=torch.bfloat16, requires_grad=True)
    u = torch.randn(R, F, dtype=torch.bfloat16, requires_grad=True)
    dh = torch.randn(R, F, dtype=torch.bfloat16)
    h0 = glu.glu(g, u, act)
    dg0, du0 = torch.autograd.grad(h0, (g, u), dh)
    h1 = glu.glu(g, u, act, **tile)
    dg1, du1 = torch.autograd.grad(h1, (g, u), dh)
    assert torch.equal(h0, h1) and torch.equal(dg0, dg1) and torch.equal(du0, du1)
    close(h0.float(), glu.reference(g.float(), u.float(), act), 2e-2)     # and the default is right


def test_glu_flat_in_place_backward_and_strided_fallback():
    "The LoRA MLP's in-place backward on the flat grid; strided halves of one buffer (Phi-3) keep the row grid."
    torch.manual_seed(1)
    R, F = 5, 37
    g, u, dh = (torch.randn(R, F) for _ in range(3))
    h_ref, dg_ref, du_ref = glu.glu_backward(dh, g, u, "silu")
    G, U, dH = g.clone(), u.clone(), dh.clone()
    h, dg, du = glu.glu_backward(dH, G, U, "silu", inplace=True, flat=True, block=64)
    assert h.data_ptr() == dH.data_ptr() and dg.data_ptr() == G.data_ptr()
    assert torch.equal(h, h_ref) and torch.equal(dg, dg_ref) and torch.equal(du, du_ref)
    buf = torch.cat([g, u], 1)                                  # (R, 2F): rows of g and u are not back to back
    assert not glu._flat_ok(buf[:, :F])
    assert torch.equal(glu.glu_forward(buf[:, :F], buf[:, F:], "silu", flat=True, block=64),
                       glu.glu_forward(g, u, "silu"))
    with pytest.raises(ValueError, match="power of two"):
        glu.glu_tile(F, True, True, 48)


@pytest.mark.parametrize("kw", [dict(ce_programs_per_sm=1), dict(ce_programs_per_sm=2, ce_warps=4)])
def test_flce_persistent_grid_matches_one_program_per_row(kw):
    "4 'SMs' on the CPU: 4 or 8 programs loop over 37 rows (ignored rows, smoothing and soft-capping included)."
    torch.manual_seed(2)
    N, d, V = 37, 16, 50
    h = torch.randn(N, d, requires_grad=True)
    W = torch.randn(V, d) / 3
    y = torch.randint(0, V, (N,))
    y[::6] = -100
    for extra in (dict(), dict(label_smoothing=0.1, softcap=5.0)):
        l0 = flce.linear_cross_entropy(h, W, y, **extra)
        g0, = torch.autograd.grad(l0, h)
        l1 = flce.linear_cross_entropy(h, W, y, **extra, **kw)
        g1, = torch.autograd.grad(l1, h)
        assert torch.equal(l0, l1) and torch.equal(g0, g1)
    assert flce.ce_grid(torch.device("cpu")) == (0, 8)
    assert flce.ce_grid(torch.device("cpu"), 2, 16) == (8, 16)


@pytest.mark.parametrize("warps", [1, 2, 8])
def test_rmsnorm_warps_knob_matches_the_default(warps):
    "num_warps changes only how a row's columns are split over threads: same values and gradients."
    from ftkit.kernels import rmsnorm
    torch.manual_seed(3)
    x = torch.randn(9, 40, requires_grad=True)
    r = torch.randn(9, 40, requires_grad=True)
    w = torch.randn(40, requires_grad=True)
    dy = torch.randn(9, 40)
    y0, s0 = rmsnorm.add_rms_norm(x, r, w, 1e-6)
    g0 = torch.autograd.grad((y0, s0), (x, r, w), (dy, dy))
    y1, s1 = rmsnorm.add_rms_norm(x, r, w, 1e-6, warps=warps)
    g1 = torch.autograd.grad((y1, s1), (x, r, w), (dy, dy))
    close(y1, y0, 1e-6)
    assert torch.equal(s0, s1) and all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(g0, g1))
    assert rmsnorm.rms_tile(896) == (1024, 1, 4) and rmsnorm.rms_tile(896, warps=2) == (1024, 1, 2)
