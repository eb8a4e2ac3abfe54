"""The GLU's grid knob on the CPU (TRITON_INTERPRET=1): the flat 1-D grid (the default where the tensors allow it) and
the row grid compute bit for bit the same, forward and backward."""
import pytest
import torch

from test_kernels import close, pytestmark  # noqa: F401   Triton's interpreter on a CPU machine, its skip mark, the comparison
from ftkit.kernels import glu  # noqa: E402


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
    assert glu.glu_tile(F, True) == (True, 2048, 4) and glu.glu_tile(F, False) == (False, 64, 4)   # the defaults
    with pytest.raises(ValueError, match="power of two"):
        glu.glu_tile(F, True, True, 48)
