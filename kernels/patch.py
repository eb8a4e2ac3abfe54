"""The "fast by default" step: swap ftkit's kernels into a loaded (and adapted) model, explicitly and reversibly.

``report = apply_kernels(model, cfg)`` inspects every decoder layer (architecture, shapes, activation, bias, dropout,
quantization, adapter state) and replaces, per module instance, what a kernel computes exactly:

===================  ===========================================================  ==================================
kernel               what it replaces                                             config keys that switch it
===================  ===========================================================  ==================================
``lora_mlp``         the MLP of a layer whose gate/up/down (or gate_up/down)      ``lora_mlp_kernel``
                     are all LoRA: one autograd node (``lora_mlp.py``)
``lora_qkv``         q/k/v LoRA projections: one node (llama, mistral, qwen2/3);  ``lora_qkv_kernel``
                     elsewhere each LoRA projection alone (``lora_proj.py``)
``lora_o``           the attention output LoRA projection                        ``lora_o_kernel``
``rope``             rotary embedding, in place (llama, mistral, qwen2/3)         ``liger_rope``
``rms_norm``         every RMSNorm (Gemma's 1+w form included)                    ``liger_rms_norm``
``glu``              act(gate)·up of MLPs that are not fused LoRA MLPs            ``liger_glu_activation``
``fused_linear_ce``  the LM head + loss while training with labels: chunked,      ``liger_fused_linear_cross_entropy``,
                     no tokens × vocabulary logits (``flce.py``)                  ``cut_cross_entropy``,
                                                                                  ``chunked_cross_entropy``
``offload``          saved activations kept in pinned CPU memory                  ``activation_offloading`` /
                                                                                  ``gradient_checkpointing: offload``
===================  ===========================================================  ==================================

A key left unset means on (where the kernel is exact for the module); ``false`` switches that kernel off; ``true``
asks for it, and the report says why a module was skipped. Nothing is patched at import and no library source is
touched: each patch sets an instance attribute ``forward`` that ``report.undo()`` removes again. The patched
forwards check the adapter state on every call (``disable_adapter()``, merged or switched adapters, a cache during
generation) and call the original forward when the kernel does not apply.
"""
from __future__ import annotations

import types
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from . import flce as _flce
from . import graphs as _graphs
from . import glu as _glu
from . import rmsnorm as _rms
from . import rope as _rope
from ._util import triton_ok
from .lora_common import LoRAProj, make_mask
from .lora_mlp import lora_mlp
from .lora_proj import LoRAProjFunction, lora_projections

# ----------------------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Arch:
    norm_offset: bool = False          # Gemma's RMSNorm: x̂·(1 + w) in fp32
    own_attention: bool = False        # ftkit's attention forward (fused QKV + in-place RoPE) reproduces transformers'
    qk_norm: bool = False              # q_norm / k_norm on (B, T, H, D) before RoPE (Qwen3)
    softcap_attr: str | None = None    # config attribute of the final logit soft-cap


ARCHS: dict[str, Arch] = {
    "llama": Arch(own_attention=True),
    "mistral": Arch(own_attention=True),
    "qwen2": Arch(own_attention=True),
    "qwen3": Arch(own_attention=True, qk_norm=True),
    "phi3": Arch(),
    "gemma": Arch(norm_offset=True),
    "gemma2": Arch(norm_offset=True, softcap_attr="final_logit_softcapping"),
    "gemma3_text": Arch(norm_offset=True, softcap_attr="final_logit_softcapping"),
}

# kernel -> the Axolotl keys that switch it
KERNEL_KEYS: dict[str, tuple[str, ...]] = {
    "lora_mlp": ("lora_mlp_kernel",),
    "lora_qkv": ("lora_qkv_kernel",),
    "lora_o": ("lora_o_kernel",),
    "rope": ("liger_rope",),
    "rms_norm": ("liger_rms_norm",),
    "glu": ("liger_glu_activation",),
    "fused_linear_ce": ("liger_fused_linear_cross_entropy", "cut_cross_entropy", "chunked_cross_entropy"),
}


def switches(cfg=None) -> dict[str, bool]:
    "kernel -> on/off from the config: a key set to true wins, else a key set to false switches off, else on."
    out = {}
    for kernel, keys in KERNEL_KEYS.items():
        vals = [getattr(cfg, k, None) for k in keys] if cfg is not None else []
        out[kernel] = True if any(v is True for v in vals) else not any(v is False for v in vals)
    if cfg is not None:
        gc = getattr(cfg, "gradient_checkpointing", None)
        ao = getattr(cfg, "activation_offloading", None)
        out["offload"] = bool(ao) or gc in ("offload", "offload_disk")
    else:
        out["offload"] = False
    return out


# ------------------------------------------------------------------------------------------------------------ report


@dataclass
class KernelReport:
    "What `apply_kernels` changed and skipped; `undo()` restores every patched module."
    patched: list[tuple[str, str]] = field(default_factory=list)            # (kernel, module name)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)       # (kernel, module name, reason)
    _undo: list = field(default_factory=list, repr=False)
    graphs: Any = field(default=None, repr=False)                           # cuda_graphs: the PiecewiseGraphs

    def patch(self, kernel: str, name: str, module: nn.Module, fn):
        had = "forward" in module.__dict__
        old = module.__dict__.get("forward")
        if "_ftkit_prev_forward" not in module.__dict__:
            module._ftkit_prev_forward = old      # an instance forward someone set before (e.g. a hook), or None
        module.forward = types.MethodType(fn, module)
        module._ftkit_kernel = kernel
        self._undo.append((module, had, old))
        self.patched.append((kernel, name))

    def skip(self, kernel: str, name: str, reason: str):
        self.skipped.append((kernel, name, reason))

    def undo(self) -> int:
        "Restore every patched module's forward; returns how many were restored."
        n = 0
        if self.graphs is not None:        # no warning here: undoing before any training step is normal
            self.graphs.release()
            self.graphs = None
        while self._undo:
            module, had, old = self._undo.pop()
            if had:
                module.forward = old
            else:
                module.__dict__.pop("forward", None)
            if module.__dict__.get("_ftkit_prev_forward") is old or not had:   # its first patch: drop our attributes
                for k in [k for k in module.__dict__ if k.startswith("_ftkit_")]:
                    module.__dict__.pop(k, None)
            n += 1
        return n

    def release_graphs(self) -> None:
        "Free the captured CUDA graphs' memory (after training); they are captured again on the next training step."
        if self.graphs is not None:
            if self.graphs.capture and self.graphs.calls == 0:
                warnings.warn("cuda_graphs is on, but no training step could take the graphed decoder (the calls carried "
                              "arguments the pieces do not handle), so nothing was captured", stacklevel=2)
            self.graphs.release()

    def counts(self) -> dict[str, int]:
        return dict(Counter(k for k, _ in self.patched))

    def lines(self) -> list[str]:
        "Short human lines for the plan and the log: what was patched, then each reason for skipping once."
        c = self.counts()
        out = ["kernels: " + (", ".join(f"{k} x{n}" for k, n in c.items()) if c else "none patched")]
        by_reason: dict[str, Counter] = {}
        for k, _, r in self.skipped:
            by_reason.setdefault(r, Counter())[k] += 1
        for r, ks in by_reason.items():
            out.append(f"  skipped {', '.join(f'{k}' + (f' x{n}' if n > 1 else '') for k, n in ks.items())}: {r}")
        return out

    def __str__(self):
        return "\n".join(self.lines())

    def as_dict(self) -> dict:
        d = {"patched": self.counts(), "skipped": [{"kernel": k, "module": m, "reason": r} for k, m, r in self.skipped]}
        if self.graphs is not None:
            g = self.graphs
            d["cuda_graphs"] = g.as_dict()     # captures, calls, mode, failures, the attention inside and why
        return d


# ------------------------------------------------------------------------------------------------------ LoRA reading


def _peft_lora_types():
    try:
        from peft.tuners.lora.layer import LoraLayer
        return LoraLayer
    except Exception:  # noqa: BLE001
        return None


def lora_problem(m: nn.Module) -> str | None:
    "Why this module cannot run through the fused LoRA functions, or None when it can."
    LoraLayer = _peft_lora_types()
    if LoraLayer is None or not isinstance(m, LoraLayer):
        return "not a peft LoRA layer"
    names = list(m.active_adapters)
    if len(names) != 1:
        return f"{len(names)} active adapters (the fused functions take one)"
    a = names[0]
    if a not in m.lora_A:
        return f"adapter {a!r} is not on this layer"
    if getattr(m, "use_dora", {}).get(a):
        return "DoRA"
    if getattr(m, "lora_variant", {}).get(a) is not None:
        return f"LoRA variant {type(m.lora_variant[a]).__name__}"
    if getattr(m, "lora_bias", {}).get(a):
        return "lora_bias"
    if getattr(m, "fan_in_fan_out", False):
        return "fan_in_fan_out"
    if not isinstance(m.lora_A[a], nn.Linear) or m.lora_A[a].bias is not None or m.lora_B[a].bias is not None:
        return "LoRA A/B are not bias-free linears"
    drop = m.lora_dropout[a]
    if not isinstance(drop, (nn.Dropout, nn.Identity)):
        return f"dropout module {type(drop).__name__}"
    base = m.get_base_layer()
    cls = type(base).__name__
    if cls == "Linear4bit":
        qs = getattr(base.weight, "quant_state", None)
        if qs is None or getattr(qs, "quant_type", "nf4") != "nf4":
            return f"4-bit base layer with quant_type {getattr(qs, 'quant_type', None)} (the kernel dequantizes NF4)"
    elif cls == "Linear8bitLt":
        return "8-bit base layer"
    elif type(base) is not nn.Linear:
        return f"base layer {cls}"
    return None


def _live(m: nn.Module) -> bool:
    "At call time: the adapter is on, unmerged and still the single active one."
    return not m.disable_adapters and not m.merged and len(m.active_adapters) == 1 and m.active_adapters[0] in m.lora_A


def lora_proj_of(m: nn.Module) -> LoRAProj:
    a = m.active_adapters[0]
    base = m.get_base_layer()
    w = base.weight
    qs = getattr(w, "quant_state", None) if type(base).__name__ == "Linear4bit" else None
    drop = m.lora_dropout[a]
    return LoRAProj(weight=w, quant_state=qs, bias=base.bias, A=m.lora_A[a].weight, B=m.lora_B[a].weight,
                    s=float(m.scaling[a]), p=float(drop.p) if isinstance(drop, nn.Dropout) else 0.0,
                    dropout=drop if isinstance(drop, nn.Dropout) else None)


def _dtype_ok(m: nn.Module, x: torch.Tensor) -> bool:
    "The input dtype matches the base weight's compute dtype, or autocast decides the dtype."
    try:
        if torch.is_autocast_enabled(x.device.type):
            return True
    except (TypeError, RuntimeError):
        pass
    base = m.get_base_layer()
    qs = getattr(base.weight, "quant_state", None)
    wdt = qs.dtype if qs is not None and type(base).__name__ == "Linear4bit" else base.weight.dtype
    return x.dtype == wdt


# ------------------------------------------------------------------------------------------------ patched forwards


def _orig(module):
    "The forward that ran before ftkit patched this module."
    prev = module.__dict__.get("_ftkit_prev_forward")
    return prev if prev is not None else type(module).forward.__get__(module)


def _lora_linear_forward(self, x, *args, **kwargs):
    if args or kwargs or not _live(self) or not _dtype_ok(self, x):
        return _orig(self)(x, *args, **kwargs)
    P = lora_proj_of(self)
    return lora_projections(x, [P])[0]


def _rms_forward(self, x):
    eps = getattr(self, "variance_epsilon", None)
    eps = self.eps if eps is None else eps
    return _rms.rms_norm(x, self.weight, eps, self._ftkit_offset)


def _glu_mlp_forward(self, x):
    if hasattr(self, "gate_up_proj"):
        gu = self.gate_up_proj(x)
        g, u = gu.chunk(2, dim=-1)
    else:
        g, u = self.gate_proj(x), self.up_proj(x)
    return self.down_proj(_glu.glu(g, u, self._ftkit_act))


def _mlp_projs(self):
    return [self.gate_up_proj] if hasattr(self, "gate_up_proj") else [self.gate_proj, self.up_proj]


def _lora_mlp_forward(self, x):
    ins = _mlp_projs(self)
    mods = [*ins, self.down_proj]
    if not all(_live(m) for m in mods) or not _dtype_ok(mods[0], x):
        return _orig(self)(x)
    return lora_mlp(x, [lora_proj_of(m) for m in ins], lora_proj_of(self.down_proj), self._ftkit_act)


def _qkv(self, hidden_states, fuse_qkv: bool):
    "q, k, v as (B, T, H, D): the q/k/v LoRA projections in one node (or each its own forward), then Qwen3's q/k norms."
    D = self.head_dim
    if fuse_qkv:
        q, k, v = lora_projections(hidden_states, [lora_proj_of(getattr(self, p)) for p in ("q_proj", "k_proj", "v_proj")])
    else:
        q, k, v = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
    q, k, v = (t.view(*hidden_states.shape[:-1], -1, D) for t in (q, k, v))
    if self._ftkit_qk_norm:
        q, k = self.q_norm(q), self.k_norm(k)
    return q, k, v


def _rotate(q, k, cos, sin):
    "RoPE in place on (B, T, H, D) q/k; a view (of a projection output) is copied first, so the view is not rotated."
    if q._base is not None:
        q, k = q.contiguous().clone(), k.contiguous().clone()
    return _rope.rope_(q, k, cos, sin)


def _qkv_rope(self, hidden_states, cos, sin):
    """The graphed pieces' q/k/v (kernels/graphs.py): fused projections and RoPE in place, as (B, T, H, D). Set on an
    attention module only where both are patched (its `_ftkit_qkv_rope`)."""
    q, k, v = _qkv(self, hidden_states, True)
    return (*_rotate(q, k, cos, sin), v)


def _graph_attention(layer, q, k, v, kwargs: dict):
    "The eager attention between two graphed pieces: the model's attention function on (B, T, H, D) q/k/v."
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    a = layer.self_attn
    fn = ALL_ATTENTION_FUNCTIONS.get_interface(a.config._attn_implementation, None)
    out, _ = fn(a, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, dropout=0.0, scaling=a.scaling, **kwargs)
    return out.reshape(*q.shape[:2], -1).contiguous()


def _attention_forward(self, hidden_states, *args, **kwargs):
    """transformers' Llama-family attention (llama, mistral, qwen2, qwen3) with the q/k/v LoRA projections in one node
    and RoPE in place. Generation (a cache) and unexpected calls go to the original forward."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    pe = kwargs.get("position_embeddings")
    fuse_qkv = self._ftkit_qkv and all(_live(getattr(self, p)) for p in ("q_proj", "k_proj", "v_proj")) and \
        _dtype_ok(self.q_proj, hidden_states)
    if args or cache is not None or pe is None or not (fuse_qkv or self._ftkit_rope):
        return _orig(self)(hidden_states, *args, **kwargs)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    kwargs = dict(kwargs)
    kwargs.pop("position_embeddings")
    attention_mask = kwargs.pop("attention_mask", None)
    for k in ("cache", "past_key_values", "use_cache"):
        kwargs.pop(k, None)
    input_shape = hidden_states.shape[:-1]
    cos, sin = pe
    q, k, v = _qkv(self, hidden_states, fuse_qkv)
    if self._ftkit_rope and q.dim() == 4 and q.is_contiguous() and k.is_contiguous():
        q, k = _rotate(q, k, cos, sin)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    else:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)

        def rot(x):
            x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
            return torch.cat((-x2, x1), dim=-1)
        q, k = q * c + rot(q) * s, k * c + rot(k) * s
    v = v.transpose(1, 2)
    from transformers.models.llama.modeling_llama import eager_attention_forward
    attn = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    extra = {}
    if self._ftkit_sliding is not None:
        extra["sliding_window"] = self._ftkit_sliding
    out, weights = attn(self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
                        scaling=self.scaling, **extra, **kwargs)
    out = out.reshape(*input_shape, -1).contiguous()
    return self.o_proj(out), weights


_LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")
_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
_GRAPHABLE_KWARGS = {"input_ids", "position_ids", "attention_mask", "use_cache", "return_dict", *_VARLEN_KWARGS}


def _graphable(args, kwargs) -> bool:
    "A packed training call the graphed pieces can take: ids and positions, no mask, nothing else asked for."
    given = {k for k, v in kwargs.items() if v is not None and v is not False}   # PEFT's forward passes its Nones on
    return not args and kwargs.get("input_ids") is not None and kwargs.get("position_ids") is not None and \
        kwargs.get("attention_mask") is None and not kwargs.get("use_cache") and given <= _GRAPHABLE_KWARGS


def _causal_lm_forward(self, *args, labels=None, logits_to_keep=0, **kwargs):
    """The CausalLM forward with the LM head and the loss fused (chunked), used while training with labels.
    Returns no logits. Other calls (eval, generation, no labels) go to the original forward."""
    shift = kwargs.get("shift_labels")
    use = self.training and (labels is not None or shift is not None) and torch.is_grad_enabled() and \
        not kwargs.get("return_dict") is False and not (isinstance(logits_to_keep, int) and logits_to_keep != 0)
    if not use:
        return _orig(self)(*args, labels=labels, logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast
    num_items = kwargs.pop("num_items_in_batch", None)
    kwargs.pop("shift_labels", None)
    ignore = kwargs.pop("ignore_index", -100)
    out = None
    graphs = self.__dict__.get("_ftkit_graphs")
    if graphs is not None and _graphable(args, kwargs) and graphs.ready():
        kw = {k: kwargs[k] for k in (*_VARLEN_KWARGS, "position_ids") if k in kwargs}
        h = graphs(kwargs["input_ids"], kwargs["position_ids"], _graph_attention, kw)
    else:
        out = self.model(*args, **kwargs)
        h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if torch.is_tensor(logits_to_keep):
        h = h[:, logits_to_keep]
    if shift is None:
        shift = nn.functional.pad(labels, (0, 1), value=ignore)[..., 1:]
    head = self.lm_head
    cap = getattr(self.config, self._ftkit_softcap, None) if self._ftkit_softcap else None
    loss = _flce.linear_cross_entropy(h, head.weight, shift.to(h.device), head.bias, ignore_index=ignore, softcap=cap,
                                      reduction="sum")
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    else:
        loss = loss / (shift != ignore).sum()
    res = CausalLMOutputWithPast(loss=loss, logits=None)
    for k in ("hidden_states", "attentions"):
        if out is not None and getattr(out, k, None) is not None:
            setattr(res, k, getattr(out, k))
    return res


def _offload_forward(self, *args, **kwargs):
    if not (self.training and torch.is_grad_enabled()):
        return self._ftkit_inner_forward(*args, **kwargs)
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        return self._ftkit_inner_forward(*args, **kwargs)


# -------------------------------------------------------------------------------------------------------- the step


def _unwrap(model):
    m = model
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return m


def _decoder(clm):
    inner = getattr(clm, "model", None)
    if inner is None:
        return None
    if hasattr(inner, "layers"):
        return inner
    lm = getattr(inner, "language_model", None)
    return lm if lm is not None and hasattr(lm, "layers") else None


def _act_name(mlp) -> str | None:
    """The MLP's activation, identified by what it computes: the module is run on a probe and compared bit for bit
    with each kernel's activation (so gelu_new or a custom activation is never taken for an exact one)."""
    act = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)
    if act is None:
        return None
    import torch.nn.functional as F
    probe = torch.linspace(-10, 10, 2001, dtype=torch.float32)
    refs = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
    try:
        with torch.no_grad():
            got = act(probe)
    except Exception:  # noqa: BLE001
        return None
    for name, ref in refs.items():
        if torch.equal(got, ref(probe)):
            return name
    return None


def _distributed_reason(cfg) -> str | None:
    if cfg is None:
        return None
    if getattr(cfg, "fsdp", None) or getattr(cfg, "fsdp_config", None):
        return "FSDP shards the weights, and the fused functions read whole weights"
    ds = getattr(cfg, "deepspeed", None)
    if ds and "3" in str(ds):
        return "DeepSpeed ZeRO-3 shards the weights"
    return None


def apply_kernels(model, cfg=None, *, enable: dict[str, bool] | None = None, interpret: bool = False,
                  graphs: bool | None = None) -> KernelReport:
    """Swap ftkit's kernels into `model` (a transformers CausalLM or a peft model around one) where they are exact.

    `cfg` (a FinetuneConfig) switches single kernels (see KERNEL_KEYS); `enable` overrides per kernel. `graphs`:
    attach CUDA graphs (`ftkit.config.graphs_on(cfg)` when training; None reads `cfg.cuda_graphs is True`). Kernels go
    onto CUDA models; `interpret=True` also patches a CPU model when TRITON_INTERPRET=1 (tests). A report left on
    the model by an earlier call is undone first. Returns a KernelReport (also `model.ftkit_kernels`);
    `report.undo()` restores the model."""
    prev = getattr(model, "ftkit_kernels", None)
    if isinstance(prev, KernelReport):
        prev.undo()
    rep = KernelReport()
    model.ftkit_kernels = rep
    on = switches(cfg)
    if enable:
        on.update(enable)
    clm = _unwrap(model)
    mt = getattr(getattr(clm, "config", None), "model_type", None)
    arch = ARCHS.get(mt)
    kernels = [k for k in on if k != "offload"]
    for k in kernels:
        if not on[k]:
            rep.skip(k, "*", f"switched off by {' / '.join(KERNEL_KEYS[k])}: false")
    wanted = [k for k in kernels if on[k]]
    param = next(iter(clm.parameters()), None)
    reason = None
    if arch is None:
        reason = f"model_type {mt!r} is not in ftkit's kernel registry (covered: {', '.join(ARCHS)})"
    elif param is None or not triton_ok(param) or (not param.is_cuda and not interpret):
        reason = "the model is not on a CUDA GPU (Triton kernels run there; CPU tests use TRITON_INTERPRET=1)"
    else:
        reason = _distributed_reason(cfg)
        if reason is None and cfg is not None and getattr(cfg, "torch_compile", None) is True:
            reason = ("torch_compile: true — the kernels' autograd functions have not been verified under "
                      "torch.compile yet, so the compiled model keeps transformers' modules")
    if reason:
        for k in wanted + (["cuda_graphs"] if cfg is not None and getattr(cfg, "cuda_graphs", None) is True else []):
            rep.skip(k, "*", reason)
        _maybe_offload(rep, clm, on)
        return rep
    dec = _decoder(clm)
    if dec is None:
        for k in wanted:
            rep.skip(k, "*", "no decoder layers found (model.model.layers)")
        _maybe_offload(rep, clm, on)
        return rep
    cfgm = clm.config
    for i, layer in enumerate(dec.layers):
        _patch_layer(rep, on, arch, cfgm, f"layers.{i}", layer)
    if on["rms_norm"]:
        for name, mod in [("norm", getattr(dec, "norm", None))]:
            if mod is not None:
                _patch_norm(rep, arch, name, mod)
    if on["fused_linear_ce"]:
        _patch_head(rep, arch, clm, cfg)
    _maybe_offload(rep, clm, on)
    want_graphs = graphs if graphs is not None else getattr(cfg, "cuda_graphs", None) is True
    if want_graphs:
        _attach_graphs(rep, clm, dec, cfg, interpret)
    return rep


def _attach_graphs(rep, clm, dec, cfg, interpret: bool):
    "cuda_graphs: true — the decoder's pieces on the CausalLM (`clm._ftkit_graphs`), captured on a CUDA model's first step."
    why = _graphs.reason_not(clm, cfg, need_cuda=not interpret)
    if why is None and clm.__dict__.get("_ftkit_kernel") == "offload":
        why = "activation offloading moves saved tensors from Python hooks"
    if why is None and clm.__dict__.get("_ftkit_kernel") != "fused_linear_ce":
        why = "the LM head is not ftkit's fused cross-entropy (the pieces run inside its forward)"
    if why is not None:
        rep.skip("cuda_graphs", "model", why)
        return
    loras = [m for m in dec.layers.modules() if hasattr(m, "lora_A") and hasattr(m, "merged")]
    clm._ftkit_graphs = rep.graphs = _graphs.PiecewiseGraphs(dec, capture=next(clm.parameters()).is_cuda,
                                                             ready=lambda: all(_live(m) for m in loras),
                                                             attention=getattr(cfg, "cuda_graph_attention", None) or "auto")
    rep.patched.append(("cuda_graphs", "model"))


def _maybe_offload(rep, clm, on):
    if not on.get("offload"):
        return
    clm._ftkit_inner_forward = clm.forward
    rep.patch("offload", type(clm).__name__, clm, _offload_forward)


def _patch_norm(rep, arch, name, mod):
    if not type(mod).__name__.endswith("RMSNorm") or getattr(mod, "weight", None) is None:
        rep.skip("rms_norm", name, f"{type(mod).__name__} is not an RMSNorm with a weight")
        return
    if getattr(mod, "variance_epsilon", getattr(mod, "eps", None)) is None:
        rep.skip("rms_norm", name, "no eps attribute")
        return
    mod._ftkit_offset = arch.norm_offset
    rep.patch("rms_norm", name, mod, _rms_forward)


def _patch_layer(rep, on, arch, cfgm, lname, layer):
    # norms
    if on["rms_norm"]:
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm"):
            mod = getattr(layer, n, None)
            if mod is not None:
                _patch_norm(rep, arch, f"{lname}.{n}", mod)
        attn = getattr(layer, "self_attn", None)
        for n in ("q_norm", "k_norm"):
            mod = getattr(attn, n, None)
            if mod is not None:
                _patch_norm(rep, arch, f"{lname}.self_attn.{n}", mod)
    # MLP
    mlp = getattr(layer, "mlp", None)
    if mlp is not None:
        _patch_mlp(rep, on, f"{lname}.mlp", mlp)
    # attention
    attn = getattr(layer, "self_attn", None)
    if attn is not None:
        _patch_attention(rep, on, arch, cfgm, f"{lname}.self_attn", attn)


def _patch_mlp(rep, on, name, mlp):
    fused = hasattr(mlp, "gate_up_proj")
    if not fused and not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
        for k in ("lora_mlp", "glu"):
            if on[k]:
                rep.skip(k, name, f"{type(mlp).__name__} has no gate/up/down projections")
        return
    act = _act_name(mlp)
    mods = _mlp_projs(mlp) + [mlp.down_proj]
    problems = [lora_problem(m) for m in mods]
    if act is None:
        a = getattr(mlp, "act_fn", getattr(mlp, "activation_fn", None))
        why = f"activation {type(a).__name__} has no exact kernel (kernels: {', '.join(_glu.ACTIVATIONS)})"
        for k in ("lora_mlp", "glu"):
            if on[k]:
                rep.skip(k, name, why)
        _patch_single_loras(rep, on, "lora_mlp", name, mlp,
                            (["gate_up_proj"] if fused else ["gate_proj", "up_proj"]) + ["down_proj"])
        return
    mlp._ftkit_act = act
    if on["lora_mlp"] and all(p is None for p in problems):
        rep.patch("lora_mlp", name, mlp, _lora_mlp_forward)
        return
    if on["lora_mlp"]:
        lora_any = any(p != "not a peft LoRA layer" for p in problems)
        if lora_any:
            bad = next(p for p in problems if p is not None)
            rep.skip("lora_mlp", name, f"a projection cannot be fused: {bad}")
    if on["glu"]:
        rep.patch("glu", name, mlp, _glu_mlp_forward)
    if on["lora_mlp"]:
        _patch_single_loras(rep, on, "lora_mlp", name, mlp,
                            (["gate_up_proj"] if fused else ["gate_proj", "up_proj"]) + ["down_proj"])


def _patch_single_loras(rep, on, kernel, name, parent, projs):
    if not on[kernel]:
        return
    for p in projs:
        m = getattr(parent, p, None)
        if m is None:
            continue
        prob = lora_problem(m)
        if prob is None:
            rep.patch(kernel, f"{name}.{p}", m, _lora_linear_forward)
        elif prob != "not a peft LoRA layer":
            rep.skip(kernel, f"{name}.{p}", prob)


def _patch_attention(rep, on, arch, cfgm, name, attn):
    qkv_names = ["qkv_proj"] if hasattr(attn, "qkv_proj") else ["q_proj", "k_proj", "v_proj"]
    if on["lora_o"] and hasattr(attn, "o_proj"):
        _patch_single_loras(rep, on, "lora_o", name, attn, ["o_proj"])
    own = arch.own_attention and qkv_names == ["q_proj", "k_proj", "v_proj"] and hasattr(attn, "head_dim")
    fuse = False
    if on["lora_qkv"]:
        probs = [lora_problem(getattr(attn, p)) for p in qkv_names]
        if own and all(p is None for p in probs):
            fuse = True
        else:
            if own and any(p is not None and p != "not a peft LoRA layer" for p in probs):
                rep.skip("lora_qkv", name, "q/k/v not fused: " + next(p for p in probs if p is not None))
            _patch_single_loras(rep, on, "lora_qkv", name, attn, qkv_names)
    rope = on["rope"] and own
    if on["rope"] and not own:
        rep.skip("rope", name, f"{type(attn).__name__}: ftkit owns the attention forward only for llama, mistral, "
                               "qwen2 and qwen3 (transformers' RoPE stays)")
    if not (fuse or rope):
        return
    attn._ftkit_qkv, attn._ftkit_rope = fuse, rope
    attn._ftkit_qk_norm = arch.qk_norm and hasattr(attn, "q_norm")
    attn._ftkit_sliding = getattr(attn, "sliding_window", None) if hasattr(attn, "sliding_window") else \
        getattr(cfgm, "sliding_window", None) if cfgm.model_type == "mistral" else None
    rep.patch("lora_qkv" if fuse else "rope", name, attn, _attention_forward)
    if fuse and rope:
        attn._ftkit_qkv_rope = types.MethodType(_qkv_rope, attn)
        rep.patched.append(("rope", name))


def _patch_head(rep, arch, clm, cfg=None):
    head = getattr(clm, "lm_head", None)
    name = "lm_head"
    if cfg is not None and getattr(cfg, "kd_trainer", None):
        rep.skip("fused_linear_ce", name, "kd_trainer: true — the distillation loss reads the logits at every position, "
                                          "which the fused cross-entropy never builds")
        return
    if head is None or type(head) is not nn.Linear:
        rep.skip("fused_linear_ce", name, f"the LM head is {type(head).__name__}, not a plain Linear "
                                          "(e.g. a LoRA or modules_to_save head)")
        return
    for attr in ("logit_scale", "logits_scaling"):
        if getattr(clm.config, attr, None) not in (None, 1, 1.0):
            rep.skip("fused_linear_ce", name, f"config.{attr} rescales the logits")
            return
    clm._ftkit_softcap = arch.softcap_attr
    rep.patch("fused_linear_ce", name, clm, _causal_lm_forward)
