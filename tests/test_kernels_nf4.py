"""NF4 dequantization kernel on the CPU (TRITON_INTERPRET=1): tile tails, partial quant blocks, block sizes, tile
sizes and double quantization, every result compared with `nf4.reference` for exact equality."""
import os

import torch

if not torch.cuda.is_available():                  # CPU machines (CI): Triton's interpreter, before the kernels exist
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from types import SimpleNamespace  # noqa: E402

triton = pytest.importorskip("triton")

from ftkit.kernels import nf4  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU-interpreter tests; on a GPU machine tests/test_gpu_kernels.py covers NF4")


def _random_state(n: int, blocksize: int, double: bool, blocksize2: int = 8, dtype=torch.bfloat16, seed: int = 0):
    "Random packed bytes and a quant state for n values (n even; the last quant block may be partial)."
    g = torch.Generator().manual_seed(seed)
    n_blocks = -(-n // blocksize)
    packed = torch.randint(0, 256, (n // 2, 1), dtype=torch.uint8, generator=g)
    qs = SimpleNamespace(absmax=torch.rand(n_blocks, generator=g) * 3, shape=(n // 2, 2), dtype=dtype,
                         blocksize=blocksize, code=torch.tensor(nf4.NF4_CODE), offset=None, state2=None)
    if double:
        qs.absmax = torch.randint(0, 256, (n_blocks,), dtype=torch.uint8, generator=g)
        qs.offset = torch.tensor(0.0421)
        qs.state2 = SimpleNamespace(absmax=torch.rand(-(-n_blocks // blocksize2), generator=g) * 0.2 + 0.01,
                                    code=torch.sort(torch.randn(256, generator=g))[0], blocksize=blocksize2)
    return packed, qs


@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_block_sizes_partial_last_block(double, blocksize, dtype):
    n = 5 * blocksize + 22                              # 5 whole quant blocks and a partial one: the masked tile
    packed, qs = _random_state(n, blocksize, double, dtype=dtype, seed=blocksize)
    got = nf4.dequantize(packed, qs)
    assert got.dtype == dtype and got.shape == qs.shape
    assert torch.equal(got, nf4.reference(packed, qs))


@pytest.mark.parametrize("chunk_bytes", [16, 32, 96, 256])
@pytest.mark.parametrize("n_blocks", [1, 3, 8, 13])
def test_tiles_and_tails(chunk_bytes, n_blocks):
    "Tiles of 1, 2, 4 or 8 quant blocks over 1-13 blocks: whole tiles only, a tail tile, a grid of one program."
    packed, qs = _random_state(64 * n_blocks, 64, True, seed=n_blocks)
    assert torch.equal(nf4.dequantize(packed, qs, chunk_bytes=chunk_bytes), nf4.reference(packed, qs))


def test_odd_shape_quantized_weight_fp16_and_out():
    "A real quantized weight of an odd shape (n a multiple of 64 only), written into a given output tensor."
    torch.manual_seed(1)
    w = torch.randn(33, 192)
    packed, qs = nf4.quantize_reference(w, blocksize=64, double=True, blocksize2=16)
    out = torch.empty(33, 192, dtype=torch.float16)
    got = nf4.dequantize(packed, qs, torch.float16, out=out)
    assert got is out and torch.equal(out, nf4.reference(packed, qs, torch.float16))
    assert (out.float() - w).abs().max() < 0.25 * w.abs().max()


def test_non_power_of_two_block_size():
    "A block size of 96 (48 packed bytes per block: a masked column range), partial last block, double quant."
    packed, qs = _random_state(96 * 7 + 40, 96, True, blocksize2=4, seed=5)
    assert torch.equal(nf4.dequantize(packed, qs, chunk_bytes=100), nf4.reference(packed, qs))


def test_bf16_ties_round_to_even():
    "Products exactly halfway between two bf16 values round to even (the interpreter's own cast rounds ties up)."
    code = torch.tensor([1.0 + k * 2.0 ** -8 for k in range(16)])   # 1 + k/256: odd k is a tie at bf16 (7 bits)
    packed = torch.tensor([[(2 * i) << 4 | (2 * i + 1)] for i in range(8)] * 8, dtype=torch.uint8)
    qs = SimpleNamespace(absmax=torch.tensor([1.0, 2.0]), shape=(2, 64), dtype=torch.bfloat16, blocksize=64,
                         code=code, offset=None, state2=None)
    got = nf4.dequantize(packed, qs)
    ref = nf4.reference(packed, qs)
    assert torch.equal(got, ref)
    assert got[0, 1].item() == 1.0 and got[0, 3].item() == 1.0 + 2.0 ** -6    # 1+1/256 -> 1, 1+3/256 -> 1+4/256
