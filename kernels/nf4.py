"""NF4 dequantization (bitsandbytes 4-bit, with and without double quantization), bit-exact with bitsandbytes.

bitsandbytes stores a 4-bit weight as packed bytes (element 2i in the high nibble, 2i+1 in the low one), one absmax
per ``blocksize`` elements and the 16-entry NF4 code. With double quantization the absmax values are themselves
8-bit codes: ``absmax = code2[q] * absmax2[block // blocksize2] + offset`` (fp32, multiply then add, as
``dequantize_blockwise`` followed by ``absmax += offset``). The weight is ``code[nibble] * absmax`` in fp32, rounded
once to the output dtype. The Triton kernel does exactly these operations with FMA contraction switched off.

The kernel is laid out for bandwidth: each program takes a tile of whole quant blocks (about 2 KiB of packed bytes),
one row per block, loads the row's bytes with wide loads and its absmax once, looks both nibbles up in the 16-entry
code and interleaves them, so the output (4x the bytes read) goes out in contiguous wide stores. Only the last tile
masks its loads and stores.

``quant_state`` is a bitsandbytes ``QuantState`` or any object with the same attributes (``absmax``, ``shape``,
``dtype``, ``blocksize``, ``code``, ``offset``, ``state2`` with ``absmax``/``code``/``blocksize``).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import triton
import triton.language as tl


@triton.jit
def _rtne_bf16(x):
    "fp32 -> bf16 with round-to-nearest-even done in integer ops (Triton's interpreter does not round to even)."
    b = x.to(tl.uint32, bitcast=True)
    b = (b + (((b >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _nf4_tile(q_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr, pid, n_bytes, n_blocks,
              blocksize2, MASKED: tl.constexpr, NESTED: tl.constexpr, OUT_BF16: tl.constexpr, INT_RTNE: tl.constexpr,
              BLOCKSIZE: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr, ROWS: tl.constexpr):
    """ROWS whole quant blocks from block pid * ROWS on: one absmax per row, the row's HALF = BLOCKSIZE / 2 packed bytes
    along the columns (HALF_P2 >= HALF, a power of two)."""
    r = tl.arange(0, ROWS)
    c = tl.arange(0, HALF_P2)
    row = pid * ROWS + r                                   # quant-block index (int32: < 2**31 blocks)
    chunk0 = pid.to(tl.int64) * (ROWS * HALF)              # first packed byte of this tile
    qb = q_ptr + chunk0                                    # int64 only in the two base pointers
    ob = out_ptr + 2 * chunk0
    boff = r[:, None] * HALF + c[None, :]                  # byte offsets inside the tile
    jo = tl.arange(0, 2 * HALF_P2)
    ooff = r[:, None] * BLOCKSIZE + jo[None, :]            # output offsets inside the tile (after interleaving)
    if MASKED:                                             # the last tile: a partial chunk / partial quant block
        rem = n_bytes - chunk0
        bm = (boff < rem) & (c[None, :] < HALF)
        om = (ooff < 2 * rem) & (jo[None, :] < BLOCKSIZE)
        rm = row < n_blocks
        byte = tl.load(qb + boff, mask=bm, other=0)
        if NESTED:
            qa = tl.load(absmax_ptr + row, mask=rm, other=0).to(tl.int32)
            a = tl.load(code2_ptr + qa) * tl.load(absmax2_ptr + row // blocksize2, mask=rm, other=0.0)
        else:
            a = tl.load(absmax_ptr + row, mask=rm, other=0.0)
    else:
        if HALF_P2 != HALF:                                # a block size that is not a power of two
            bm = c[None, :] < HALF
            om = jo[None, :] < BLOCKSIZE
            byte = tl.load(qb + boff, mask=bm, other=0)
        else:
            byte = tl.load(qb + boff)
        if NESTED:
            qa = tl.load(absmax_ptr + row).to(tl.int32)
            a = tl.load(code2_ptr + qa) * tl.load(absmax2_ptr + row // blocksize2)
        else:
            a = tl.load(absmax_ptr + row)
    if NESTED:
        a = a + tl.load(offset_ptr)                        # dequantize_blockwise, then absmax += offset
    a = a[:, None]
    hi = tl.load(code_ptr + (byte >> 4).to(tl.int32)) * a  # element 2i: high nibble
    lo = tl.load(code_ptr + (byte & 15).to(tl.int32)) * a  # element 2i + 1: low nibble
    v = tl.interleave(hi, lo)                              # (ROWS, 2 * HALF_P2): contiguous, wide stores
    if OUT_BF16:
        if INT_RTNE:
            v = _rtne_bf16(v)
        else:
            v = v.to(tl.bfloat16, fp_downcast_rounding="rtne")
    else:
        v = v.to(out_ptr.dtype.element_ty)
    if MASKED:
        tl.store(ob + ooff, v, mask=om)
    elif HALF_P2 != HALF:
        tl.store(ob + ooff, v, mask=om)
    else:
        tl.store(ob + ooff, v)


@triton.jit
def _nf4_kernel(q_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr, n_bytes, n_blocks, n_full,
                blocksize2, NESTED: tl.constexpr, OUT_BF16: tl.constexpr, INT_RTNE: tl.constexpr,
                BLOCKSIZE: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr, ROWS: tl.constexpr):
    "One program per ROWS quant blocks; only the programs from n_full on (at most one) mask their loads and stores."
    pid = tl.program_id(0)
    if pid < n_full:
        _nf4_tile(q_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr, pid, n_bytes, n_blocks,
                  blocksize2, False, NESTED, OUT_BF16, INT_RTNE, BLOCKSIZE, HALF, HALF_P2, ROWS)
    else:
        _nf4_tile(q_ptr, code_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr, pid, n_bytes, n_blocks,
                  blocksize2, True, NESTED, OUT_BF16, INT_RTNE, BLOCKSIZE, HALF, HALF_P2, ROWS)


# Packed bytes per program (rounded to whole quant blocks) and warps: 2 KiB in, 8 KiB of bf16 out per program, 4 warps.
# Measured on an H200 (CUDA-graph replay, double quant, bf16 out; benchmarks/bench_kernels.py): 3521 / 2522 / 1308 GB/s
# for 14336x4096 / 8192x2048 / 4864x896 against 3302 / 2389 / 1215 with 4 KiB and 8 warps. Under the interpreter a
# tile is a few blocks, so the CPU tests cross tile boundaries and tails at small sizes.
CHUNK_BYTES, NUM_WARPS = 2048, 4


def dequantize(qweight: torch.Tensor, quant_state, dtype: torch.dtype | None = None,
               out: torch.Tensor | None = None, *, chunk_bytes: int | None = None, num_warps: int | None = None,
               int_rtne: bool | None = None) -> torch.Tensor:
    """The dense weight (quant_state.shape) in `dtype` (default quant_state.dtype).

    `chunk_bytes`, `num_warps` and `int_rtne` (bf16 rounding in integer ops rather than the hardware conversion; both
    round to nearest even) are tuning knobs for the benchmark; the defaults are the measured choice."""
    from ._util import interpret, next_pow2
    qs = quant_state
    dtype = dtype or qs.dtype
    n = 1
    for s in qs.shape:
        n *= int(s)
    q = qweight.reshape(-1)
    if q.dtype != torch.uint8:
        q = q.view(torch.uint8)
    assert q.numel() * 2 == n, f"packed NF4 weight has {q.numel()} bytes for {n} values"
    bs = int(qs.blocksize)
    assert bs >= 2 and bs % 2 == 0, f"NF4 blocksize {bs}: each packed byte must lie in one quant block"
    out = out if out is not None else torch.empty(qs.shape, dtype=dtype, device=q.device)
    assert out.is_contiguous() and out.numel() == n
    st2 = getattr(qs, "state2", None)
    nested = st2 is not None
    code = qs.code.to(device=q.device, dtype=torch.float32)
    if nested:
        args = (qs.absmax, st2.code.to(device=q.device, dtype=torch.float32), st2.absmax.float(),
                torch.as_tensor(qs.offset, dtype=torch.float32, device=q.device).reshape(1), int(st2.blocksize))
    else:
        args = (qs.absmax.float(), code, code, code, 1)
    interp = interpret()
    half_p2 = next_pow2(bs // 2)
    chunk = chunk_bytes or (64 if interp else CHUNK_BYTES)
    rows = 1 << (max(chunk // half_p2, 1).bit_length() - 1)   # whole quant blocks per program, a power of two
    n_bytes = q.numel()
    n_blocks = triton.cdiv(n, bs)
    tile = rows * (bs // 2)
    grid = (triton.cdiv(n_blocks, rows),)
    _nf4_kernel[grid](q, code, args[0], args[1], args[2], args[3], out, n_bytes, n_blocks, n_bytes // tile, args[4],
                      NESTED=nested, OUT_BF16=out.dtype == torch.bfloat16,
                      INT_RTNE=interp if int_rtne is None else bool(int_rtne or interp),
                      BLOCKSIZE=bs, HALF=bs // 2, HALF_P2=half_p2, ROWS=rows,
                      num_warps=num_warps or (1 if interp else NUM_WARPS),
                      enable_fp_fusion=False)
    return out


def torch_fallback_not_needed(t: torch.Tensor) -> bool:
    "True where the Triton kernel can run on t (CUDA, or CPU under TRITON_INTERPRET=1)."
    from ._util import triton_ok
    return triton_ok(t)


# NF4 code values as bitsandbytes defines them (normalised quantiles of N(0, 1)).
NF4_CODE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def reference(qweight: torch.Tensor, quant_state, dtype: torch.dtype | None = None) -> torch.Tensor:
    "Plain PyTorch dequantization following bitsandbytes' kernels operation by operation."
    qs = quant_state
    dtype = dtype or qs.dtype
    q = qweight.reshape(-1).view(torch.uint8).long()
    code = qs.code.float().to(q.device)
    st2 = getattr(qs, "state2", None)
    if st2 is not None:
        idx = torch.arange(qs.absmax.numel(), device=q.device) // int(st2.blocksize)
        absmax = st2.code.float()[qs.absmax.long()] * st2.absmax.float()[idx]
        absmax = absmax + qs.offset
    else:
        absmax = qs.absmax.float()
    vals = torch.stack([code[q >> 4], code[q & 15]], -1).reshape(-1)
    blk = torch.arange(vals.numel(), device=q.device) // int(qs.blocksize)
    return (vals * absmax[blk]).to(dtype).reshape(qs.shape)


def _dynamic_map(signed: bool = True) -> torch.Tensor:
    "An 8-bit dynamic code like bitsandbytes' create_dynamic_map (256 sorted values in [-1, 1])."
    v = torch.linspace(-1, 1, 256) if signed else torch.linspace(0, 1, 256)
    return (v.sign() * v.abs() ** 2).float()


def quantize_reference(w: torch.Tensor, blocksize: int = 64, double: bool = True, blocksize2: int = 256):
    """A small NF4 quantizer for CPU tests (nearest code per element, absmax per block, optional 8-bit absmax).
    Returns (packed uint8 (n/2, 1), quant_state namespace). It follows bitsandbytes' layout, not its rounding."""
    x = w.float().reshape(-1)
    n = x.numel()
    assert n % blocksize == 0 and n % 2 == 0
    blocks = x.view(-1, blocksize)
    absmax = blocks.abs().amax(1).clamp_min(1e-12)
    code = torch.tensor(NF4_CODE)
    idx = ((blocks / absmax[:, None]).reshape(-1, 1) - code[None]).abs().argmin(1).to(torch.uint8)
    packed = ((idx[0::2] << 4) | idx[1::2]).to(torch.uint8).view(-1, 1)
    qs = SimpleNamespace(absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize, code=code, offset=None,
                         state2=None)
    if double:
        offset = absmax.mean()
        a = absmax - offset
        pad = (-a.numel()) % blocksize2
        ap = torch.cat([a, a.new_zeros(pad)]).view(-1, blocksize2)
        am2 = ap.abs().amax(1).clamp_min(1e-12)
        code2 = _dynamic_map()
        qa = ((ap / am2[:, None]).reshape(-1, 1) - code2[None]).abs().argmin(1)[: a.numel()].to(torch.uint8)
        qs.absmax, qs.offset = qa, offset
        qs.state2 = SimpleNamespace(absmax=am2, code=code2, blocksize=blocksize2)
    return packed, qs
