"""Grid / warp / tile tuning of the bandwidth-bound kernels and the fused CE's chunking, timed the way training runs them.

Two GPU times per op and variant, both from CUDA-graph replay (`triton.testing.do_bench` of the replay, L2 flushed
before each replay):

- ``single``: one fwd+bwd per graph (bench_kernels.py's "ms (graph)"): at 4k tokens the graph's own launch (a few us)
  weighs on an op that moves 7-40 MB;
- ``in-graph``: K fwd+bwd instances on K distinct sets of buffers in one graph (K·bytes >= 256 MiB, so no instance
  finds another's data in the 50 MiB L2), time / K: what an op costs inside ftkit's whole-decoder graph, where many
  kernels run back to back and the layers between two RMSNorms evict L2 anyway.

Bandwidth ops are reported against the large copy (1 GiB, the peak) and against a copy that moves the same bytes in the
same number of kernels, timed both ways. Every variant is checked against the default (bit-exact for GLU / NF4 / CE
grids) before it is timed.

    python benchmarks/tune_grids.py --out DIR [--ops glu,rms,flce,nf4,rope] [--budget 240]      # GPU
    python benchmarks/tune_grids.py --tiny                                     # CPU: run every fn once, no timing
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_kernels import GLU_VARIANTS, MODELS, capture_and_time, measure_peaks  # noqa: E402   the same shapes and peaks as the per-kernel table

L2_SPAN = 256 << 20


def graph_ms(fn, K=1):
    "Median ms of one replay of a graph holding fn(), L2 flushed before each replay, divided by the K instances in fn."
    ms = capture_and_time(fn)
    torch.cuda.empty_cache()
    return ms / K


class Tuner:
    def __init__(self, a):
        self.a, self.rows, self.t0 = a, [], time.time()
        self.cuda = torch.cuda.is_available() and not a.tiny
        self.dev = "cuda" if self.cuda else "cpu"
        self.dt = torch.bfloat16 if self.cuda else torch.float32
        self.copy_cache = {}

    def over(self):
        return time.time() - self.t0 > self.a.budget

    def k_for(self, nbytes):
        return 1 if self.a.tiny else max(2, min(8, math.ceil(L2_SPAN / max(nbytes, 1))))

    def time2(self, make, nbytes):
        """(single ms, in-graph ms, K): `make()` returns a fresh fwd+bwd closure over its own buffers."""
        if not self.cuda:
            make()()
            return float("nan"), float("nan"), 1
        single = graph_ms(make())
        K = self.k_for(nbytes)
        fns = [make() for _ in range(K)]
        inner = graph_ms(lambda: [f() for f in fns], K)
        del fns
        torch.cuda.empty_cache()
        return single, inner, K

    def copy_ref(self, nbytes, launches):
        "(single ms, in-graph ms) of `launches` copies moving nbytes in all (read + write)."
        key = (int(nbytes), launches)
        if key not in self.copy_cache:
            n = max(1, int(nbytes // 2 // launches // 2))     # bf16 elements per copy

            def make():
                pairs = [(torch.empty(n, dtype=torch.bfloat16, device=self.dev),
                          torch.empty(n, dtype=torch.bfloat16, device=self.dev)) for _ in range(launches)]
                return lambda: [torch.mul(x, 1, out=y) for x, y in pairs]     # a kernel: copy_ is a memcpy node
            s, i, _ = self.time2(make, nbytes)
            self.copy_cache[key] = (s, i)
        return self.copy_cache[key]

    def add(self, **row):
        self.rows.append(row)
        print(json.dumps(row), flush=True)

    def bw_row(self, op, model, T, impl, make, nbytes, launches, gate):
        s, i, K = self.time2(make, nbytes)
        cs, ci = self.copy_ref(nbytes, launches)
        pk = self.peaks["copy_GBps"]
        gb = lambda ms: nbytes / ms / 1e6 if ms == ms else float("nan")          # noqa: E731
        self.add(op=op, model=model, T=T, impl=impl, ms_single=s, ms_in_graph=i, K=K, GBps_single=gb(s),
                 GBps_in_graph=gb(i), pct_peak_single=100 * gb(s) / pk, pct_peak_in_graph=100 * gb(i) / pk,
                 copy_same_single_ms=cs, copy_same_in_graph_ms=ci, pct_same_copy_single=100 * cs / s,
                 pct_same_copy_in_graph=100 * ci / i, launches=launches, gate=gate)

    # ------------------------------------------------------------------------------------------------------ ops
    def randn(self, *shape, rg=False):
        return torch.randn(*shape, device=self.dev, dtype=self.dt).requires_grad_(rg)

    def glu(self, model, T):
        from ftkit.kernels import glu
        F = MODELS[model][1] if not self.a.tiny else 45
        # the default (flat, 2048 elements, 4 warps) beside bench_kernels' grid variants
        variants = {"default": {}, **{k.removeprefix("ftkit "): v for k, v in GLU_VARIANTS.items()}}
        for act in ("silu", "gelu", "gelu_pytorch_tanh"):
            def make(tile, act=act):
                g, u = self.randn(T, F, rg=True), self.randn(T, F, rg=True)
                dh = self.randn(T, F)
                return lambda: torch.autograd.grad(glu.glu(g, u, act, **tile), (g, u), dh)
            torch.manual_seed(0)
            ref_fn = make({})
            torch.manual_seed(0)
            ref = [t.clone() for t in ref_fn()]
            for name, tile in variants.items():
                if self.over():
                    return
                torch.manual_seed(0)
                got = make(tile)()
                ok = all(torch.equal(a, b) for a, b in zip(got, ref))
                if not ok:
                    self.add(op=f"glu {act}", model=model, T=T, impl=name, gate="FAIL differs from default")
                    continue
                self.bw_row(f"glu {act}", model, T, name, lambda tile=tile: make(tile), 16 * T * F, 2, "bit-exact")

    def rms(self, model, T):
        "The default tile (its warps were swept once, 1-16, in tune_grids_H200.md: none beat it; the knob is gone)."
        from ftkit.kernels import rmsnorm
        d = MODELS[model][0] if not self.a.tiny else 40

        def make():
            x = self.randn(T, d, rg=True)
            w = torch.ones(d, device=self.dev, dtype=self.dt)
            dy = self.randn(T, d)
            return lambda: torch.autograd.grad(rmsnorm.rms_norm(x, w, 1e-5), (x,), dy)
        self.bw_row("rmsnorm frozen w", model, T, "default", make, 10 * T * d, 2, "")

    def rope(self, model, T):
        """Forward (in place) + backward (out of place) through `rope._apply`, no autograd: q and k read and written
        twice, two launches. Variants: the tile's element budget."""
        from ftkit.kernels import rope
        _, _, _, hq, hk, D = MODELS[model] if not self.a.tiny else (0, 0, 0, 4, 2, 16)

        def make(te):
            q, k = self.randn(1, T, hq, D), self.randn(1, T, hk, D)
            dq, dk = self.randn(1, T, hq, D), self.randn(1, T, hk, D)
            oq, ok = torch.empty_like(dq), torch.empty_like(dk)
            ang = torch.rand(1, T, D, device=self.dev) * 6.28          # a real rotation: values stay bounded
            cos, sin = ang.cos().to(self.dt), ang.sin().to(self.dt)

            def f():
                rope._apply(q, k, cos, sin, tile_elems=te)
                return rope._apply(dq, dk, cos, sin, True, out=(oq, ok), tile_elems=te)
            return f
        for te in (None, 1024, 4096, 8192):
            name = "default" if te is None else f"tile {te}"
            self.bw_row("rope q+k fwd+bwd", model, T, name, lambda te=te: make(te), 8 * T * (hq + hk) * D, 2, "")

    def nf4(self, model):
        from ftkit.kernels import nf4
        d, Fi = MODELS[model][:2] if not self.a.tiny else (64, 128)
        n = Fi * d

        def make():
            w = self.randn(Fi, d)
            if self.cuda:
                import bitsandbytes.functional as bnbf
                q, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            else:
                q, qs = nf4.quantize_reference(w)
            return lambda: nf4.dequantize(q, qs)
        self.bw_row(f"nf4 dequant {Fi}x{d}", model, 0, "default", make, n / 2 + n / 64 + 2 * n, 1, "")

    def flce(self, model, T):
        from ftkit.kernels import flce
        d, _, V = MODELS[model][:3] if not self.a.tiny else (16, 0, 50)
        h = self.randn(T, d, rg=True)
        W = self.randn(V, d) * 0.05
        y = torch.randint(0, V, (T,), device=self.dev)
        variants = {"default": {}, "1024 rows": dict(min_chunk_rows=1024)}

        def run(kw):
            return torch.autograd.grad(flce.linear_cross_entropy(h, W, y, **kw), (h,))
        ref = run({})[0].clone()
        flops = 4 * T * d * V
        for name, kw in variants.items():
            if self.over():
                return
            got = run(kw)[0]
            exact = "rows" not in name
            same = torch.equal(got, ref) if exact else \
                float((got.float() - ref.float()).abs().max() / ref.float().abs().max()) < 1e-2
            if not same:
                self.add(op="flce frozen head", model=model, T=T, impl=name, gate="FAIL differs from default")
                continue
            ms = graph_ms(lambda kw=kw: run(kw)) if self.cuda else float("nan")
            tf = flops / ms / 1e9
            self.add(op="flce frozen head", model=model, T=T, impl=name, ms_single=ms, TFLOPs=tf,
                     pct_peak=100 * tf / self.peaks["gemm_TFLOPs"], gate="ok")


def write(t, out):
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if t.cuda else "cpu"
    (out / "tune_grids.json").write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "peaks": t.peaks,
                                                     "rows": t.rows}, indent=1))
    f = lambda v, p=3: "" if v is None or (isinstance(v, float) and v != v) else (f"{v:.{p}f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [f"# grid tuning on {gpu}", "", f"peaks: copy {t.peaks['copy_GBps']:.0f} GB/s, bf16 GEMM "
             f"{t.peaks['gemm_TFLOPs']:.0f} TFLOP/s", "",
             "| op | model | T | impl | ms single | ms in-graph (K) | % peak single | % peak in-graph | % same-size copy "
             "single | % same-size copy in-graph | TFLOP/s | % GEMM peak | gate |", "|" + "---|" * 13]
    for r in t.rows:
        lines.append(f"| {r['op']} | {r['model']} | {r['T']} | {r['impl']} | {f(r.get('ms_single'))} | "
                     f"{f(r.get('ms_in_graph'))} ({r.get('K', '')}) | {f(r.get('pct_peak_single'), 0)} | "
                     f"{f(r.get('pct_peak_in_graph'), 0)} | {f(r.get('pct_same_copy_single'), 0)} | "
                     f"{f(r.get('pct_same_copy_in_graph'), 0)} | {f(r.get('TFLOPs'), 0)} | {f(r.get('pct_peak'), 0)} | "
                     f"{r.get('gate', '')} |")
    (out / "tune_grids.md").write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/tune_grids")
    ap.add_argument("--ops", default="glu,rms,nf4,flce,rope")
    ap.add_argument("--tokens", default="4096,16384")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--budget", type=float, default=240)
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    t = Tuner(a)
    t.peaks = measure_peaks(t)
    print("peaks", t.peaks, flush=True)
    ops = a.ops.split(",")
    Ts = [int(x) for x in a.tokens.split(",")] if not a.tiny else [8]
    models = a.models.split(",")
    try:
        for op in ops:
            for model in models:
                if op == "nf4":
                    t.nf4(model)
                    continue
                for T in Ts:
                    if t.over():
                        break
                    if op == "flce" and model == "llama-3-8b":
                        continue
                    try:
                        getattr(t, op)(model, T)
                    except Exception as e:  # noqa: BLE001   one op's failure is a row, not the end of the run
                        t.add(op=op, model=model, T=T, impl="-", gate=f"ERROR {type(e).__name__}: {str(e)[:120]}")
                        if t.cuda:
                            torch.cuda.synchronize()
    finally:
        write(t, Path(a.out))
    print(f"wrote {a.out}/tune_grids.md in {time.time() - t.t0:.0f} s")


if __name__ == "__main__":
    main()
