"""CUDA graphs for the patched decoder: the training step without most of its kernel launches.

At 4,096-token rows ftkit's LoRA step on an H200 was CPU-bound: two optimizer steps took ~400 ms of GPU kernel time and
~1.05 s of CPU time (``benchmarks/results/kernels_e2e_profile_H200.txt``), about 2,700 kernel launches per micro-batch,
each a few microseconds of Python, autograd and driver work. A CUDA graph replays a captured sequence of kernels with
one launch.

The whole decoder (embedding, every layer with its attention, final norm) is one forward and one backward graph
(``_Captured``). Attention inside it is, where it applies, ftkit's Triton varlen attention (``varlen_attention.py``,
``triton_attention``): its launch grid depends only on the row's token count (each program finds its segment's bounds
on the device), so one capture per row shape serves every segmentation. Its offsets are still padded with empty
segments to a fixed count (``pad_cu``; a tensor inside a graph keeps its size): the count comes from the packing plan
(``expect``), and a row with more documents captures again, a quarter larger.

``PiecewiseGraphs(attention=...)`` chooses: "auto" (the default), "triton" or "flash". Where the Triton kernel cannot
serve (head dim not a power of two in [16, 128], a sliding window, soft-capped logits, no CUDA and no interpreter, a
dtype other than fp16 / bf16 / fp32, or a failed capture: ``triton_not``, ``attention_fallback``), or with "flash",
the graph runs the model's own varlen flash attention. Its grid is (longest segment x segments x heads), so the
longest segment is also fixed, per class (512, 1024, ... tokens, ``PiecewiseGraphs._sizes``), each class captured on
first use; padded grids launch empty blocks (H200, Llama-1B attention, 4k rows: flash forward + backward 1031 us a
layer padded as the graph needs, 734 us on the exact segments; the Triton kernel 497 us). All captures share one
memory pool. The backward graph adds the trainable parameters' gradients into buffers that stay
their ``.grad`` (``GradBuffers``), so autograd sees one node per micro-batch instead of one per parameter.

Calls without ``cu_seq_lens`` (or after a failed whole-decoder capture) take the first design: the decoder cut at
attention into ``L + 1`` pieces, graphed with ``torch.cuda.make_graphed_callables``, attention eager between them:

    piece 0      input norm of layer 0, its fused q/k/v LoRA projections and RoPE
    piece l      layer l-1 after attention (o_proj, residual, norm, LoRA MLP, residual), then layer l up to attention
    piece L      the last layer after attention

What graphs require, checked by ``reason_not`` before anything is captured: a CUDA model in training whose every layer
is one of ftkit's own attention forwards (llama, mistral without a sliding window, qwen2, qwen3) with fused q/k/v,
RoPE, LoRA MLP, LoRA O and RMSNorm kernels on, LoRA dropout 0 (a graph replays the same masks), no gradient
checkpointing or activation offloading (their hooks run Python during backward), one process, and parameters whose
storage and ``requires_grad`` stay put while training (no ReLoRA, LISA, or other code that swaps weights). At call
time a changed parameter storage drops the graphs and captures again.

``PiecewiseGraphs(inner, capture=False)`` runs the same code eagerly (the CPU tests check it equals the model).
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn

from ._util import triton_ok

ATTENTIONS = ("auto", "flash", "triton")     # PiecewiseGraphs(attention=...): what runs attention inside the graph
TRITON, FLASH = "triton varlen", "flash varlen (padded)"


class _Piece(nn.Module):
    "Layer `post` after attention (if any), then layer `pre` up to attention (if any)."

    def __init__(self, post, pre):
        super().__init__()
        self.post, self.pre = post, pre

    def forward(self, *args):
        if self.post is not None:
            o, h, cos, sin = args
            h = h + self.post.self_attn.o_proj(o)
            h = h + self.post.mlp(self.post.post_attention_layernorm(h))
        else:
            h, cos, sin = args
        if self.pre is None:
            return h
        q, k, v = self.pre.self_attn._ftkit_qkv_rope(self.pre.input_layernorm(h), cos, sin)
        return (h, q, k, v) if self.post is not None else (q, k, v)     # piece 0 does not hand back its own input


def pieces_of(layers) -> list[_Piece]:
    "The L + 1 pieces of a decoder's layers."
    layers = list(layers)
    return [_Piece(None, layers[0])] + [_Piece(layers[i], layers[i + 1] if i + 1 < len(layers) else None)
                                        for i in range(len(layers))]


def _through_layers(fns, layers, h, cos, sin, attention, attn_kwargs):
    "Piece 0, then for each layer its attention and the next piece: the decoder's hidden state before the final norm."
    q, k, v = fns[0](h, cos, sin)
    for i, layer in enumerate(layers):
        out = fns[i + 1](attention(layer, q, k, v, attn_kwargs), h, cos, sin)
        if i + 1 < len(layers):
            h, q, k, v = out
        else:
            h = out
    return h


def bucket(n: int, step: int) -> int:
    "`n` rounded up to a multiple of `step` (at least one step)."
    return max(step, -(-n // step) * step)


def pad_cu(cu: torch.Tensor, segments: int) -> torch.Tensor:
    """`cu_seq_lens` (n + 1 offsets) padded to `segments + 1` by repeating its last offset: empty segments, which the
    varlen kernels skip, so one captured launch grid serves every row with at most `segments` documents (no host sync)."""
    extra = segments + 1 - cu.numel()
    return cu if extra <= 0 else torch.cat([cu, cu[-1:].expand(extra)])


def triton_not(inner) -> str | None:
    "Why ftkit's Triton varlen attention cannot stand in for this decoder's attention, or None when it can."
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001
        return "triton is not installed"
    p = next(iter(inner.parameters()), None)
    if p is None or not triton_ok(p):
        return f"Triton cannot run on {p.device if p is not None else 'a model without parameters'}"
    for i, layer in enumerate(inner.layers):
        a = layer.self_attn
        D = int(getattr(a, "head_dim", 0) or 0)
        if D & (D - 1) or not 16 <= D <= 128:
            return f"layers.{i}: head dim {D} is not a power of two in [16, 128]"
        if getattr(a, "_ftkit_sliding", None) is not None:
            return f"layers.{i}: sliding-window attention"
        if getattr(getattr(a, "config", None), "attn_logit_softcapping", None):
            return f"layers.{i}: soft-capped attention logits"
    return None


def triton_attention(layer, q, k, v, kwargs: dict) -> torch.Tensor:
    """The graph's attention with `varlen_attention`: q (B, T, Hq, D), k / v (B, T, Hkv, D) as the pieces make them
    (the layouts `_graph_attention` transposes for the model's attention function), the rows flattened into one of
    B * T tokens over `cu_seq_lens_q` (the collator's offsets over the flattened batch, padded), causal within each
    segment, GQA native, the module's `scaling`; returns (B, T, Hq * D) as the model's attention does."""
    from .varlen_attention import varlen_attention
    if not q.dtype == k.dtype == v.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"triton varlen attention takes fp16, bf16 or fp32 q/k/v, not {q.dtype}/{k.dtype}/{v.dtype}")
    B, T, Hq, D = q.shape
    out = varlen_attention(q.reshape(B * T, Hq, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D),
                           kwargs["cu_seq_lens_q"], layer.self_attn.scaling)
    return out.view(B, T, Hq * D)


def _why(e: Exception) -> str:
    "An exception as one short line."
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300]}" if str(e) else type(e).__name__


class _Decoder:
    """Embedding, rotary tables, every layer with its attention, final norm: the whole decoder as one call on
    (input_ids, position_ids, padded cu_seq_lens), with the longest segment fixed at `max_len` (flash attention's
    launch-grid bound; the Triton attention reads only the offsets)."""

    def __init__(self, inner, pieces, attention, max_len: int):
        self.inner, self.pieces, self.attention, self.max_len = inner, pieces, attention, max_len

    def __call__(self, input_ids, position_ids, cu):
        inner = self.inner
        h = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(h, position_ids)
        kw = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": self.max_len, "max_length_k": self.max_len,
              "position_ids": position_ids}
        return inner.norm(_through_layers(self.pieces, list(inner.layers), h, cos, sin, self.attention, kw))


class GradBuffers:
    """The trainable parameters' gradients as buffers that the captured backward adds into and that stay each
    parameter's `.grad`: no AccumulateGrad node per parameter per micro-batch (224 of them for LoRA on a 16-layer
    model, ~45 us of CPU each). `attach()` runs before every backward replay: a `.grad` that was set to None
    (`zero_grad()`) becomes its zeroed buffer again, and one replaced by other code is copied in first."""

    def __init__(self, params):
        self.params = list(params)
        self.bufs = [torch.zeros_like(p) for p in self.params]

    def attach(self) -> None:
        fresh = [b for p, b in zip(self.params, self.bufs) if p.grad is None]
        if fresh:
            torch._foreach_zero_(fresh)
        for p, b in zip(self.params, self.bufs):
            if p.grad is not b:
                if p.grad is not None:
                    b.copy_(p.grad)
                p.grad = b


class _Captured:
    """`fn(*inputs)` captured as a forward and a backward CUDA graph in memory pool `pool` (as torch's
    make_graphed_callables does, minus returning parameter gradients: they are added into `grads` inside the
    backward graph). Inputs must not require grad; `anchor` makes the replayed output part of the autograd graph.
    Several captures may share one pool and one `grads` when each forward replay is followed by its own backward
    before another graph replays (a training step's micro-batches): only the static output stays reserved."""

    def __init__(self, fn, inputs, grads: GradBuffers, warmup: int, pool):
        self.inputs = [x.detach().clone() for x in inputs]
        self.grads = grads
        params = grads.params
        self.anchor = torch.zeros((), device=self.inputs[0].device, requires_grad=True)
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):             # lazy initialisation (cuBLAS handles, Triton compiles) stays out
            for _ in range(warmup):
                out = fn(*self.inputs)
                torch.autograd.grad(out, params, grad_outputs=torch.zeros_like(out), allow_unused=True)
                del out
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.fwd, self.bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.fwd, pool=pool):
            out = fn(*self.inputs)
        self.grad_out = torch.empty_like(out)
        with torch.cuda.graph(self.bwd, pool=pool):
            got = torch.autograd.grad(out, params, grad_outputs=self.grad_out, allow_unused=True)
            pairs = [(b, g) for b, g in zip(self.grads.bufs, got) if g is not None]
            if pairs:
                torch._foreach_add_([b for b, _ in pairs], [g for _, g in pairs])
        self.out = out.detach()                    # the static output; the autograd graph of the capture is gone


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cap, anchor, *inputs):
        for s, x in zip(cap.inputs, inputs):
            if s.data_ptr() != x.data_ptr():
                s.copy_(x)
        cap.fwd.replay()
        ctx.cap, ctx.n = cap, len(inputs)
        return cap.out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        cap = ctx.cap
        cap.grads.attach()
        if cap.grad_out.data_ptr() != g.data_ptr():
            cap.grad_out.copy_(g)
        cap.bwd.replay()
        return (None, None) + (None,) * ctx.n


def reason_not(clm, cfg=None, *, need_cuda: bool = True) -> str | None:
    "Why piecewise graphs cannot run on this (patched) CausalLM, or None when they can."
    for key in ("relora", "lisa_n_layers"):          # trainer callbacks: nothing on the model shows them
        if cfg is not None and getattr(cfg, key, None):
            return f"{key} changes weights or trainable layers between steps"
    several = torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    if several or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:      # launched workers set WORLD_SIZE before the group
        return "several processes (graphs are single-GPU for now)"
    impl = getattr(getattr(clm, "config", None), "_attn_implementation", None)
    if impl != "ftkit_varlen":
        return f"attn_implementation {impl}: the pieces need ftkit's varlen attention (packed rows, no mask to build)"
    inner = getattr(clm, "model", None)
    layers = list(getattr(inner, "layers", []) or [])
    if not layers:
        return "no decoder layers (model.model.layers)"
    p = next(iter(clm.parameters()), None)
    if need_cuda and (p is None or not p.is_cuda):
        return "the model is not on a CUDA GPU"
    if any(getattr(layer, "gradient_checkpointing", False) for layer in layers):   # the pieces would skip the checkpoints
        return "gradient_checkpointing recomputes layers from Python hooks during backward"
    for i, layer in enumerate(layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        kernel_of = lambda m: getattr(m, "_ftkit_kernel", None)  # noqa: E731
        if attn is None or not hasattr(attn, "_ftkit_qkv_rope") or not getattr(attn, "_ftkit_qkv", False):
            return f"layers.{i}: the attention is not ftkit's fused q/k/v + RoPE forward"
        if getattr(attn, "_ftkit_sliding", None) is not None:
            return f"layers.{i}: sliding-window attention"
        if float(getattr(attn, "attention_dropout", 0.0) or 0.0) > 0:
            return f"layers.{i}: attention dropout {attn.attention_dropout}"
        if kernel_of(mlp) != "lora_mlp" or kernel_of(getattr(attn, "o_proj", None)) != "lora_o":
            return f"layers.{i}: the MLP or o_proj is not a fused LoRA kernel"
        for n in ("input_layernorm", "post_attention_layernorm"):
            if kernel_of(getattr(layer, n, None)) != "rms_norm":
                return f"layers.{i}.{n} is not ftkit's RMSNorm kernel"
        for m in layer.modules():
            drop = getattr(m, "lora_dropout", None)
            if isinstance(drop, nn.ModuleDict) and any(isinstance(d, nn.Dropout) and d.p > 0 for d in drop.values()):
                return "lora_dropout > 0 (a graph would replay the same dropout masks)"
    return None


def _no_autocast_cache():
    """Autocast as the caller set it, without its cast cache: a graph cannot hold autocast's cached weight copies (they
    are freed when the autocast region ends), and torch refuses to capture with the cache on."""
    import contextlib
    if not torch.is_autocast_enabled("cuda") or not torch.is_autocast_cache_enabled():
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


class PiecewiseGraphs:
    """The decoder graphed per input shape on first use (`capture=True`) or run eagerly (`capture=False`).

    With the collator's `cu_seq_lens` and longest segment (packed rows), the whole decoder is one graph (`mode`
    "decoder"): attention runs inside it on `cu_seq_lens` padded to a fixed number of segments (`expect()`, from the
    packing plan); a row with more documents captures again, larger. `attention` picks the attention inside it:
    "triton" (`triton_attention`: one capture per row shape serves every segmentation; an error where it cannot
    serve), "flash" (the model's varlen flash attention on a longest segment fixed per class, 512, 1024, ... tokens,
    each class captured on first use: its grid covers segments x longest), or "auto" (Triton where it serves, else
    flash, the reason in `attention_fallback`; a Triton capture or run that fails also falls back, with a warning).
    All captures share one memory pool (a training step replays one graph's forward and backward at a time, so they
    share their activations' memory). Without `cu_seq_lens`, or when the whole decoder's capture fails, the pieces
    between the attention calls are graphed (`mode` "pieces"), attention eager between them."""

    def __init__(self, inner, *, capture: bool = True, max_shapes: int = 6, warmup: int = 3, ready=None,
                 whole: bool = True, attention: str = "auto"):
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, not {attention!r}")
        why = None if attention == "flash" else triton_not(inner)
        if attention == "triton" and why is not None:
            raise ValueError(f"attention='triton': the Triton varlen attention cannot serve this model: {why}")
        self.inner, self.capture, self.max_shapes, self.warmup, self.whole = inner, capture, max_shapes, warmup, whole
        self.attention_mode = attention       # as asked: "auto", "flash" or "triton"
        self.triton = attention != "flash" and why is None   # whether the decoder graph runs the Triton attention
        self.attention_fallback: str | None = why   # why "auto" runs flash (the model, or a failed Triton capture)
        self.ready = ready or (lambda: True)     # at call time: may the pieces run (e.g. every adapter still active)?
        self.pieces = pieces_of(inner.layers)
        self.graphed: dict[tuple, tuple] = {}
        self.decoders: dict[tuple, _Captured] = {}
        self.calls = 0                       # training calls that ran the pieces (graphed or not)
        self.captures = 0                    # how many shapes were captured (and recaptured)
        self.mode: str | None = None         # "decoder" or "pieces": what the last call ran
        self.failed: str | None = None       # why capture failed, once; the step then runs the pieces eagerly
        self.whole_failed: str | None = None  # why capturing the whole decoder failed; the pieces are graphed instead
        self.expected_segments = 1            # documents per row the captures are sized for (`expect`)
        self._pool = self._grads = None       # the decoder graphs' shared memory pool and gradient buffers
        self._params = list(dict.fromkeys(inner.parameters()))
        self._storage = self._signature()
        self._hooks: list = []

    def _signature(self) -> tuple:
        return tuple((p.data_ptr(), p.requires_grad) for p in self._params)

    @property
    def attention(self) -> str:
        "What runs attention inside the decoder graph: `TRITON` or `FLASH`."
        return TRITON if self.triton else FLASH

    def as_dict(self) -> dict:
        "The report's fields: captures, calls, mode, why a capture failed, and the attention inside the decoder graph."
        return {"captures": self.captures, "calls": self.calls, "mode": self.mode, "failed": self.failed,
                "decoder_failed": self.whole_failed, "attention": self.attention,
                "attention_fallback": self.attention_fallback}

    def _triton_failed(self, e: Exception, when: str) -> None:
        """The Triton attention failed while `when`: with "auto", warn, record why and run flash from now on (the
        decoder graphs captured with it are dropped); with "triton", raise."""
        why = _why(e)
        if self.attention_mode == "triton":
            raise RuntimeError(f"attention='triton': the Triton varlen attention failed while {when} ({why})") from e
        self.triton, self.attention_fallback = False, f"the Triton attention failed while {when}: {why}"
        self.decoders.clear()
        warnings.warn(f"cuda_graphs: {self.attention_fallback}; the decoder graph runs flash varlen attention instead",
                      stacklevel=4)

    def release(self) -> None:
        "Drop every captured graph (and the memory pool they hold)."
        self.graphed.clear()
        self.decoders.clear()
        self._pool = self._grads = None
        for hk in self._hooks:
            hk.remove()
        self._hooks = []

    def _guard_grads(self) -> None:
        """A graphed backward returns its static gradient buffers, and autograd may install such a buffer as a
        parameter's `.grad` (it takes the tensor instead of copying when `.grad` is None); the next micro-batch's replay
        would then overwrite the accumulated gradient (pytorch/pytorch#181723). Each trainable parameter of the pieces
        gets a hook that hands autograd a copy: one small copy per adapter matrix per micro-batch."""
        if not self._hooks:
            own = dict.fromkeys(p for piece in self.pieces for p in piece.parameters())
            self._hooks = [p.register_hook(torch.Tensor.clone) for p in own if p.requires_grad]

    def _samples(self, h0, cos, sin) -> tuple:
        "Inputs with the real calls' shapes, dtypes and requires_grad: (h, cos, sin), then (o, h, cos, sin) per piece."
        a0 = self.inner.layers[0].self_attn
        B, T, _ = h0.shape
        o = torch.zeros(B, T, a0.config.num_attention_heads * a0.head_dim, device=h0.device, dtype=h0.dtype)
        first = (h0.detach().clone().requires_grad_(h0.requires_grad), cos.detach().clone(), sin.detach().clone())
        # o always requires grad (it comes from q/k/v); h from piece 2 on (it went through the adapters), h of piece 1
        # is the embedding output, which requires grad only when the embeddings train
        rest = [(o.clone().requires_grad_(), h0.detach().clone().requires_grad_(i > 1 or h0.requires_grad),
                 cos.detach().clone(), sin.detach().clone()) for i in range(1, len(self.pieces))]
        return (first, *rest)

    def _fns(self, h0, cos, sin):
        if not self.capture or self.failed is not None:
            return self.pieces
        sig = self._signature()
        if sig != self._storage:             # a weight was swapped or (un)frozen: the graphs read stale memory
            self.release()
            self._storage = sig
        key = (tuple(h0.shape), h0.dtype, h0.requires_grad)
        if key in self.graphed:
            return self.graphed[key]
        if len(self.graphed) >= self.max_shapes:
            return self.pieces
        try:       # fresh wrappers: make_graphed_callables replaces its modules' forward, and self.pieces stay eager
            fns = torch.cuda.make_graphed_callables(tuple(pieces_of(self.inner.layers)), self._samples(h0, cos, sin),
                                                    num_warmup_iters=self.warmup, allow_unused_input=True)
        except Exception as e:  # noqa: BLE001 — any capture failure: say it once, train on without graphs
            self.failed = _why(e)
            warnings.warn(f"cuda_graphs: capturing the decoder failed ({self.failed}); training continues without graphs",
                          stacklevel=2)
            return self.pieces
        self._guard_grads()
        self.graphed[key] = fns
        self.captures += 1
        return fns

    def __call__(self, input_ids, position_ids, attention, attn_kwargs: dict) -> torch.Tensor:
        """The decoder's normed last hidden state for `input_ids` (B, T) at `position_ids`; `attention(layer, q, k, v)`
        (q/k/v as (B, T, H, D)) is the eager attention between pieces."""
        self.calls += 1
        cu, longest = attn_kwargs.get("cu_seq_lens_q"), attn_kwargs.get("max_length_q")
        with _no_autocast_cache():
            if self.whole and self.whole_failed is None and cu is not None and longest is not None:
                out = self._run_decoder(input_ids, position_ids, attention, cu, int(longest))
                if out is not None:
                    self.mode = "decoder"
                    return out
            self.mode = "pieces"
            return self._run(input_ids, position_ids, attention, attn_kwargs)

    def expect(self, segments: int) -> None:
        """Size captures for rows of up to `segments` documents (the packing plan's most, `ftkit.packing.row_limits`):
        attention's launch grid grows with the count, so the data's own limit wastes the fewest blocks and no row of the
        plan captures again."""
        self.expected_segments = int(segments)

    def _sizes(self, n: int, longest: int, T: int, have=None) -> tuple[int, int]:
        """(segments, longest) to capture for a row of `n` segments: at least the expected segments (growing by a
        quarter past a captured size); for flash the longest segment's class (a power of two from 512, at most the
        row), for the Triton attention (whose grid ignores it) the row: one class."""
        seg = max(n, self.expected_segments, have.segments * 5 // 4 if have is not None else 0)
        return bucket(seg, 8), T if self.triton else min(max(512, 1 << max(longest - 1, 0).bit_length()), T)

    def _decoder(self, attention, max_len: int) -> _Decoder:
        "The whole decoder with the chosen attention: the Triton kernel, or the model's (`attention`) at `max_len`."
        return _Decoder(self.inner, self.pieces, triton_attention if self.triton else attention, max_len)

    def _eager_decoder(self, input_ids, position_ids, attention, cu, longest: int):
        "The whole decoder uncaptured, padded as a capture would be; a Triton failure falls back as at capture."
        if self.triton:
            try:
                return self._eager_decoder_once(input_ids, position_ids, attention, cu, longest)
            except Exception as e:  # noqa: BLE001 — "auto": say it once, run flash; "triton": raise
                self._triton_failed(e, "running eagerly")
        return self._eager_decoder_once(input_ids, position_ids, attention, cu, longest)

    def _eager_decoder_once(self, input_ids, position_ids, attention, cu, longest: int):
        segments, max_len = self._sizes(cu.numel() - 1, longest, input_ids.shape[-1])
        return self._decoder(attention, max_len)(input_ids, position_ids, pad_cu(cu, segments))

    def _run_decoder(self, input_ids, position_ids, attention, cu, longest: int):
        "The whole decoder: replayed from its graphs, or eagerly with the same padding; None: use the pieces."
        if not self.capture or self.failed is not None:
            return self._eager_decoder(input_ids, position_ids, attention, cu, longest)
        cap = self._decoder_graph(input_ids, position_ids, cu, longest, attention)
        if cap is None:
            return None
        return _Replay.apply(cap, cap.anchor, input_ids, position_ids, pad_cu(cu, cap.segments))

    def _decoder_graph(self, input_ids, position_ids, cu, longest: int, attention):
        sig = self._signature()
        if sig != self._storage:             # a weight was swapped or (un)frozen: the graphs read stale memory
            self.release()
            self._storage = sig
        n, T = cu.numel() - 1, input_ids.shape[-1]
        max_len = self._sizes(n, longest, T)[1]
        key = (tuple(input_ids.shape), torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"), max_len)
        have = self.decoders.get(key)
        if have is not None and n <= have.segments:
            return have
        if have is None and len(self.decoders) >= self.max_shapes:
            return None
        segments = self._sizes(n, longest, T, have)[0]
        if have is not None:                 # a row with more documents: capture its class again, larger
            del self.decoders[key], have
        if self._grads is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._grads = GradBuffers([p for p in self._params if p.requires_grad])
        try:
            cap = _Captured(self._decoder(attention, max_len), [input_ids, position_ids, pad_cu(cu, segments)],
                            self._grads, self.warmup, self._pool)
        except Exception as e:  # noqa: BLE001 — Triton: fall back to flash; flash: say it once, graph the pieces
            if self.triton:
                self._triton_failed(e, "capturing the decoder")
                return self._decoder_graph(input_ids, position_ids, cu, longest, attention)
            self.whole_failed = _why(e)
            warnings.warn(f"cuda_graphs: capturing the whole decoder failed ({self.whole_failed}); graphing the pieces "
                          "between attention calls instead", stacklevel=3)
            return None
        cap.segments, cap.max_len = segments, max_len
        self.decoders[key] = cap
        self.captures += 1
        return cap

    def _run(self, input_ids, position_ids, attention, attn_kwargs: dict) -> torch.Tensor:
        inner = self.inner
        h = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(h, position_ids)
        fns = self._fns(h, cos, sin)
        return inner.norm(_through_layers(fns, list(inner.layers), h, cos, sin, attention, attn_kwargs))
