"""Fused linear CE's chunking on the CPU (TRITON_INTERPRET=1): the rows-per-chunk rule, ``min_chunk_rows`` (bigger
chunks for small hidden sizes) and the CE kernel's column block, values and gradients against the reference."""
import pytest
import torch

from test_kernels import close, pytestmark  # noqa: F401   Triton's interpreter on a CPU machine, its skip mark, the comparison
from ftkit.kernels import flce  # noqa: E402


def test_chunk_rows_rule():
    MiB = 1 << 20
    assert flce.chunk_rows(65536, 151936, 2, 256 * MiB) == 768          # was 512 (a power of two)
    assert flce.chunk_rows(65536, 128256, 2, 256 * MiB) == 1024
    assert flce.chunk_rows(65536, 151936, 2, 256 * MiB, 1024) == 1024
    assert flce.chunk_rows(65536, 151936, 2, 256 * MiB, 1500) == 1536   # rounded up to a multiple of 128
    assert flce.chunk_rows(65536, 32064, 2, 256 * MiB, 1024) == 4096    # the bytes rule already gives more
    assert flce.chunk_rows(700, 151936, 2, 256 * MiB, 2048) == 700      # never more than N
    assert flce.chunk_rows(1000, 500, 4, 16 * 500 * 4) == 16
    assert flce.chunk_rows(1000, 500, 4, 100 * 500 * 4) == 64          # below 128 rows: a power of two
    assert flce.chunk_rows(1000, 500, 4, 1) == 16
    assert flce.chunk_rows(0, 500, 4, 1 << 20) == 1


def _chunks_seen(N, d, V, **kw):
    "Loss, dh and the row counts of the (rows, V) logits chunks the forward made."
    from torch.utils._python_dispatch import TorchDispatchMode
    torch.manual_seed(0)
    h = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
    W = torch.randn(V, d, dtype=torch.float64) / 3
    y = torch.randint(0, V, (N,))
    y[::5] = -100
    rows = []

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and out.dim() == 2 \
                    and out.shape[1] == V:
                rows.append(out.shape[0])
            return out
    with Track():
        loss = flce.linear_cross_entropy(h, W, y, reduction="mean", **kw)
        (dh,) = torch.autograd.grad(loss, (h,))
    ref = flce.reference(h, W, y, reduction="mean")
    (dhr,) = torch.autograd.grad(ref, (h,))
    close(loss, ref, 1e-6)
    close(dh, dhr, 1e-6)
    return rows


def test_min_chunk_rows_makes_bigger_chunks_same_values():
    N, d, V = 300, 8, 257
    assert _chunks_seen(N, d, V, chunk_bytes=16 * V * 8) == [16] * 18 + [12]
    assert _chunks_seen(N, d, V, chunk_bytes=16 * V * 8, min_chunk_rows=100) == [128, 128, 44]


@pytest.mark.parametrize("ce_block,smoothing,softcap", [(16, 0.0, None), (64, 0.1, 5.0), (8192, 0.0, None)])
def test_ce_block_values_and_grads(ce_block, smoothing, softcap):
    "Column blocks smaller than V (several loop steps, ragged last one) and bigger than V."
    torch.manual_seed(1)
    N, d, V = 21, 12, 301
    h = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
    W = (torch.randn(V, d, dtype=torch.float64) / 3).requires_grad_()
    y = torch.randint(0, V, (N,))
    y[::4] = -100
    kw = dict(label_smoothing=smoothing, softcap=softcap, reduction="mean")
    loss = flce.linear_cross_entropy(h, W, y, ce_block=ce_block, chunk_bytes=8 * V * 8, **kw)
    ref = flce.reference(h, W, y, **kw)
    close(loss, ref, 1e-6)
    for a, b in zip(torch.autograd.grad(loss, (h, W)), torch.autograd.grad(ref, (h, W))):
        close(a, b, 1e-6)


def test_ce_block_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        flce.linear_cross_entropy(torch.randn(4, 8), torch.randn(40, 8), torch.randint(0, 40, (4,)), ce_block=100)
