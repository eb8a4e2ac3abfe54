"""Experiment (issue 10): how much of the 4k LoRA step's CPU overhead do piecewise CUDA graphs remove?

At 4,096-token rows the patched LoRA step is CPU-bound on an H200 (kernels_e2e_profile_H200.txt: ~400 ms of GPU
kernel time against ~1.05 s of CPU time for two optimizer steps; ~2,700 kernel launches per micro-batch). This script
measures forward + backward of one packed micro-batch of the Llama-3.2-1B-shaped model (random weights, bf16, LoRA r16
on all 7 linears, ftkit's kernels applied) three ways, on the same rows:

  hf       the patched model's own forward (what `ftkit train` runs today)
  pieces   the same computation split at attention: per layer, "post-attention of layer l + pre-attention of layer
           l+1" as one callable (o_proj + residual + norm + LoRA MLP + residual + norm + fused QKV + RoPE), and the
           varlen attention call between callables (its segment layout changes with every packed row)
  graphed  `pieces` with every callable captured once by torch.cuda.make_graphed_callables (forward and backward
           graphs, one shared memory pool); attention, embedding, final norm and the fused cross-entropy stay eager

It checks that `pieces` reproduces `hf` (loss, LoRA gradients) and that `graphed` reproduces `pieces`, then prints
and writes (--out, JSON) milliseconds per micro-batch, tokens/s of forward + backward and peak memory for each.
This is a measurement of the idea, not the trainer: nothing in ftkit uses it yet.

    python benchmarks/exp_graphs.py --out $OUT/graphs.json                  # on the GPU
    TRITON_INTERPRET=1 python benchmarks/exp_graphs.py --tiny --out /tmp/g.json   # CPU: checks hf == pieces only
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(tiny: bool, device: str):
    "The patched LoRA model (kernels applied) and its inner decoder."
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from bench_train import llama_1b
    from ftkit.kernels.patch import apply_kernels
    from ftkit.packing import register_varlen_attention
    register_varlen_attention()
    torch.manual_seed(0)
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    m = AutoModelForCausalLM.from_config(llama_1b(tiny), dtype=dt, attn_implementation="ftkit_varlen").to(device)
    m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    for n, p in m.named_parameters():          # B = 0 would make every LoRA gradient of A zero: give B values
        if "lora_B" in n:
            nn.init.normal_(p, std=0.02)
    m.train()
    rep = apply_kernels(m, None, interpret=device != "cuda")
    print("kernels:", ", ".join(f"{k} x{v}" for k, v in rep.counts().items()), flush=True)
    return m


def packed_row(T: int, vocab: int, seed: int, device: str):
    "One packed row: lognormal document lengths (median 256, sigma 0.9, in [32, T]), restarting positions."
    g = torch.Generator().manual_seed(seed)
    lens, total = [], 0
    while total < T:
        n = int(torch.empty(1).log_normal_(mean=float(torch.tensor(256.0).log()), std=0.9, generator=g).clamp(32, T))
        n = min(n, T - total)
        lens.append(n)
        total += n
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    ids = torch.randint(0, vocab, (1, T), generator=g)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    labels = ids.clone()
    labels[0, cu[:-1].long()] = -100                 # no target across a document start
    return dict(input_ids=ids.to(device), position_ids=pos.to(device), labels=labels.to(device),
                cu_seq_lens_q=cu.to(device), cu_seq_lens_k=cu.to(device), max_length_q=max(lens), max_length_k=max(lens))


class _Piece(nn.Module):
    "Post-attention of layer `post` (if any) then pre-attention of layer `pre` (if any)."

    def __init__(self, post, pre):
        super().__init__()
        self.post, self.pre = post, pre

    def forward(self, *args):
        from ftkit.kernels import rope as _rope
        from ftkit.kernels.lora_proj import lora_projections
        from ftkit.kernels.patch import lora_proj_of
        if self.post is not None:
            o, h, cos, sin = args
            h = h + self.post.self_attn.o_proj(o)
            h = h + self.post.mlp(self.post.post_attention_layernorm(h))
        else:
            h, cos, sin = args
        if self.pre is None:
            return h
        a = self.pre.self_attn
        x = self.pre.input_layernorm(h)
        q, k, v = lora_projections(x, [lora_proj_of(getattr(a, p)) for p in ("q_proj", "k_proj", "v_proj")])
        B, T = x.shape[:2]
        D = a.head_dim
        q, k, v = q.view(B, T, -1, D), k.view(B, T, -1, D), v.view(B, T, -1, D)
        if q._base is not None:
            q, k = q.contiguous().clone(), k.contiguous().clone()
        q, k = _rope.rope_(q, k, cos, sin)
        return h, q, k, v.contiguous()


def pieces_of(inner) -> list:
    layers = list(inner.layers)
    return [_Piece(None, layers[0])] + [_Piece(layers[i], layers[i + 1] if i + 1 < len(layers) else None)
                                        for i in range(len(layers))]


def attend(layer, q, k, v, batch):
    "ftkit's varlen attention on (B, T, H, D) q/k/v; returns (B, T, H*D)."
    from ftkit.packing import varlen_attention_forward
    a = layer.self_attn
    out, _ = varlen_attention_forward(a, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, scaling=a.scaling,
                                      cu_seq_lens_q=batch["cu_seq_lens_q"], max_length_q=batch["max_length_q"])
    B, T = q.shape[:2]
    return out.reshape(B, T, -1)


def loss_of_pieces(model, fns, batch):
    "Forward through the pieces (graphed or not) and the fused cross-entropy: the mean loss over trained tokens."
    from ftkit.kernels.flce import linear_cross_entropy
    clm = model.get_base_model()
    inner = clm.model
    h = inner.embed_tokens(batch["input_ids"])
    cos, sin = inner.rotary_emb(h, batch["position_ids"])
    layers = list(inner.layers)
    h, q, k, v = fns[0](h, cos, sin)
    for i, layer in enumerate(layers):
        o = attend(layer, q, k, v, batch)
        out = fns[i + 1](o, h, cos, sin)
        if i + 1 < len(layers):
            h, q, k, v = out
        else:
            h = out
    h = inner.norm(h)
    shift = nn.functional.pad(batch["labels"], (0, 1), value=-100)[..., 1:]
    loss = linear_cross_entropy(h, clm.lm_head.weight, shift, None, reduction="sum")
    return loss / (shift != -100).sum()


def loss_of_hf(model, batch):
    return model(**batch).loss


def lora_grads(model):
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def step(model, fn):
    for p in model.parameters():
        p.grad = None
    loss = fn()
    loss.backward()
    return loss.detach().float()


def compare(a, b):
    "Largest relative difference over LoRA gradients (norm of the difference / norm of the reference), per tensor."
    return max(float((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-12)) for n in b)


def timed(model, fn, batches, warmup, iters, cuda):
    for i in range(warmup):
        step(model, lambda: fn(batches[i % len(batches)]))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(iters):
        step(model, lambda: fn(batches[i % len(batches)]))
    if cuda:
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / iters * 1e3
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
    return ms, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=4, help="different packed rows cycled through (different layouts)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    cuda = torch.cuda.is_available() and not a.tiny
    device = "cuda" if cuda else "cpu"
    seq = a.seq if not a.tiny else 96
    model = build(a.tiny, device)
    inner = model.get_base_model().model
    vocab = model.get_base_model().config.vocab_size
    batches = [packed_row(seq, vocab, s, device) for s in range(a.rows)]
    pieces = pieces_of(inner)
    res = {"seq": seq, "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "layers": len(pieces) - 1, "rows": a.rows, "docs_per_row": [int(b["cu_seq_lens_q"].numel() - 1) for b in batches]}

    l_hf = step(model, lambda: loss_of_hf(model, batches[0]))
    g_hf = lora_grads(model)
    l_pc = step(model, lambda: loss_of_pieces(model, pieces, batches[0]))
    g_pc = lora_grads(model)
    res["check_pieces_vs_hf"] = {"loss": [float(l_hf), float(l_pc)], "max_rel_grad_diff": compare(g_pc, g_hf)}
    print("pieces vs hf:", res["check_pieces_vs_hf"], flush=True)
    if not cuda:
        Path(a.out).write_text(json.dumps(res, indent=1))
        return

    for name, fn in (("hf", lambda b: loss_of_hf(model, b)), ("pieces", lambda b: loss_of_pieces(model, pieces, b))):
        ms, peak = timed(model, fn, batches, a.warmup, a.iters, cuda)
        res[name] = {"ms_per_microbatch": round(ms, 2), "tokens_per_s": round(seq / ms * 1e3), "peak_gib": round(peak, 2)}
        print(name, res[name], flush=True)

    # capture: sample inputs with the shapes and requires_grad of the real calls
    b0 = batches[0]
    with torch.no_grad():
        h0 = inner.embed_tokens(b0["input_ids"])
        cos, sin = inner.rotary_emb(h0, b0["position_ids"])
    B, T, d = h0.shape
    a0 = inner.layers[0].self_attn
    nq, nkv = a0.config.num_attention_heads, a0.config.num_key_value_heads
    o = torch.randn(B, T, nq * a0.head_dim, device=device, dtype=h0.dtype, requires_grad=True)
    hs = torch.randn(B, T, d, device=device, dtype=h0.dtype, requires_grad=True)
    samples = [(h0.clone(), cos.clone(), sin.clone())] + [(o.detach().clone().requires_grad_(), hs.detach().clone().requires_grad_(),
                                                            cos.clone(), sin.clone()) for _ in pieces[1:]]
    t0 = time.perf_counter()
    graphed = torch.cuda.make_graphed_callables(tuple(pieces), tuple(samples), num_warmup_iters=3, allow_unused_input=True)
    torch.cuda.synchronize()
    res["capture_s"] = round(time.perf_counter() - t0, 2)
    l_gr = step(model, lambda: loss_of_pieces(model, graphed, batches[0]))
    g_gr = lora_grads(model)
    l_pc = step(model, lambda: loss_of_pieces(model, pieces, batches[0]))
    g_pc = lora_grads(model)
    res["check_graphed_vs_pieces"] = {"loss": [float(l_pc), float(l_gr)], "max_rel_grad_diff": compare(g_gr, g_pc)}
    print("graphed vs pieces:", res["check_graphed_vs_pieces"], flush=True)
    ms, peak = timed(model, lambda b: loss_of_pieces(model, graphed, b), batches, a.warmup, a.iters, cuda)
    res["graphed"] = {"ms_per_microbatch": round(ms, 2), "tokens_per_s": round(seq / ms * 1e3), "peak_gib": round(peak, 2)}
    print("graphed", res["graphed"], flush=True)
    res["speedup_graphed_vs_hf"] = round(res["hf"]["ms_per_microbatch"] / res["graphed"]["ms_per_microbatch"], 2)
    print("graphed vs hf:", res["speedup_graphed_vs_hf"], "x", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
