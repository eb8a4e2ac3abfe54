"""RMSNorm's multi-row tiles on the CPU (TRITON_INTERPRET=1): row counts that are not a multiple of the rows per
program, row lengths that are not powers of two, the residual and Gemma-offset variants, and the trainable-weight
path where each program loops over several tiles — values and gradients against the plain-PyTorch reference."""
import pytest
import torch

from test_kernels import close, pytestmark  # noqa: F401   Triton's interpreter on a CPU machine, its skip mark, the comparison
from ftkit.kernels import rmsnorm  # noqa: E402


def test_tile_choice():
    "One row per program by default (fastest on an H200), any power of two when asked; warps follow the tile size."
    assert rmsnorm.rms_tile(896) == (1024, 1, 4)
    assert rmsnorm.rms_tile(2048) == (2048, 1, 4)
    assert rmsnorm.rms_tile(4096) == (4096, 1, 8)
    assert rmsnorm.rms_tile(16384) == (16384, 1, 16)
    assert rmsnorm.rms_tile(896, rows=8) == (1024, 8, 8)
    assert rmsnorm.rms_tile(40, rows=32) == (64, 32, 4)
    with pytest.raises(ValueError, match="power of two"):
        rmsnorm.rms_tile(896, rows=3)


@pytest.mark.parametrize("R,d,rows", [(37, 72, None), (37, 72, 8), (5, 96, 4), (1, 100, None), (130, 48, 2),
                                      (33, 200, 32), (9, 7, 1)])
@pytest.mark.parametrize("offset", [False, True])
def test_values_and_grads_ragged(R, d, rows, offset):
    torch.manual_seed(R * 1000 + d)
    x = torch.randn(R, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(d, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(R, d, dtype=torch.float64)
    y = rmsnorm.rms_norm(x, w, 1e-6, offset, rows=rows)
    yr = rmsnorm.reference(x, w, 1e-6, offset)
    close(y, yr, 1e-6)
    for a, b in zip(torch.autograd.grad(y, (x, w), dy), torch.autograd.grad(yr, (x, w), dy)):
        close(a, b, 1e-5)
    # frozen weight: one tile per program, no dw
    (dx,) = torch.autograd.grad(rmsnorm.rms_norm(x, w.detach(), 1e-6, offset, rows=rows), (x,), dy)
    (dxr,) = torch.autograd.grad(rmsnorm.reference(x, w.detach(), 1e-6, offset), (x,), dy)
    close(dx, dxr, 1e-5)


@pytest.mark.parametrize("offset", [False, True])
def test_residual_ragged_and_several_tiles_per_program(offset):
    "130 rows of 2 per program = 65 tiles over at most 16 programs on the CPU: each program loops over 5 tiles."
    torch.manual_seed(3)
    R, d = 130, 56
    x = torch.randn(2, R // 2, d, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, R // 2, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(d, dtype=torch.float64, requires_grad=True)
    y, s = rmsnorm.add_rms_norm(x, r, w, 1e-6, offset, rows=2)
    yr, sr = rmsnorm.reference(x, w, 1e-6, offset, residual=r)
    close(y, yr, 1e-6)
    close(s, sr, 1e-6)                      # the sum is formed in fp32 (exact in bf16 / fp16 / fp32)
    g = torch.Generator().manual_seed(0)
    dys = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (y, s)]
    for a, b in zip(torch.autograd.grad((y, s), (x, r, w), dys), torch.autograd.grad((yr, sr), (x, r, w), dys)):
        close(a, b, 1e-5)


def test_rows_choice_does_not_change_values_fp32():
    "The per-element arithmetic is the same whatever the tile: fp32 results agree across rows per program."
    torch.manual_seed(4)
    x = torch.randn(45, 136)
    w = torch.randn(136)
    outs = [rmsnorm.rms_forward(x, w, 1e-5, rows=rows)[0] for rows in (1, 4, 16)]
    for o in outs[1:]:
        close(o, outs[0], 1e-6)
    close(outs[0], rmsnorm.reference(x, w, 1e-5), 1e-5)
