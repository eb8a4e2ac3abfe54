"""Per-kernel benchmark of ftkit.kernels against eager PyTorch, torch.compile, Liger, Cut-Cross-Entropy, bitsandbytes.

Shapes: Qwen2.5-0.5B, Llama-3.2-1B and Llama-3-8B layers at T in {4k, 16k, 64k} tokens (the largest only where it
fits the time budget and memory). Ops: NF4 dequantization, SwiGLU / GeGLU, RMSNorm, RoPE (bandwidth-bound, GB/s),
LoRA MLP, LoRA QKV and LoRA O (r16, peft eager / peft compiled / ftkit's fused node, TFLOP/s) and the fused linear
cross-entropy (ftkit / eager / compile / Liger / Cut-Cross-Entropy, TFLOP/s). Before any timing, each op is checked
against the eager result at that shape (relative error gate); a failed gate is recorded and the row is not timed.
Each op and impl gets two times: "ms (launch)", the median of triton.testing.do_bench over the eager call (L2 flushed;
at small sizes this is the CPU's Python / autograd dispatch), and "ms (graph)", the median GPU time of the same
fwd+bwd captured once in a CUDA graph and replayed (L2 flushed before each replay; what training sees, since ftkit
replays the decoder as one graph). GB/s or TFLOP/s and % of peak are given for both, against the copy bandwidth and
the bf16 GEMM rate measured in the same run. The bandwidth-bound rows also get a same-size copy reference: plain
copy_ calls moving the op's bytes in as many launches as ftkit's fwd+bwd, graph-timed the same way ("% of same-size
copy"). Also peak memory above the inputs and, for the LoRA ops, the activation bytes saved for backward.
Tuning rows (knobs of the kernels beside their defaults) are added for NF4, RMSNorm, GLU and fused CE where the
installed ftkit.kernels has that knob (checked by signature).

    python benchmarks/bench_kernels.py --out benchmarks/results       # GPU: kernels_<gpu>.json / .md
    python benchmarks/bench_kernels.py --ops nf4,swiglu,rmsnorm --graph-only      # GPU: only the replayed times
    python benchmarks/bench_kernels.py --ops rmsnorm,geglu,swiglu,flce --budget 200  # GPU: the bandwidth ops + fused CE
    python benchmarks/bench_kernels.py --ops lora_qkv,lora_o,lora_mlp --graph-only --budget 300  # GPU: the LoRA ops
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --tiny --out /tmp/kb    # CPU smoke test of the script
"""
import argparse
import inspect
import json
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {  # d, F, V, n_q, n_kv, head_dim
    "qwen2.5-0.5b": (896, 4864, 151936, 14, 2, 64),
    "llama-3.2-1b": (2048, 8192, 128256, 32, 8, 64),
    "llama-3-8b": (4096, 14336, 128256, 32, 8, 128),
}


def parse():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test (TRITON_INTERPRET=1), tiny shapes, no timing")
    ap.add_argument("--budget", type=float, default=330, help="seconds; rows after this are skipped (recorded)")
    ap.add_argument("--tokens", default="4096,16384,65536")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-8b", action="store_true",
                    help="also torch.compile PEFT at the Llama-3-8B shape (skipped by default: its compiles take minutes)")
    ap.add_argument("--models", help=f"comma list of shapes to run (default all: {','.join(MODELS)})")
    ap.add_argument("--ops", help="comma list to run only some: nf4,swiglu,geglu,rms,rope,lora_mlp,lora_mlp_nf4,"
                    "lora_qkv,lora_o,flce,flce_train (glu = swiglu; geglu = its erf and tanh rows, geglu_erf / "
                    "geglu_tanh one of them; rmsnorm = rms; lora_attn = lora_qkv + lora_o; lora = lora_mlp + lora_qkv + "
                    "lora_o)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--graph-only", action="store_true", help="skip the do_bench launch timing: CUDA-graph replay only")
    g.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph replay timing (the old table)")
    ap.add_argument("--selftest", action="store_true",
                    help="check graph_ms's recovery from failed captures with fakes (CPU; --tiny runs it too) and exit")
    ap.add_argument("--nf4-variants", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the NF4 kernel at other tile sizes / warps / bf16 rounding (tuning rows)")
    ap.add_argument("--rms-variants", action=argparse.BooleanOptionalAction, default=True,
                    help="also time RMSNorm with one row per program and with twice the default rows (tuning rows)")
    ap.add_argument("--glu-variants", action=argparse.BooleanOptionalAction, default=True,
                    help="also time SwiGLU / GeGLU with the flat (1-D grid) and row kernels at other blocks / warps "
                         "(tuning rows; only where ftkit.kernels.glu.glu takes flat / block / num_warps)")
    ap.add_argument("--flce-variants", action=argparse.BooleanOptionalAction, default=True,
                    help="also time fused CE with other chunk sizes and CE-kernel grids (tuning rows, each only where "
                         "ftkit.kernels.flce takes its knob; Qwen2.5-0.5B at every T, the others at the first T)")
    return ap.parse_args()


OP_ALIASES = {"glu": ("swiglu",), "geglu": ("geglu", "geglu_tanh"), "geglu_erf": ("geglu",), "rmsnorm": ("rms",),
              "lora_attn": ("lora_qkv", "lora_o"), "lora": ("lora_mlp", "lora_qkv", "lora_o")}


def versions():
    v = {"torch": torch.__version__}
    from importlib.metadata import version
    for m in ["triton", "transformers", "peft", "liger_kernel", "bitsandbytes", "cut_cross_entropy"]:
        try:
            v[m] = version(m.replace("_", "-"))
        except Exception as e:  # noqa: BLE001
            v[m] = "n/a (not installed)" if type(e).__name__ == "PackageNotFoundError" else f"n/a ({type(e).__name__})"
    v["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (TRITON_INTERPRET)"
    return v


def _short(e: BaseException) -> str:
    "An exception as 'Type: first line' (100 characters at most)."
    msg = str(e).splitlines()[0][:100] if str(e) else ""
    return f"{type(e).__name__}: {msg}"


def capture_and_time(fn, clear=lambda: None):
    """Median GPU ms of fn replayed from one CUDA graph (L2 flushed before each replay): fn warmed up 3 times on a side
    stream (`clear` before each call), captured there, replayed under do_bench. Raises what broke the capture."""
    import triton.testing
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            clear()
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    clear()
    g = torch.cuda.CUDAGraph()
    inner = []
    try:
        with torch.cuda.graph(g, stream=s):
            try:
                fn()
            except Exception as e:  # noqa: BLE001
                inner.append(e)
                raise
    except Exception as e:  # noqa: BLE001
        if inner and inner[0] is not e:   # capture_end's error hides what broke the capture: report that first
            raise RuntimeError(f"{_short(inner[0])} [then {_short(e)}]") from e
        raise
    torch.cuda.synchronize()
    return triton.testing.do_bench(g.replay, warmup=5, rep=40, return_mode="median")


class Bench:
    def __init__(self, a):
        self.a, self.rows, self.t0 = a, [], time.time()
        self.cuda = torch.cuda.is_available() and not a.tiny
        self.dev = "cuda" if self.cuda else "cpu"
        self.dt = torch.bfloat16 if self.cuda else torch.float32
        self.graph_off = ""        # why CUDA-graph timing is off for the rest of the run ("" while it is on)
        self.rng_cpu = False       # the CUDA generator could not be repaired: random inputs are drawn on the CPU
        self.cpu_gen = torch.Generator().manual_seed(0)
        self.copy_cache = {}       # (bytes, launches) -> (ms, note) of the same-size copy reference

    def over(self):
        return time.time() - self.t0 > self.a.budget

    # ------------------------------------------------------------------------------------------- random inputs
    def randn(self, *shape, dtype=None, requires_grad=False):
        """Normal samples on the bench device. From the CUDA generator while it works; from a CPU generator (then
        copied) once a failed capture has left the CUDA generator unusable, so later rows still run."""
        dtype = dtype or self.dt
        if self.cuda and not self.rng_cpu:
            t = torch.randn(*shape, device=self.dev, dtype=dtype)
        else:
            t = torch.randn(*shape, generator=self.cpu_gen, dtype=torch.float32).to(self.dev, dtype)
        return t.requires_grad_(requires_grad)

    def randint(self, high, shape):
        if self.cuda and not self.rng_cpu:
            return torch.randint(0, high, shape, device=self.dev)
        return torch.randint(0, high, shape, generator=self.cpu_gen).to(self.dev)

    # ------------------------------------------------------------------------------------------------ timings
    def time_ms(self, fn, grad_to_none=None):
        "Median ms of do_bench over the eager call (launch-bound at small sizes); None with --graph-only."
        if self.a.graph_only:
            return None
        if not self.cuda:
            fn()
            return float("nan")
        import triton.testing
        return triton.testing.do_bench(fn, warmup=10, rep=40, grad_to_none=grad_to_none, return_mode="median")

    def graph_ms(self, fn, grad_to_none=None):
        """(median GPU ms of fn replayed from one CUDA graph, note). fn is warmed up 3 times on a side stream, the
        tensors in grad_to_none get .grad = None before capture (so each replay writes fresh gradients, as do_bench's
        grad_to_none does), fn is captured on that same stream, then the graph is replayed under do_bench (L2 flushed
        before each replay). A capture that fails gives (None, reason), never an exception, and `recover` puts the
        process back in order (stream, CUDA generator) or turns graph timing off for the rest of the run with the
        reason (then every later row gets (None, that reason) and its launch timing as usual). On the CPU (--tiny) fn
        runs twice the same way: (nan, "")."""
        if self.a.no_graph:
            return None, ""
        if self.graph_off:
            return None, f"graph n/a: {self.graph_off}"
        ts = list(grad_to_none or [])

        def clear():
            for t in ts:
                t.grad = None
        if not self.cuda:
            for _ in range(2):
                clear()
                fn()
            clear()
            return float("nan"), ""
        try:
            return self._capture_and_time(fn, clear), ""
        except Exception as e:  # noqa: BLE001
            note = f"graph n/a: {_short(e)}"
            fix = self.recover()
            return None, note + (f" ({fix})" if fix else "")
        finally:
            clear()
            self._release()

    def _capture_and_time(self, fn, clear):
        "Warm-up, capture and replay timing of fn on the GPU (graph_ms without the bookkeeping): ms or an exception."
        return capture_and_time(fn, clear)

    def _release(self):
        try:
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001
            pass

    # ----------------------------------------------------------------------------------- after a failed capture
    def _restore_stream(self):
        "A failed capture_end leaves torch.cuda.graph's stream current: back to the default one."
        torch.cuda.set_stream(torch.cuda.default_stream())

    def _sync(self):
        torch.cuda.synchronize()

    def _rng_ok(self) -> bool:
        "Can the CUDA generator draw? (A capture that dies before capture_end's epilogue leaves it in capture mode.)"
        try:
            torch.empty(4, device=self.dev).normal_()
            torch.cuda.synchronize()
            return True
        except RuntimeError:
            return False

    def _rng_repair(self):
        "Give each CUDA default generator a fresh state (same seed and offset, not capturing)."
        for gen in torch.cuda.default_generators:
            gen.graphsafe_set_state(gen.clone_state())

    def recover(self) -> str:
        """After a failed capture: the default stream back, a device sync, the CUDA generator checked and repaired
        if the capture left it in capture mode. Returns a note ("" when nothing needed saying); where the device does
        not sync or the generator cannot be repaired, graph timing is turned off for the rest of the run
        (self.graph_off) and random inputs come from the CPU from then on (self.rng_cpu)."""
        try:
            self._restore_stream()
        except Exception:  # noqa: BLE001
            pass
        try:
            self._sync()
        except Exception as e:  # noqa: BLE001
            self.graph_off = f"off for the rest of the run: the device did not sync after a failed capture ({_short(e)})"
            return self.graph_off
        if self._rng_ok():
            return ""
        try:
            self._rng_repair()
            if self._rng_ok():
                return "CUDA RNG left in capture mode: repaired"
        except Exception:  # noqa: BLE001
            pass
        self.rng_cpu = True
        self.graph_off = ("off for the rest of the run: a failed capture left the CUDA RNG in capture mode and it "
                          "could not be repaired (inputs drawn on the CPU from here)")
        return self.graph_off

    def copy_ref_ms(self, nbytes, launches):
        """(ms, note): the same-size copy reference of a bandwidth-bound op, timed like `graph_ms` (one CUDA graph, L2
        flushed before each replay): `launches` plain copy_ calls, each from its own buffer of nbytes / (2·launches)
        bytes into another, so together they read + write the op's nbytes in as many kernels as the op's fwd+bwd.
        Measured once per (nbytes, launches) in a run; (None, "") with --no-graph, (None, why) if it could not run."""
        key = (int(round(nbytes)), int(launches))
        if key not in self.copy_cache:
            self.copy_cache[key] = self._copy_ms(*key)
        return self.copy_cache[key]

    def _copy_ms(self, nbytes, launches):
        if self.a.no_graph:
            return None, ""
        if self.graph_off:
            return None, f"graph n/a: {self.graph_off}"
        elt = torch.empty(0, dtype=self.dt).element_size()
        n = max(1, round(nbytes / (2 * launches * elt)))
        try:
            bufs = [(torch.empty(n, device=self.dev, dtype=self.dt), torch.empty(n, device=self.dev, dtype=self.dt))
                    for _ in range(launches)]
        except torch.OutOfMemoryError:
            self._release()
            return None, f"OOM for {2 * n * elt * launches / 2**30:.1f} GiB of copy buffers"

        def fn():
            # torch.mul, not copy_: a same-dtype copy_ becomes a memcpy node in a CUDA graph, which ran at ~2.7 TB/s
            # on an H200 against ~4.2 TB/s for a copy kernel (the peak's); mul moves the same bytes in one kernel
            for dst, src in bufs:
                torch.mul(src, 1, out=dst)
        try:
            return self.graph_ms(fn)
        finally:
            del bufs
            self._release()

    def timed(self, fn, grad_to_none=None, *, nbytes=None, flops=None, peaks=None, gate="", after=None,
              copy_ref=None, **row):
        """Both timings of fn, their rates against the run's peaks, the fields of after() (peak memory), the row added.
        A TFLOP/s rate above 105 % of the measured GEMM peak is flagged in the gate column (a replay that skipped
        work, or a wrong FLOP count). copy_ref=(nbytes, launches): also the same-size copy reference (`copy_ref_ms`)
        and the graph time as a fraction of it (equal bytes, so the rate ratio is the time ratio)."""
        def extra_fields():
            try:
                return after()
            except Exception as e:  # noqa: BLE001
                return {"after_error": _short(e)}
        ms = self.time_ms(fn, grad_to_none)
        extra = extra_fields() if after is not None and ms is not None else None   # as before: after the launch timing
        msg, note = self.graph_ms(fn, grad_to_none)
        row.update(extra if extra is not None else extra_fields() if after is not None else {})
        checks = []
        for key, t in (("", ms), ("_graph", msg)):
            row["ms" + key] = t
            if t is None:
                continue
            if nbytes is not None:
                row["GBps" + key] = nbytes / t / 1e6
                row["pct_peak" + key] = row["GBps" + key] / peaks["copy_GBps"]
            if flops is not None:
                row["TFLOPs" + key] = flops / t / 1e9
                row["pct_peak" + key] = row["TFLOPs" + key] / peaks["gemm_TFLOPs"]
                if row["pct_peak" + key] > 1.05:
                    checks.append(f"CHECK: TFLOP/s{' (graph)' if key else ''} above the GEMM peak")
        if copy_ref is not None and not self.a.no_graph:
            cms, cnote = self.copy_ref_ms(*copy_ref)
            row["copy_ms_graph"], row["copy_launches"] = cms, int(copy_ref[1])
            if cms is not None and msg is not None:
                row["pct_copy_graph"] = cms / msg if msg > 0 else float("nan")
            if cnote:
                checks.append(f"copy ref: {cnote}")
        row["gate"] = "; ".join(x for x in (gate, note, *checks) if x)
        self.add(**row)
        return row

    def peak(self, fn):
        "Peak bytes allocated above what was allocated before one call."
        if not self.cuda:
            fn()
            return 0
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    def add(self, **row):
        self.rows.append(row)
        keys = ["op", "model", "T", "impl", "ms", "ms_graph", "GBps", "GBps_graph", "TFLOPs", "TFLOPs_graph",
                "pct_peak", "pct_peak_graph", "copy_ms_graph", "pct_copy_graph", "peak_MiB", "saved_MiB", "gate"]
        print(" ".join(f"{k}={row[k]:.4g}" if isinstance(row.get(k), float) else f"{k}={row.get(k)}"
                       for k in keys if k in row), flush=True)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / (b.norm() + 1e-12)).item()


def takes(fn, names) -> bool:
    "Whether fn's signature has all these parameters (kernel knobs that may not have landed in this ftkit yet)."
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return all(n in params for n in names)


def raise_recompile_limit(n=64):
    """Every compiled row compiles the same code objects (PeftModel.forward, the eager lambdas) at a new shape or
    closure: past Dynamo's per-code-object limit (8) it would silently run them eagerly and the 'compile' rows
    would time eager code. One run compiles fewer than n variants of any of them."""
    try:
        import torch._dynamo.config as dc
    except Exception:  # noqa: BLE001
        return
    for k in ("recompile_limit", "cache_size_limit"):      # the name changed across torch versions (alias in between)
        if hasattr(dc, k):
            setattr(dc, k, max(n, getattr(dc, k)))


def maybe_compile(fn, a):
    if a.no_compile or a.tiny:
        return None
    return torch.compile(fn, dynamic=True)


# --------------------------------------------------------------------------------------------------------------- ops
GLU_OPS = {  # plan name -> (hidden_act passed to ftkit.kernels.glu, row label)
    "swiglu": ("silu", "swiglu fwd+bwd"),
    "geglu": ("gelu", "geglu (erf) fwd+bwd"),
    "geglu_tanh": ("gelu_pytorch_tanh", "geglu (tanh) fwd+bwd"),
}


def _liger_glu(act):
    "Liger's fused act(a)·b for this activation, or None (Liger has SiLU and the tanh GELU; no erf GELU)."
    try:
        if act == "silu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction
            return lambda a, b: LigerSiLUMulFunction.apply(a, b)
        if act == "gelu_pytorch_tanh":
            from liger_kernel.ops.geglu import LigerGELUMulFunction
            return lambda a, b: LigerGELUMulFunction.apply(a, b)
    except Exception:  # noqa: BLE001
        pass
    return None


GLU_VARIANTS = {  # tuning rows: kernels.glu.glu's grid knobs, only where glu.glu takes them (flat: contiguous g/u/h
    # as one 1-D array, `block` elements per program; flat=False: the row kernel, a 2-D grid of (row, column block))
    "ftkit rows b1024 w4": dict(flat=False, block=1024, num_warps=4),
    "ftkit flat b1024 w4": dict(flat=True, block=1024, num_warps=4),
    "ftkit flat b2048 w8": dict(flat=True, block=2048, num_warps=8),
    "ftkit flat b4096 w8": dict(flat=True, block=4096, num_warps=8),
    "ftkit flat b4096 w16": dict(flat=True, block=4096, num_warps=16),
}
# Triton launches of ftkit's fwd+bwd, a fallback only: `op_launches` counts them at run time for the same-size copy
# reference. GLU, RMSNorm (frozen w) and RoPE: one forward and one backward kernel; NF4: one kernel.
LAUNCHES = {"glu": 2, "rms": 2, "rope": 2, "nf4": 1}


def triton_launches(fn):
    "Triton kernel launches during one call of fn (counted at JITFunction / the interpreter's `run`), or None."
    try:
        from triton.runtime.jit import JITFunction
        classes = [JITFunction]
    except Exception:  # noqa: BLE001
        return None
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except Exception:  # noqa: BLE001
        pass
    n = [0]
    saved = [(c, c.__dict__["run"]) for c in classes if "run" in c.__dict__]

    def counting(orig):
        def run(self, *args, **kwargs):
            if not kwargs.get("warmup", False):
                n[0] += 1
            return orig(self, *args, **kwargs)
        return run
    try:
        for c, orig in saved:
            c.run = counting(orig)
        fn()
    finally:
        for c, orig in saved:
            c.run = orig
    return n[0] if saved else None


def op_launches(kind, fn, grads=()):
    """Launches for the same-size copy reference: the Triton launches of one untimed call of ftkit's fwd+bwd `fn`
    (the .grad of `grads` cleared afterwards), or LAUNCHES[kind] when they cannot be counted."""
    try:
        n = triton_launches(fn)
    except Exception:  # noqa: BLE001
        n = None
    for t in grads:
        t.grad = None
    return n if n else LAUNCHES[kind]


def bench_glu(B, model, T, peaks, op="swiglu"):
    """act(g)·u fwd+bwd on (T, F) halves: SwiGLU, or GeGLU with the exact (erf) or the tanh GELU. Every impl other
    than eager is gated against eager (relative error < 1e-2) before it is timed. With --glu-variants, the
    GLU_VARIANTS rows too where glu.glu has those knobs."""
    from ftkit.kernels import glu
    act, label = GLU_OPS[op]
    d, Fi = (MODELS[model][:2]) if not B.a.tiny else (32, 48)
    g = B.randn(T, Fi, requires_grad=True)
    u = B.randn(T, Fi, requires_grad=True)
    dy = B.randn(T, Fi)
    eager = lambda a, b: glu.reference(a, b, act)  # noqa: E731
    impls = {"eager": eager, "ftkit": lambda a, b: glu.glu(a, b, act)}
    c = maybe_compile(eager, B.a)
    if c:
        impls["compile"] = c
    lig = _liger_glu(act)
    if lig is not None:
        impls["liger"] = lig
    if B.a.glu_variants and takes(glu.glu, ("flat", "block", "num_warps")):
        for vname, kw in GLU_VARIANTS.items():
            impls[vname] = (lambda kw_: lambda a, b: glu.glu(a, b, act, **kw_))(kw)
    with torch.no_grad():
        ref = eager(g, u)
    nbytes = 2 * T * Fi * (3 + 5)      # fwd reads g,u writes h; bwd reads dy,g,u writes dg,du (ftkit contract 5)
    launches = op_launches("glu", lambda: impls["ftkit"](g, u).backward(dy), [g, u])
    for name, f in impls.items():
        gate = ""
        if name != "eager":
            try:
                with torch.no_grad():
                    err = rel(f(g, u), ref)
            except Exception as e:  # noqa: BLE001
                B.add(op=label, model=model, T=T, impl=name, gate=f"ERROR {_short(e)}")
                continue
            if not err < 1e-2:
                B.add(op=label, model=model, T=T, impl=name, gate=f"FAIL rel {err:.2e}")
                continue
            gate = f"ok rel {err:.1e}"
        B.timed(lambda: f(g, u).backward(dy), [g, u], nbytes=nbytes, peaks=peaks, op=label, model=model,
                T=T, impl=name, gate=gate, copy_ref=(nbytes, launches))


def bench_rms(B, model, T, peaks):
    from ftkit.kernels import rmsnorm
    d = MODELS[model][0] if not B.a.tiny else 32
    x = B.randn(T, d, requires_grad=True)
    w = B.randn(d)
    dy = B.randn(T, d)
    eager = lambda a: rmsnorm.reference(a, w, 1e-5)  # noqa: E731
    impls = {"eager": eager, "ftkit": lambda a: rmsnorm.rms_norm(a, w, 1e-5)}
    c = maybe_compile(eager, B.a)
    if c:
        impls["compile"] = c
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        impls["liger"] = lambda a: LigerRMSNormFunction.apply(a, w, 1e-5, 0.0, "llama", False)
    except Exception:  # noqa: BLE001
        pass
    if B.a.rms_variants:
        _, rows, _ = rmsnorm.rms_tile(d)
        for r in sorted({1, 2 * rows} - {rows}):
            impls[f"ftkit rows{r}"] = (lambda r_: lambda a: rmsnorm.rms_norm(a, w, 1e-5, rows=r_))(r)
    err = max(rel(f(x), eager(x)) for n, f in impls.items() if n.startswith("ftkit"))
    nbytes = 2 * T * d * (2 + 3)
    launches = op_launches("rms", lambda: impls["ftkit"](x).backward(dy), [x])
    for name, f in impls.items():
        if err > 1e-2 and name.startswith("ftkit"):
            B.add(op="rmsnorm fwd+bwd (frozen w)", model=model, T=T, impl=name, gate=f"FAIL rel {err:.2e}")
            continue
        B.timed(lambda: f(x).backward(dy), [x], nbytes=nbytes, peaks=peaks, op="rmsnorm fwd+bwd (frozen w)",
                model=model, T=T, impl=name, gate=f"ok rel {err:.1e}" if name.startswith("ftkit") else "",
                copy_ref=(nbytes, launches))


def bench_rope(B, model, T, peaks):
    from ftkit.kernels import rope
    _, _, _, nq, nkv, D = MODELS[model] if not B.a.tiny else (0, 0, 0, 4, 2, 16)
    q = B.randn(1, T, nq, D, requires_grad=True)
    k = B.randn(1, T, nkv, D, requires_grad=True)
    pos = torch.arange(T, device=B.dev) % 1024
    inv = 1.0 / (5e5 ** (torch.arange(0, D, 2, device=B.dev).float() / D))
    emb = torch.cat([pos[:, None] * inv] * 2, -1)[None]
    cos, sin = emb.cos().to(B.dt), emb.sin().to(B.dt)
    dq, dk = B.randn(*q.shape), B.randn(*k.shape)

    def eager(a, b):
        return rope.reference(a, b, cos, sin)

    def ours(a, b):
        return rope.rope_(a * 1, b * 1, cos, sin)       # in place on fresh copies (the projection outputs in a model)
    impls = {"eager": eager, "ftkit": ours}
    c = maybe_compile(eager, B.a)
    if c:
        impls["compile"] = c
    try:
        from liger_kernel.ops.rope import LigerRopeFunction
        impls["liger"] = lambda a, b: tuple(t.transpose(1, 2) for t in LigerRopeFunction.apply(
            a.transpose(1, 2), b.transpose(1, 2), cos, sin))
    except Exception:  # noqa: BLE001
        pass
    e = eager(q, k)
    err = max(rel(x, y) for x, y in zip(ours(q, k), e))
    nbytes = 2 * T * (nq + nkv) * D * 4          # fwd + bwd, read + write each
    launches = op_launches("rope", lambda: torch.autograd.backward(ours(q, k), (dq, dk)), [q, k])   # `* 1`: no Triton
    for name, f in impls.items():
        if err > 1e-2 and name == "ftkit":
            B.add(op="rope q+k fwd+bwd", model=model, T=T, impl=name, gate=f"FAIL rel {err:.2e}")
            continue

        def step():
            # autograd.grad, not backward: a capture of backward() into the two leaves' .grad failed on an H200
            # ("would make the legacy stream depend on a capturing blocking stream") for every impl, eager included
            a, b = f(q, k)
            gs = torch.autograd.grad((a, b), (q, k), (dq, dk))
            del a, b, gs
        B.timed(step, [q, k], nbytes=nbytes, peaks=peaks, op="rope q+k fwd+bwd", model=model, T=T, impl=name,
                gate=f"ok rel {err:.1e}" if name == "ftkit" else "", copy_ref=(nbytes, launches))


NF4_VARIANTS = {  # tuning rows: kernels.nf4.dequantize's knobs beside its default (chunk 2048 bytes, 4 warps)
    "ftkit c1024 w4": dict(chunk_bytes=1024, num_warps=4),
    "ftkit c2048 w8": dict(chunk_bytes=2048, num_warps=8),
    "ftkit c4096 w8": dict(chunk_bytes=4096, num_warps=8),     # the default before the H200 graph-timed rows
}


def bench_nf4(B, model, peaks):
    "Dequantize one MLP weight (F x d: 4864x896, 8192x2048, 14336x4096), double quant, bf16 out, against bnb."
    from ftkit.kernels import nf4
    d, Fi = MODELS[model][:2] if not B.a.tiny else (64, 128)
    w = B.randn(Fi, d)
    impls = {"ftkit": lambda: nf4.dequantize(q, qs)}
    if B.a.nf4_variants:
        for name, kw in NF4_VARIANTS.items():
            impls[name] = (lambda kw_: lambda: nf4.dequantize(q, qs, **kw_))(kw)
    if B.cuda:
        import bitsandbytes.functional as bnbf
        q, qs = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        impls = {"bitsandbytes": lambda: bnbf.dequantize_4bit(q, qs, quant_type="nf4"), **impls}
        ref = impls["bitsandbytes"]()
    else:
        q, qs = nf4.quantize_reference(w)
        ref = nf4.reference(q, qs)
    n = Fi * d
    nbytes = n / 2 + n / 64 + 2 * n
    launches = op_launches("nf4", impls["ftkit"])
    for name, f in impls.items():
        exact = torch.equal(f(), ref)          # every impl / variant against bnb (GPU) or the reference (CPU)
        if not exact:
            B.add(op=f"nf4 dequant {Fi}x{d} (double quant)", model=model, T=0, impl=name, gate="FAIL not bit-exact")
            continue
        B.timed(f, nbytes=nbytes, peaks=peaks, op=f"nf4 dequant {Fi}x{d} (double quant)", model=model, T=0, impl=name,
                gate="bit-exact", copy_ref=(nbytes, launches))


def _nonzero_lora_b(p):
    "LoRA B drawn small and non-zero (peft starts it at zero, which would hide the adapter path), in train mode."
    gen = torch.Generator().manual_seed(1)       # on the CPU: building a row never touches the CUDA generator
    with torch.no_grad():
        for n, t in p.named_parameters():
            if "lora_B" in n:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.02)
    return p.train()


def _peft_mlp(B, model, r, qlora=False):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP
    d, Fi = MODELS[model][:2] if not B.a.tiny else (32, 48)
    cfg = LlamaConfig(hidden_size=d, intermediate_size=Fi, hidden_act="silu")

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = LlamaMLP(cfg)

        def forward(self, x):
            return self.mlp(x)
    torch.manual_seed(0)
    m = Wrap().to(B.dev, B.dt)
    if qlora:
        import bitsandbytes as bnb
        for n in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(m.mlp, n)
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=B.dt,
                                  quant_type="nf4", compress_statistics=True)
            q.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True).to(B.dev)
            setattr(m.mlp, n, q)
    p = get_peft_model(m, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                     target_modules=["gate_proj", "up_proj", "down_proj"]))
    return _nonzero_lora_b(p)


def saved_bytes(fn, exclude=()):
    """Bytes of the distinct storages fn's autograd graph saves for backward (the output and its graph are dropped),
    not counting the storages of the tensors in `exclude` (the module's parameters: the frozen base weights that
    F.linear saves for dX are no activation memory). The input x is counted."""
    tot = [0]
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = set()

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen and key[0] not in skip:
            seen.add(key)
            tot[0] += t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out          # a live graph would keep AccumulateGrad nodes of this stream alive into the capture
    return tot[0]


def mem_short(B, need):
    "Why a row needing about `need` bytes of GPU memory is not run ('' when it fits; always '' on the CPU)."
    if not B.cuda:
        return ""
    free, _ = torch.cuda.mem_get_info()
    if need < 0.85 * free:
        return ""
    return f"not run: needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"


def bench_lora_mlp(B, model, T, peaks, r=16, qlora=False):
    """LoRA on gate, up and down of one MLP, forward + backward: peft eager, peft under torch.compile, ftkit's fused
    node. One step is `torch.autograd.grad(y, [x, *LoRA params], dy)`: fresh gradient tensors, no .grad accumulation
    and no AccumulateGrad node outliving its step, so the CUDA-graph capture (on its own stream) sees none from the
    launch timing on the default stream. All inputs and weights are made before any timing; no dropout (no RNG)."""
    d, Fi = MODELS[model][:2] if not B.a.tiny else (32, 48)
    elt = torch.empty(0, dtype=B.dt).element_size()
    # peft eager at its peak: x, dy, dx, the saved g, up, act(g), h and the backward's dh, dg, du, d act(g) (T x F
    # each), with room to spare; 64k tokens of Llama-3-8B come to about 20 GiB
    why = mem_short(B, (10 * T * Fi + 4 * T * d) * elt)
    if why:
        B.add(op=f"lora mlp r{r} fwd+bwd" + (" NF4 base" if qlora else ""), model=model, T=T, impl="-", gate=why)
        return
    x = B.randn(1, T, d, requires_grad=True)
    dy = B.randn(1, T, d)
    flops = 12 * T * d * Fi + 18 * T * r * (d + Fi)   # base: 3 fwd + 3 dX GEMMs (frozen W); LoRA: 6·T·r·(in+out) each
    peft = _peft_mlp(B, model, r, qlora)
    # no autocast weight cache: CUDA-graph capture needs it off (the weights are bf16 already, so nothing is cast)
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)) if B.cuda else \
        (lambda: torch.autocast("cpu", enabled=False))

    def step(m, wrt):
        def f():
            with ctx():
                y = m(x)
            gs = torch.autograd.grad(y, wrt, dy)
            del y, gs
        return f

    def fwd(m):
        with ctx():
            return m(x)
    ref = fwd(peft).detach()
    impls = {"peft eager": peft}
    if not qlora and not B.a.tiny and not B.a.no_compile and (model != "llama-3-8b" or B.a.compile_8b):
        impls["peft compiled"] = torch.compile(peft, dynamic=False)
    ours = _peft_mlp(B, model, r, qlora)
    mlp = ours.get_base_model().mlp
    from ftkit.kernels.patch import KernelReport, _lora_mlp_forward, lora_problem
    probs = [lora_problem(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj")]
    if any(probs):
        B.add(op="lora mlp", model=model, T=T, impl="ftkit", gate=f"FAIL not fusable: {probs}")
        return
    mlp._ftkit_act = "silu"
    KernelReport().patch("lora_mlp", "mlp", mlp, _lora_mlp_forward)
    impls["ftkit"] = ours
    err = rel(fwd(ours).detach(), ref)
    label = f"lora mlp r{r} fwd+bwd" + (" NF4 base" if qlora else "")
    for name, m in impls.items():
        if name == "ftkit" and err > 2e-2:
            B.add(op=label, model=model, T=T, impl=name, gate=f"FAIL rel {err:.2e}")
            continue
        sb = saved_bytes(lambda: fwd(m), exclude=list(m.parameters()))
        wrt = [x] + [p for p in m.parameters() if p.requires_grad]
        f = step(m, wrt)
        B.timed(f, flops=flops, peaks=peaks, op=label, model=model, T=T, impl=name,
                after=lambda: dict(peak_MiB=B.peak(f) / 2**20, saved_MiB=sb / 2**20),
                gate=f"ok rel {err:.1e}" if name == "ftkit" else "")


def _attn_shape(B, model):
    "(d, n_q, n_kv, head_dim) of the model's attention (tiny: 32, 4, 2, 8)."
    if B.a.tiny:
        return 32, 4, 2, 8
    d, _, _, nq, nkv, D = MODELS[model]
    return d, nq, nkv, D


ATTN_PROJS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",)}


def _peft_attn(B, model, r, which):
    """One attention block of the model's family (transformers' Qwen2Attention for Qwen2.5, whose q/k/v have a bias;
    LlamaAttention otherwise) with random weights and LoRA r on q/k/v (which='qkv') or o (which='o') only, so every
    LoRA parameter gets a gradient; lora_B non-zero, no dropout. Its forward calls only those projections: q, k, v as
    (1, T, H, D) like the attention's first lines (no RoPE, no attention), or o_proj's output, always a tuple."""
    from peft import LoraConfig, get_peft_model
    d, nq, nkv, D = _attn_shape(B, model)
    if model.startswith("qwen"):
        from transformers import Qwen2Config as Cfg
        from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention as Attn
    else:
        from transformers import LlamaConfig as Cfg
        from transformers.models.llama.modeling_llama import LlamaAttention as Attn
    cfg = Cfg(hidden_size=d, intermediate_size=4 * d, num_attention_heads=nq, num_key_value_heads=nkv,
              num_hidden_layers=1)
    cfg.head_dim = D

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = Attn(cfg, layer_idx=0)

        def forward(self, x):
            a = self.self_attn
            if which == "o":
                return (a.o_proj(x),)
            return tuple(getattr(a, p)(x).view(*x.shape[:-1], -1, D) for p in ATTN_PROJS["qkv"])
    torch.manual_seed(0)
    m = Wrap().to(B.dev, B.dt)
    p = get_peft_model(m, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(ATTN_PROJS[which])))
    return _nonzero_lora_b(p)


def bench_lora_attn(B, model, T, peaks, which="qkv", r=16):
    """LoRA QKV (q/k/v of one attention: outputs q, k, v; no RoPE, no attention) or LoRA O (o_proj, n_q·head_dim ->
    d), forward + backward: peft eager, peft under torch.compile(dynamic=False) (not for Llama-3-8B, as the MLP), and
    ftkit's fused node called as training calls it: for QKV `patch._qkv(attn, x, True)` (what ftkit's attention
    forward runs: one LoRAProjFunction node over the three LoRAProj built by `lora_proj_of`), for O
    `patch._lora_linear_forward`, the forward patch.py installs on o_proj. A step is `torch.autograd.grad(outputs,
    [x, *LoRA params], douts)` as in bench_lora_mlp. Every impl but peft eager is gated on its outputs and all its
    gradients (relative error < 2e-2) before it is timed."""
    from ftkit.kernels.patch import _lora_linear_forward, _qkv, lora_problem
    d, nq, nkv, D = _attn_shape(B, model)
    din, outs = (d, [nq * D, nkv * D, nkv * D]) if which == "qkv" else (nq * D, [d])
    label = f"lora {which} r{r} fwd+bwd"
    x = B.randn(1, T, din, requires_grad=True)
    flops = sum(4 * T * din * o + 6 * T * r * (din + o) for o in outs)   # each: base fwd + dX, LoRA 6·T·r·(in+out)
    peft = _peft_attn(B, model, r, which)
    attn = peft.get_base_model().self_attn
    probs = {n: lora_problem(getattr(attn, n)) for n in ATTN_PROJS[which]}
    if any(probs.values()):
        B.add(op=label, model=model, T=T, impl="ftkit", gate=f"FAIL not fusable: {probs}")
        return
    ctx = (lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)) if B.cuda else \
        (lambda: torch.autocast("cpu", enabled=False))

    def run(fn):
        with ctx():
            return fn()
    impls = {"peft eager": lambda: peft(x)}
    if not B.a.tiny and not B.a.no_compile and (model != "llama-3-8b" or B.a.compile_8b):
        comp = torch.compile(peft, dynamic=False)
        impls["peft compiled"] = lambda: comp(x)
    if which == "qkv":
        attn._ftkit_qk_norm = False          # what patch.py sets on an attention without q/k norms (all three here)
        impls["ftkit"] = lambda: _qkv(attn, x, True)
    else:
        impls["ftkit"] = lambda: (_lora_linear_forward(attn.o_proj, x),)
    wrt = [x] + [p for p in peft.parameters() if p.requires_grad]
    ref = run(impls["peft eager"])
    douts = [B.randn(*t.shape) for t in ref]
    ref_g = [g.detach() for g in torch.autograd.grad(ref, wrt, douts)]
    ref = [t.detach() for t in ref]

    def check(name, fn):
        "(forward rel error, gradient rel error), the worst over outputs / gradients, or a reason string."
        out = run(fn)
        if name == "ftkit" and which == "o" and "LoRAProj" not in type(out[0].grad_fn).__name__:
            return f"FAIL ran {type(out[0].grad_fn).__name__}, not the fused node (patch's forward fell back to peft)"
        ef = max(rel(a.detach(), b) for a, b in zip(out, ref))
        eg = max(rel(a, b) for a, b in zip(torch.autograd.grad(out, wrt, douts), ref_g))
        return ef, eg

    def step(fn):
        def f():
            o = run(fn)
            gs = torch.autograd.grad(o, wrt, douts)
            del o, gs
        return f
    for name, fn in impls.items():
        gate = ""
        if name != "peft eager":
            try:
                res = check(name, fn)
            except Exception as e:  # noqa: BLE001
                B.add(op=label, model=model, T=T, impl=name, gate=f"ERROR {_short(e)}")
                continue
            if isinstance(res, str) or not (res[0] < 2e-2 and res[1] < 2e-2):
                B.add(op=label, model=model, T=T, impl=name,
                      gate=res if isinstance(res, str) else f"FAIL rel fwd {res[0]:.2e} grad {res[1]:.2e}")
                continue
            gate = f"ok rel fwd {res[0]:.1e} grad {res[1]:.1e}"
        sb = saved_bytes(lambda: run(fn), exclude=list(peft.parameters()))
        f = step(fn)
        B.timed(f, flops=flops, peaks=peaks, op=label, model=model, T=T, impl=name,
                after=lambda: dict(peak_MiB=B.peak(f) / 2**20, saved_MiB=sb / 2**20), gate=gate)


FLCE_VARIANTS = {  # tuning rows: kernels.flce's chunk / CE-kernel knobs beside its default (256 MiB of logits per chunk)
    "ftkit 512-row chunks (old)": lambda V: dict(chunk_bytes=512 * V * 2),
    "ftkit >=1024-row chunks": lambda V: dict(min_chunk_rows=1024),
    "ftkit >=2048-row chunks": lambda V: dict(min_chunk_rows=2048),
}


def _cce():
    """(linear_cross_entropy, graphable or None, "") from Cut-Cross-Entropy, or (None, None, why it is missing).
    linear_cross_entropy(e (N, d), c (V, d), targets, ignore_index, softcap, reduction, shift, filter_eps, impl) is
    its public call; it finds the ignored targets with nonzero(), a host sync that a CUDA-graph capture cannot take.
    graphable(e, c, targets, reduction, filter_eps) is the same autograd function (cce.linear_cross_entropy_apply)
    with valids=None, which is what the public call passes when no target is ignored (never here: labels are drawn in
    [0, V)), so the graph column has a CCE time; None where those internals are not there (checked for 25.1.1)."""
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as e:  # noqa: BLE001
        return None, None, "not installed" if isinstance(e, ModuleNotFoundError) else _short(e)
    try:
        from cut_cross_entropy.cce import CCEParams, linear_cross_entropy_apply
        from cut_cross_entropy.utils import _handle_eps

        def graphable(e, c, targets, reduction="mean", filter_eps="high"):
            params = CCEParams(targets=targets.contiguous(), valids=None, softcap=None, reduction=reduction,
                               filter_eps=_handle_eps(filter_eps, e.dtype), shift=False, batch_shape=targets.size())
            return linear_cross_entropy_apply(e.contiguous(), c, params)
    except Exception:  # noqa: BLE001
        graphable = None
    return linear_cross_entropy, graphable, ""


def bench_flce(B, model, T, peaks, trainable=False, variants=False):
    """ftkit's fused linear CE against eager / compile (full logits, up to 16k x 152k), Liger and Cut-Cross-Entropy
    (`_cce`: its public call, and the same function without its host sync so that it can be graph-timed). Every impl
    but eager / compile is gated on the loss against the fp32 reference. variants: also the FLCE_VARIANTS rows whose
    knobs flce.linear_cross_entropy takes (each gated like ftkit) and CCE with filter_eps=None (exact gradients)."""
    from ftkit.kernels import flce
    d, _, V = MODELS[model][:3] if not B.a.tiny else (32, 0, 500)
    h = B.randn(T, d, requires_grad=True)
    W = (B.randn(V, d, dtype=torch.float32) / math.sqrt(d)).to(B.dt).requires_grad_(trainable)
    y = B.randint(V, (T,))
    label = f"fused linear CE fwd+bwd ({'trainable' if trainable else 'frozen'} head)"

    def eager(h_, W_):
        return torch.nn.functional.cross_entropy((h_ @ W_.t()).float(), y)
    impls = {"ftkit": lambda h_, W_: flce.linear_cross_entropy(h_, W_, y, reduction="mean")}
    if variants:
        for vname, kw in FLCE_VARIANTS.items():
            if takes(flce.linear_cross_entropy, kw(V)):
                impls[vname] = (lambda kw_: lambda h_, W_: flce.linear_cross_entropy(h_, W_, y, reduction="mean",
                                                                                    **kw_))(kw(V))
    if T * V <= 16384 * 151936:
        impls["eager"] = eager
        c = maybe_compile(eager, B.a)
        if c:
            impls["compile"] = c
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
        lig = LigerFusedLinearCrossEntropyLoss()
        impls["liger"] = lambda h_, W_: lig(W_, h_, y)
    except Exception:  # noqa: BLE001
        pass
    cce, cce_graphable, why = _cce()
    if cce is not None:
        # reduction="mean" like every other impl here (no ignored labels: sum / T); CCE has no bias argument. Its
        # default filter_eps="high" skips gradient blocks below bf16 resolution; filter_eps=None is exact.
        impls["cce"] = lambda h_, W_: cce(h_, W_, y, reduction="mean")
        if cce_graphable is not None:
            impls["cce graphable"] = lambda h_, W_: cce_graphable(h_, W_, y, reduction="mean")
            if variants:
                impls["cce graphable filter_eps=None"] = lambda h_, W_: cce_graphable(h_, W_, y, reduction="mean",
                                                                                      filter_eps=None)
    ref = flce.reference(h.detach().float(), W.detach().float(), y, reduction="mean").item()
    errs = {}                # impl -> relative loss error, or the exception that stopped its gate
    for n, f in impls.items():
        if n in ("eager", "compile"):
            continue
        try:
            out = f(h, W)
            out = out[0] if isinstance(out, tuple) else out
            errs[n] = abs(out.detach().item() - ref) / abs(ref)
            del out
        except Exception as e:  # noqa: BLE001
            errs[n] = e
    flops = (6 if trainable else 4) * T * d * V
    ins = [h] + ([W] if trainable else [])
    for name, f in impls.items():
        err = errs.get(name)
        if isinstance(err, Exception):
            B.add(op=label, model=model, T=T, impl=name, gate=f"ERROR {_short(err)}")
            continue
        if err is not None and not err <= 1e-2:
            B.add(op=label, model=model, T=T, impl=name, gate=f"FAIL rel {err:.2e}")
            continue

        def step():
            loss = f(h, W)
            loss = loss[0] if isinstance(loss, tuple) else loss
            loss.backward()
        try:
            B.timed(step, ins, flops=flops, peaks=peaks, op=label, model=model, T=T, impl=name,
                    after=lambda: dict(peak_MiB=B.peak(step) / 2**20),
                    gate=f"ok rel {err:.1e}" if err is not None else "")
        except torch.OutOfMemoryError:
            B.add(op=label, model=model, T=T, impl=name, gate="OOM")
            torch.cuda.empty_cache()
    if cce is None and B.cuda:           # on the CPU (--tiny) a missing CCE is simply skipped
        B.add(op=label, model=model, T=T, impl="cce", gate=f"n/a ({why})")


def selftest_recovery():
    """graph_ms / recover / timed control flow with fake CUDA pieces (runs on the CPU): a failed capture is caught and
    noted, the stream and RNG are restored, a repairable RNG keeps graph timing on, an unrepairable one (or a device
    that does not sync) turns it off with the reason and moves random inputs to the CPU, and every row keeps its
    launch timing."""
    a = argparse.Namespace(tiny=True, no_graph=False, graph_only=False, budget=1e9)
    peaks = {"copy_GBps": 1000.0, "gemm_TFLOPs": 100.0}

    def fake(capture_fails, rng_states, repair_ok=True, sync_ok=True):
        B = Bench(a)
        B.cuda = True                                    # take the GPU branch, with its CUDA pieces faked
        calls = {"capture": 0, "restore": 0, "repair": 0}
        fails = list(capture_fails)
        rng = list(rng_states)                           # successive answers of _rng_ok

        def capture(fn, clear):
            calls["capture"] += 1
            clear()
            if fails.pop(0):
                raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
            return 1.0

        def repair():
            calls["repair"] += 1
            if not repair_ok:
                raise RuntimeError("no graphsafe_set_state")

        def sync():
            if not sync_ok:
                raise RuntimeError("CUDA error: unspecified launch failure")
        B._capture_and_time, B._release = capture, (lambda: None)
        B._restore_stream = lambda: calls.__setitem__("restore", calls["restore"] + 1)
        B._sync, B._rng_repair = sync, repair
        B._rng_ok = lambda: rng.pop(0)
        B.time_ms = lambda fn, g=None: 2.0               # the launch timing (do_bench on a GPU)
        return B, calls

    leaf = torch.zeros(2, requires_grad=True)
    leaf.grad = torch.ones(2)
    # 1. capture fails, the RNG is fine: noted, graph timing stays on, the next row is graph-timed
    B, c = fake([True, False], [True])
    ms, note = B.graph_ms(lambda: None, [leaf])
    assert ms is None and note.startswith("graph n/a: RuntimeError: CUDA error") and "RNG" not in note, note
    assert leaf.grad is None and c["restore"] == 1 and not B.graph_off and c["repair"] == 0
    assert B.graph_ms(lambda: None) == (1.0, "") and c["capture"] == 2
    # 2. the capture left the RNG in capture mode and the repair works: graph timing stays on
    B, c = fake([True, False], [False, True])
    ms, note = B.graph_ms(lambda: None)
    assert ms is None and "repaired" in note and c["repair"] == 1 and not B.graph_off and not B.rng_cpu, note
    assert B.graph_ms(lambda: None)[0] == 1.0
    # 3. the repair fails: graph timing off for the rest of the run, inputs from the CPU, launch timings go on
    for repair_ok, states in ((False, [False]), (True, [False, False])):
        B, c = fake([True], states, repair_ok=repair_ok)
        row = B.timed(lambda: None, flops=1e9, peaks=peaks, op="x", model="m", T=1, impl="i")
        assert row["ms"] == 2.0 and row["ms_graph"] is None and B.graph_off and B.rng_cpu
        assert "off for the rest of the run" in row["gate"], row["gate"]
        row = B.timed(lambda: None, flops=1e9, peaks=peaks, op="x", model="m", T=2, impl="i")
        assert row["ms"] == 2.0 and row["ms_graph"] is None and c["capture"] == 1, (row, c)
        assert B.randn(3, 2).device.type == "cpu"        # B.dev is "cpu" under --tiny; the CPU generator drew it
    # 4. the device does not sync after the failure: graph timing off, launch timings go on
    B, c = fake([True], [], sync_ok=False)
    assert B.graph_ms(lambda: None)[0] is None and "did not sync" in B.graph_off
    assert B.timed(lambda: None, flops=1e9, peaks=peaks, op="x", model="m", T=3, impl="i")["ms"] == 2.0
    assert c["capture"] == 1
    # 5. an impossible rate is flagged
    B, c = fake([False], [])
    assert "CHECK" in B.timed(lambda: None, flops=1e12, peaks=peaks, op="x", model="m", T=4, impl="i")["gate"]
    # 6. the same-size copy reference is captured once per (bytes, launches) and divides the op's graph time
    B, c = fake([False] * 5, [])
    rows = [B.timed(lambda: None, nbytes=4096, peaks=peaks, op="x", model="m", T=t, impl="i", copy_ref=(4096, 2))
            for t in (5, 6)]
    assert c["capture"] == 3 and list(B.copy_cache) == [(4096, 2)], (c, B.copy_cache)
    assert all(r["copy_ms_graph"] == 1.0 and r["pct_copy_graph"] == 1.0 and r["copy_launches"] == 2 for r in rows)
    B.timed(lambda: None, nbytes=4096, peaks=peaks, op="x", model="m", T=7, impl="i", copy_ref=(4096, 4))
    assert c["capture"] == 5 and len(B.copy_cache) == 2
    print("selftest_recovery: ok", flush=True)


def measure_peaks(B):
    if not B.cuda:
        return {"copy_GBps": float("nan"), "gemm_TFLOPs": float("nan")}
    import triton.testing
    x = torch.empty(2**28, device="cuda", dtype=torch.float32)
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=10, rep=50, return_mode="median")
    copy = 2 * x.numel() * 4 / ms / 1e6
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=10, rep=50, return_mode="median")
    del x, y, a, b
    torch.cuda.empty_cache()
    return {"copy_GBps": copy, "gemm_TFLOPs": 2 * 8192**3 / ms / 1e9}


def write(B, peaks, out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    v = versions()
    tag = "cpu" if not B.cuda else v["gpu"].replace("NVIDIA ", "").replace(" ", "-")
    rec = {"versions": v, "peaks": peaks, "rows": B.rows, "seconds": time.time() - B.t0, "budget_s": B.a.budget,
           "graph_off": B.graph_off, "rng_cpu": B.rng_cpu,
           "columns": {"ms": "do_bench median of the eager call (launch)", "ms_graph": "median GPU time of the same "
                       "call replayed from one CUDA graph (null: capture failed, see gate)",
                       "*_graph": "rates / % of peak from ms_graph",
                       "copy_ms_graph": "bandwidth-bound ops: graph-replay ms of copy_launches plain copy_ calls that "
                       "together read + write the op's bytes (L2 flushed; measured once per bytes and launches)",
                       "pct_copy_graph": "copy_ms_graph / ms_graph: the op's GB/s over the same-size copy's GB/s",
                       "saved_MiB": "bytes of the distinct tensors autograd saves for backward, the module's "
                       "parameters excluded (the input counted)"}}
    (out / f"kernels_{tag}.json").write_text(json.dumps(rec, indent=1, default=str))
    launch_counts = {r["op"].split()[0]: r["copy_launches"] for r in B.rows if "copy_launches" in r}
    lines = [f"# ftkit kernel benchmark on {v['gpu']}", "",
             "Versions: " + ", ".join(f"{k} {x}" for k, x in v.items() if k != "gpu"), "",
             f"Peaks measured in the same run: copy {peaks['copy_GBps']:.0f} GB/s (read + write), "
             f"bf16 GEMM 8192³ {peaks['gemm_TFLOPs']:.0f} TFLOP/s.", "",
             "Columns: 'ms (launch)' is the median of `triton.testing.do_bench` over the eager fwd+bwd call "
             "(L2 flushed): at small sizes (4k tokens) it measures the CPU's Python / autograd dispatch, not the GPU. "
             "'ms (graph)' is the median GPU time of the same call captured once in a CUDA graph and replayed (L2 "
             "flushed before each replay; gradients set to None before capture, so each replay writes fresh ones): "
             "what training sees, since ftkit replays the decoder as one graph; 'n/a' where capture failed (reason in the gate column). GB/s, "
             "TFLOP/s and % of peak come from the launch time; the '(graph)' columns from the graph time. % of peak is "
             "against the copy bandwidth (GB/s rows) or the bf16 GEMM rate (TFLOP/s rows) above.", "",
             "Same-size copy (SwiGLU / GeGLU, RMSNorm, RoPE, NF4): the large-copy peak copies 1 GiB in one kernel; an "
             "op that moves tens of MB (RMSNorm at 4k tokens) cannot reach it, since launch latency, "
             "the ramp-up and the last partial wave of its grid weigh at that size. 'copy same size (graph) ms' is "
             "the CUDA-graph time (L2 flushed, as 'ms (graph)') of plain `copy_` calls that read + write the op's "
             "bytes in as many kernels as ftkit's fwd+bwd launches (the Triton launches of one untimed call, counted "
             "in this run: " + (", ".join(f"{op} {n}" for op, n in launch_counts.items()) or "none") + "), each "
             "copying an equal share from its own buffer into another; every row of the "
             "op, whatever its impl, is compared with that one reference. '% of same-size copy' = op GB/s (graph) / "
             "copy GB/s at the same bytes = copy ms / op ms: near 100 % means the op runs as fast as moving its "
             "bytes can at that size; above 100 % is possible (the copy is a reference, not a bound).", "",
             "FLOPs: LoRA MLP 12·T·d·F + 18·T·r·(d + F); LoRA QKV, per projection (q: d -> n_q·D, k and v: "
             "d -> n_kv·D), 4·T·in·out (forward and dX with the base weight frozen) + 6·T·r·(in + out) (the LoRA "
             "products: X·Aᵀ, ·Bᵀ, dY·B, its ·A into dX, dA, dB); LoRA O the same for o_proj (n_q·D -> d); fused "
             "CE 4·T·d·V (frozen head), 6·T·d·V (trainable). 'saved MiB': the distinct tensors autograd saves for "
             "backward, the module's parameters excluded.", "",
             "| op | model | T | impl | ms (launch) | ms (graph) | GB/s | TFLOP/s | % of peak | GB/s (graph) | "
             "TFLOP/s (graph) | % of peak (graph) | copy same size (graph) ms | % of same-size copy | peak MiB | "
             "saved MiB | gate |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    if B.graph_off:
        lines[-2:-2] = [f"**CUDA-graph timing was turned off during this run**: {B.graph_off}.", ""]

    def f(x, fmt):
        return format(x, fmt) if isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x)) else ""

    def pct(r, key):
        return f(100 * r[key], ".0f") if isinstance(r.get(key), (int, float)) else ""
    for r in B.rows:
        msg = "n/a" if "ms_graph" in r and r["ms_graph"] is None and "graph n/a" in r.get("gate", "") else \
            f(r.get("ms_graph"), ".3f")
        lines.append(f"| {r['op']} | {r['model']} | {r['T']} | {r['impl']} | {f(r.get('ms'), '.3f')} | {msg} | "
                     f"{f(r.get('GBps'), '.0f')} | {f(r.get('TFLOPs'), '.0f')} | {pct(r, 'pct_peak')} | "
                     f"{f(r.get('GBps_graph'), '.0f')} | {f(r.get('TFLOPs_graph'), '.0f')} | "
                     f"{pct(r, 'pct_peak_graph')} | {f(r.get('copy_ms_graph'), '.3f')} | {pct(r, 'pct_copy_graph')} | "
                     f"{f(r.get('peak_MiB'), '.0f')} | {f(r.get('saved_MiB'), '.0f')} | {r.get('gate', '')} |")
    (out / f"kernels_{tag}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}/kernels_{tag}.json and .md ({len(B.rows)} rows)")


def main():
    a = parse()
    if a.selftest or a.tiny:
        selftest_recovery()
        if a.selftest:
            return
    B = Bench(a)
    raise_recompile_limit()
    peaks = measure_peaks(B)
    print("peaks", peaks, versions(), flush=True)
    Ts = [int(t) for t in a.tokens.split(",")] if not a.tiny else [37]
    models = list(MODELS) if not a.tiny else ["llama-3.2-1b"]
    if a.models and not a.tiny:
        unknown = set(a.models.split(",")) - set(MODELS)
        if unknown:
            raise SystemExit(f"--models: unknown {sorted(unknown)}; known: {sorted(MODELS)}")
        models = [m for m in MODELS if m in a.models.split(",")]
    plan = []
    for m in models:
        plan.append(("nf4", m, 0))
    for m in models:
        for T in Ts:
            plan += [("swiglu", m, T), ("geglu", m, T), ("geglu_tanh", m, T), ("rms", m, T), ("rope", m, T)]
    big = 16384         # LoRA MLP rows above this many tokens go last, so that the time budget drops them first
    for m in models:
        for T in Ts:
            if T <= big:
                plan.append(("lora_mlp", m, T))
    if B.cuda:
        plan.append(("lora_mlp_nf4", "llama-3.2-1b", Ts[0]))
    for m in models:
        for T in Ts:
            plan += [("lora_qkv", m, T), ("lora_o", m, T)]
    for m in models:
        for T in Ts:
            plan.append(("flce", m, T))
    plan.append(("flce_train", "llama-3.2-1b", Ts[0]))
    for m in models:
        for T in Ts:
            if T > big:
                plan.append(("lora_mlp", m, T))
    fns = {"rms": bench_rms, "rope": bench_rope, "flce": bench_flce,
           "lora_qkv": lambda B_, m_, T_, peaks_: bench_lora_attn(B_, m_, T_, peaks_, which="qkv"),
           "lora_o": lambda B_, m_, T_, peaks_: bench_lora_attn(B_, m_, T_, peaks_, which="o")}
    for name in GLU_OPS:
        fns[name] = (lambda op_: lambda B_, m_, T_, peaks_: bench_glu(B_, m_, T_, peaks_, op=op_))(name)
    if a.ops:
        ops = {x for o in a.ops.split(",") if o.strip() for x in OP_ALIASES.get(o.strip(), (o.strip(),))}
        known = {p[0] for p in plan} | {"lora_mlp_nf4"}
        if ops - known:
            raise SystemExit(f"--ops: unknown {sorted(ops - known)}; known: {sorted(known)}")
        plan = [p for p in plan if p[0] in ops]

    def on_term(signum, frame):        # `timeout` (gpu_suite.sh) sends SIGTERM: still write the rows measured so far
        raise SystemExit(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    where = None
    try:
        for op, m, T in plan:
            where = (op, m, T)
            if B.over():
                B.add(op=op, model=m, T=T, impl="-", gate=f"not run: time budget {a.budget:.0f} s used")
                continue
            try:
                if op == "nf4":
                    bench_nf4(B, m, peaks)
                elif op == "lora_mlp":
                    bench_lora_mlp(B, m, T, peaks)
                elif op == "lora_mlp_nf4":
                    bench_lora_mlp(B, m, T, peaks, qlora=True)
                elif op == "flce_train":
                    bench_flce(B, m, T, peaks, trainable=True)
                elif op == "flce":
                    bench_flce(B, m, T, peaks, variants=a.flce_variants and (m == "qwen2.5-0.5b" or T == Ts[0]))
                else:
                    fns[op](B, m, T, peaks)
            except Exception as e:  # noqa: BLE001
                B.add(op=op, model=m, T=T, impl="-", gate=f"ERROR {type(e).__name__}: {str(e)[:160]}")
                traceback.print_exc()
            if B.cuda:
                torch.cuda.empty_cache()
    except (KeyboardInterrupt, SystemExit) as e:
        if where is not None:
            B.add(op=where[0], model=where[1], T=where[2], impl="-", gate=f"stopped: {type(e).__name__} {e}")
        raise
    finally:
        write(B, peaks, a.out)


if __name__ == "__main__":
    main()
