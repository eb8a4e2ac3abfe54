"""Causal varlen attention over packed rows, forward + backward: torch's `varlen_attn` (FlashAttention-2 varlen) on the
exact segments, the same on segments padded the way the whole-decoder CUDA graph runs it (a fixed segment count and a
longest-segment class), and ftkit's Triton `kernels.varlen_attention` (grid from the token count only), with a few block
shapes. Rows: documents of lognormal length (median 256, as ../shared/bench) packed into rows of `--seq` tokens.

    python benchmarks/bench_attention.py --out results.json [--seq 4096] [--rows 8]

Prints a table and writes JSON (times are medians of `triton.testing.do_bench`, averaged over the rows)."""
from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rows(n: int, T: int, seed: int = 0, median: float = 256.0, sigma: float = 1.0) -> list[list[int]]:
    "Document lengths of `n` packed rows of exactly `T` tokens (the last document of a row is cut)."
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lens, left = [], T
        while left > 0:
            L = int(math.exp(math.log(median) + sigma * float(torch.randn(1, generator=g))))
            L = max(8, min(L, left))
            lens.append(L); left -= L
        out.append(lens)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import triton
    from torch.nn.attention.varlen import varlen_attn
    from kernels import varlen_attention as va

    dev, dt, T = "cuda", torch.bfloat16, a.seq
    segs = rows(a.rows, T)
    most = max(len(s) for s in segs)
    q = torch.randn(T, a.hq, a.d, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(T, a.hkv, a.d, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(T, a.hkv, a.d, device=dev, dtype=dt, requires_grad=True)
    do = torch.randn(T, a.hq, a.d, device=dev, dtype=dt)
    scale = a.d ** -0.5

    def cu_of(lens, pad_to=None):
        c = [0]
        for L in lens: c.append(c[-1] + L)
        if pad_to: c += [c[-1]] * (pad_to + 1 - len(c))
        return torch.tensor(c, device=dev, dtype=torch.int32)

    params = set(inspect.signature(varlen_attn).parameters)
    kw = {"scale": scale, **({"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True})}
    gqa = "enable_gqa" in params          # torch 2.11's varlen_attn has no GQA: ftkit repeats the kv heads, as here

    def attn_ref(cu, mx):
        if gqa: return varlen_attn(q, k, v, cu, cu, mx, mx, enable_gqa=True, **kw)
        G = a.hq // a.hkv
        return varlen_attn(q, k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1), cu, cu, mx, mx, **kw)

    def flash(cu, mx):
        return lambda: attn_ref(cu, mx)

    def klass(longest):
        c = 512
        while c < longest and c < T: c *= 2
        return min(c, T)

    def triton_fn(cu, blocks):
        def f():
            s, e = va.segment_bounds(cu, T)
            o, lse = va.attn_forward(q, k, v, s, scale, blocks)
            return o, lse, s, e
        return f

    results = {}

    def timeit(name, make_fwd, bwd_of):
        fw, fb = [], []
        for lens in segs:
            fwd = make_fwd(lens)
            fw.append(triton.testing.do_bench(fwd, warmup=10, rep=40))
            fb.append(triton.testing.do_bench(lambda: bwd_of(fwd()), warmup=10, rep=40))
        results[name] = {"fwd_ms": sum(fw) / len(fw), "fwd_bwd_ms": sum(fb) / len(fb)}
        print(f"{name:34s} fwd {results[name]['fwd_ms'] * 1e3:8.1f} us   fwd+bwd {results[name]['fwd_bwd_ms'] * 1e3:8.1f} us", flush=True)

    def flash_bwd(o):
        return torch.autograd.grad(o, (q, k, v), do)

    timeit("flash varlen, exact segments", lambda lens: flash(cu_of(lens), max(lens)), flash_bwd)
    timeit(f"flash varlen, padded to {most} segs + class", lambda lens: flash(cu_of(lens, most), klass(max(lens))), flash_bwd)
    timeit(f"flash varlen, padded, longest {T}", lambda lens: flash(cu_of(lens, most), T), flash_bwd)

    # correctness of the Triton kernel against flash on the exact segments (bf16), before any Triton timing
    worst = 0.0
    for lens in segs[:3]:
        cu = cu_of(lens, most)
        ref = attn_ref(cu_of(lens), max(lens))
        got = va.varlen_attention(q, k, v, cu, scale)
        worst = max(worst, float((got.float() - ref.float()).abs().max()))
        g_ref = torch.autograd.grad(ref, (q, k, v), do)
        g_got = torch.autograd.grad(got, (q, k, v), do)
        worst = max(worst, max(float((x.float() - y.float()).abs().max()) for x, y in zip(g_ref, g_got)))
    print(f"triton vs flash (exact segments), worst abs difference over out/dq/dk/dv: {worst:.3e}")
    results["triton_vs_flash_max_abs"] = worst

    for blocks in [(64, 64, 4), (128, 64, 4), (128, 64, 8), (64, 32, 4), (128, 32, 4), (64, 128, 4), (128, 128, 8)]:
        def bwd(t, blocks=blocks):
            o, lse, s, e = t
            return va.attn_backward(do, q, k, v, o, lse, s, e, scale, blocks)
        try:
            timeit(f"triton {blocks}", lambda lens, blocks=blocks: triton_fn(cu_of(lens, most), blocks), bwd)
        except Exception as ex:                      # a block shape that does not fit shared memory
            print(f"triton {blocks}: {type(ex).__name__}: {str(ex)[:120]}")
            results[f"triton {blocks}"] = {"error": str(ex)[:300]}
    meta = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__, "T": T,
            "hq": a.hq, "hkv": a.hkv, "d": a.d, "rows": a.rows, "segments_per_row": [len(s) for s in segs],
            "varlen_attn_gqa": gqa}
    if a.out:
        Path(a.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
