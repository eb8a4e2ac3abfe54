"""Fused linear CE's chunking on the CPU (TRITON_INTERPRET=1): the rows-per-chunk rule and ``min_chunk_rows`` (bigger
chunks for small hidden sizes), values and gradients against the reference."""
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
