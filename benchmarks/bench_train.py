"""End-to-end training throughput of ftkit (stack "F"), comparable with ../shared/bench (TRL B0, TRL + Liger B1).

Default workload = the shared baseline's: a Llama-3.2-1B-shaped model with random weights in bf16, synthetic documents
(lognormal lengths, median 256, sigma 0.9, clipped to [32, seq], random ids, the same generator and seed as
bench_baseline.py, so the same documents), packed into rows of --seq tokens (4096), micro-batch 1 x grad-accum 4,
LoRA r=16 alpha=32 dropout 0 on q,k,v,o,gate,up,down, fused AdamW lr 1e-4 constant, no gradient checkpointing.
Everything goes through `ftkit.train.train` (multipack sampler, packed collator, ftkit_varlen attention).

Prints and writes (JSON, --out) real tokens/s, peak GiB, MFU (F = 4 N_lin + 6 N_lora + A, A from the per-batch
sum of squared document lengths), and the packing efficiency. `--compare DIR` prints ratios to B0/B1 JSON files there.

    python benchmarks/bench_train.py --out $OUT/F.json [--compare $OUT]          # on the GPU
    python benchmarks/bench_train.py --tiny --out /tmp/F.json                     # CPU smoke test
    python benchmarks/bench_train.py --config my.yml --out F.json                 # any ftkit config (its own data)
"""
import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

P_MEASURED, P_DATASHEET = 790e12, 989e12
KERNEL_KEYS = ["lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "chunked_cross_entropy", "liger_rope",
               "liger_rms_norm", "liger_glu_activation", "liger_fused_linear_cross_entropy", "cut_cross_entropy"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", help="an ftkit config to benchmark instead of the synthetic Llama-1B workload")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--timed", type=int, default=20)
    ap.add_argument("--ga", type=int, default=4)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--median", type=float, default=256)
    ap.add_argument("--sigma", type=float, default=0.9)
    ap.add_argument("--min_len", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--attn", default="ftkit_varlen", help="attn_implementation (ftkit_varlen, sdpa, flex_attention)")
    ap.add_argument("--mode", default="lora", choices=["lora", "qlora", "full"])
    ap.add_argument("--kernels", default="on", choices=["on", "off"],
                    help="off: every kernel key false (lora_*_kernel, liger_*, cut/chunked_cross_entropy)")
    ap.add_argument("--gc", action="store_true", help="gradient_checkpointing: true")
    ap.add_argument("--graphs", action="store_true", help="cuda_graphs: true (with pad_to_sequence_len: true, which it needs)")
    ap.add_argument("--pad", action="store_true", help="pad_to_sequence_len: true (the default with packing since 2026-11-30)")
    ap.add_argument("--no-graphs", action="store_true", help="cuda_graphs: false (unset, it is on where the config allows)")
    ap.add_argument("--graph-attention", choices=["auto", "triton", "flash"], help="cuda_graph_attention (unset: auto)")
    ap.add_argument("--no-pad", action="store_true", help="pad_to_sequence_len: false (rows of varying length; no graphs)")
    ap.add_argument("--sync-every-step", action="store_true",
                    help="torch.cuda.synchronize() at every step end (as ../shared/bench's harness); default: only at the two "
                         "ends of the timed window, so the steps between run as in a real run")
    ap.add_argument("--log-sync", action="store_true", help="FtkitTrainer.log_without_sync = False (transformers' logging read)")
    ap.add_argument("--profile", help="write a torch.profiler table of two optimizer steps (after the timed ones) here")
    ap.add_argument("--trace", help="with --profile: also write the profiled steps' Chrome trace here (gzipped JSON)")
    ap.add_argument("--stack", default="F", help="name in the JSON (F, F-off, F-16k, ...)")
    ap.add_argument("--compare", help="folder with B0.json / B1.json from ../shared/bench to print ratios")
    a = ap.parse_args()
    if a.tiny:
        a.seq, a.median, a.min_len = min(a.seq, 256), 48, 8
    return a


def llama_1b(tiny):
    from transformers import LlamaConfig
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 4.0,
            "low_freq_factor": 1.0, "original_max_position_embeddings": 8192}
    common = dict(hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                  rope_parameters=rope, bos_token_id=128000, eos_token_id=128001, use_cache=False,
                  attention_bias=False, mlp_bias=False)
    if tiny:
        common.update(bos_token_id=1, eos_token_id=2)
        return LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, **common)
    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=64, **common)


def flop_terms(cfg, r, mode):
    d, Fi, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    nq, nkv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    n_lin = L * (2 * d * nq * dh + 2 * d * nkv * dh + 3 * d * Fi) + d * V
    shapes = [(d, nq * dh), (d, nkv * dh), (d, nkv * dh), (nq * dh, d), (d, Fi), (d, Fi), (Fi, d)]
    n_lora = L * sum(r * (i + o) for i, o in shapes) if mode == "lora" else 0
    return n_lin, n_lora, 6 * L * nq * dh


def make_docs(a, vocab):
    "The same documents as ../shared/bench/bench_baseline.py (same generator, seed and stopping rule)."
    rng = np.random.default_rng(a.seed)
    hi = min(vocab, 128000)
    target = int(a.steps * a.ga * 1 * a.seq * 1.15)
    docs, total = [], 0
    while total < target or len(docs) < a.steps * a.ga:
        L = int(np.clip(np.rint(np.exp(math.log(a.median) + a.sigma * rng.standard_normal())), a.min_len, a.seq))
        docs.append(rng.integers(0, hi, size=L, dtype=np.int64).tolist())
        total += L
    return docs


class StubTok:
    pad_token_id, eos_token_id = 0, 2

    def save_pretrained(self, d):
        pass


def versions():
    v = {"torch": torch.__version__}
    for mod in ["transformers", "peft", "accelerate", "triton"]:
        try:
            v[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            v[mod] = f"n/a ({type(e).__name__})"
    v["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return v


def main():
    a = parse()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from ftkit.config import load as load_config
    from ftkit.models import apply_adapter
    from ftkit.packing import register_varlen_attention
    from ftkit.train import train

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rec = {"stack": a.stack, "args": vars(a), "versions": versions(), "ok": False}
    marks, losses, gnorms = {}, {}, {}
    try:
        register_varlen_attention()
        if a.config:
            cfg = load_config(a.config, {"max_steps": a.steps, "logging_steps": 1, "save_strategy": "no"})
            model = tok = data = None
            mcfg = None
        else:
            mcfg = llama_1b(a.tiny)
            docs = make_docs(a, mcfg.vocab_size)
            lens = np.array([len(d) for d in docs])
            rec["data"] = {"n_docs": len(docs), "tokens": int(lens.sum()), "median": float(np.median(lens))}
            data = (Dataset.from_dict({"input_ids": docs, "labels": docs}), None)
            cfg = load_config({
                "learning_rate": a.lr, "micro_batch_size": 1, "gradient_accumulation_steps": a.ga, "sequence_len": a.seq,
                "sample_packing": True, "max_steps": a.steps, "lr_scheduler": "constant", "warmup_steps": 0,
                "weight_decay": 0.0, "optimizer": "adamw_torch_fused", "bf16": True if cuda else False,
                "logging_steps": 1, "save_strategy": "no", "seed": a.seed, "output_dir": "/tmp/ftkit_bench_out",
                "attn_implementation": a.attn, "max_grad_norm": 1.0,
                **({"adapter": "qlora" if a.mode == "qlora" else "lora", "lora_r": 16, "lora_alpha": 32,
                    "lora_dropout": 0.0, "lora_target_modules": TARGETS} if a.mode in ("lora", "qlora") else {}),
                **({"load_in_4bit": True} if a.mode == "qlora" else {}),
                **({k: False for k in KERNEL_KEYS} if a.kernels == "off" else {}),
                **({"gradient_checkpointing": True} if a.gc else {}),
                **({"cuda_graphs": True, "pad_to_sequence_len": True} if a.graphs else {}),
                **({"pad_to_sequence_len": True} if a.pad else {}),
                **({"cuda_graphs": False} if a.no_graphs else {}),
                **({"cuda_graph_attention": a.graph_attention} if a.graph_attention else {}),
                **({"pad_to_sequence_len": False} if a.no_pad else {}),
                "datasets": [{"path": "synthetic", "type": "completion"}]})
            torch.manual_seed(a.seed)
            with torch.device("cuda" if cuda else "cpu"):
                model = AutoModelForCausalLM.from_config(mcfg, dtype=torch.bfloat16 if cuda else torch.float32,
                                                         attn_implementation=a.attn)
            if a.mode == "qlora":          # the same random weights, reloaded as NF4 with double quantization
                import tempfile
                from transformers import BitsAndBytesConfig
                d = tempfile.mkdtemp(prefix="ftkit_bench_q")
                model.save_pretrained(d)
                del model
                model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, attn_implementation=a.attn,
                                                             device_map={"": 0}, quantization_config=BitsAndBytesConfig(
                                                                 load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                 bnb_4bit_use_double_quant=True,
                                                                 bnb_4bit_compute_dtype=torch.bfloat16))
            model.config.use_cache = False
            model.ftkit_added_tokens = 0
            model = apply_adapter(cfg, model, quiet=True)
            tok = StubTok()
            rec["trainable_params"] = model.ftkit_trainable[0]
        state = {}

        class Timer(TrainerCallback):
            trainer = None                 # set by FtkitTrainer

            def on_train_begin(self, args, st, control, **kw):
                sync()
                marks[0] = (time.perf_counter(), 0)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()

            prof = None

            def on_step_begin(self, args, st, control, **kw):
                if a.profile and cuda and st.global_step == a.steps - 2 and self.prof is None:
                    from torch.profiler import ProfilerActivity, profile
                    self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                    self.prof.__enter__()

            def on_step_end(self, args, st, control, **kw):
                if a.sync_every_step or st.global_step in (a.warmup, a.warmup + a.timed) or self.prof is not None:
                    sync()             # the window's ends (and profiled steps): the marks between are not used
                marks[st.global_step] = (time.perf_counter(), self.trainer.ftkit_tokens)
                if self.prof is not None and st.global_step == a.steps:
                    self.prof.__exit__(None, None, None)
                    if a.trace:
                        import gzip
                        import tempfile
                        with tempfile.NamedTemporaryFile(suffix=".json") as tf:
                            self.prof.export_chrome_trace(tf.name)
                            Path(a.trace).write_bytes(gzip.compress(Path(tf.name).read_bytes()))
                    ka = self.prof.key_averages()
                    try:
                        gpu_table = ka.table(sort_by="device_time_total", row_limit=45, max_name_column_width=60)
                    except Exception:  # noqa: BLE001
                        gpu_table = ka.table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=60)
                    Path(a.profile).write_text(
                        "two optimizer steps (the last two), wall " + f"{marks[a.steps][0] - marks[a.steps - 2][0]:.3f} s\n"
                        + gpu_table + "\n" + ka.table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60))
                    self.prof = None

            def on_log(self, args, st, control, logs=None, **kw):
                if logs and "loss" in logs:
                    losses[st.global_step] = float(logs["loss"])
                if logs and "grad_norm" in logs:
                    gnorms[st.global_step] = float(logs["grad_norm"])

        timer = Timer()
        t0 = time.perf_counter()
        if a.log_sync:                      # this benchmark process only: transformers' logging read at every step
            from ftkit.train import FtkitTrainer
            FtkitTrainer.log_without_sync = False
        rec["timing"] = ("synchronize at every step end" if a.sync_every_step else
                         "synchronize at the two ends of the timed window only")
        res = train(cfg, data=data, model=model, tokenizer=tok, callbacks=[timer], quiet=False)
        rec["train_wall_s"] = time.perf_counter() - t0
        state["trainer"] = timer.trainer
        tr = state["trainer"]
        ga = tr.args.gradient_accumulation_steps
        s0, s1 = a.warmup, min(a.warmup + a.timed, max(marks))
        bins = tr.packing.sampler.batches(0) if tr.packing else None
        lens_all = np.array(tr.packing.sampler.lengths) if tr.packing else None

        def sumsq(step):   # sum of squared document lengths over the micro-batches of steps 1..step
            if bins is None:
                return 0
            return int(sum(int(lens_all[i]) ** 2 for b in bins[: step * ga] for i in b))

        (t_a, tok_a), (t_b, tok_b) = marks[s0], marks[s1]
        T, dt = tok_b - tok_a, t_b - t_a
        sq = sumsq(s1) - sumsq(s0)
        if mcfg is None:
            mcfg = (res.model.get_base_model() if hasattr(res.model, "get_base_model") else res.model).config
        n_lin, n_lora, a_coef = flop_terms(mcfg, 16, "lora" if getattr(cfg, "adapter", None) or a.mode != "full" else "full")
        A = a_coef * sq / max(T, 1)
        Fl = (4 * n_lin + 6 * n_lora + A) if a.mode != "full" else (6 * n_lin + A)
        kr = getattr(res.model, "ftkit_kernels", None) if res.model is not None else None
        rec["kernels"] = kr.as_dict() if kr is not None else None
        if rec["kernels"] and "cuda_graphs" in rec["kernels"]:
            print("cuda_graphs:", rec["kernels"]["cuda_graphs"])
        tps = T / dt
        steps = sorted(marks)
        rec.update({
            "N_lin": n_lin, "N_lora": n_lora, "timed_steps": [s0 + 1, s1], "timed_seconds": dt,
            "mean_step_s": dt / max(s1 - s0, 1), "real_tokens_timed": T, "real_tokens_per_step": T / max(s1 - s0, 1),
            "tokens_per_s": tps, "sumsq_over_T": sq / max(T, 1),
            "flops_per_token": {"4N_lin": 4 * n_lin, "6N_lora": 6 * n_lora, "A": A, "F": Fl},
            "achieved_tflops": tps * Fl / 1e12, "mfu_790": tps * Fl / P_MEASURED, "mfu_989": tps * Fl / P_DATASHEET,
            "packing_efficiency": tr.packing.efficiency if tr.packing else None,
            "loss_step1": losses.get(1), "loss_step20": losses.get(20),
            "losses": losses, "grad_norms": gnorms,
            "step_times_s": [marks[s][0] - marks[p][0] for p, s in zip(steps, steps[1:])],
            "marks": {int(k): [v[1], sumsq(k), None, v[0] - marks[0][0]] for k, v in sorted(marks.items())},
            "attn_implementation": a.attn,
        })
        if cuda:
            rec["peak_alloc_GiB"] = torch.cuda.max_memory_allocated() / 2**30
            rec["peak_reserved_GiB"] = torch.cuda.max_memory_reserved() / 2**30
        rec["ok"] = True
    except Exception as e:  # noqa: BLE001
        rec["error"] = f"{type(e).__name__}: {e}"
        rec["traceback"] = traceback.format_exc()[-4000:]
        print(rec["traceback"], flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rec, indent=1, default=str))
    keys = ["tokens_per_s", "mean_step_s", "real_tokens_per_step", "peak_alloc_GiB", "mfu_790", "mfu_989",
            "packing_efficiency", "loss_step1", "loss_step20", "sumsq_over_T", "train_wall_s"]
    print(f"[{a.stack}] RESULT " + json.dumps({k: rec.get(k) for k in keys}), flush=True)
    if a.compare and rec["ok"]:
        for s in ("B0", "B1", "B2"):
            p = Path(a.compare) / f"{s}.json"
            if p.exists():
                b = json.loads(p.read_text())
                if b.get("ok"):
                    print(f"[{a.stack} vs {s}] tokens/s x{rec['tokens_per_s'] / b['tokens_per_s']:.3f}  "
                          f"peak GiB x{rec.get('peak_alloc_GiB', float('nan')) / b.get('peak_alloc_GiB', float('nan')):.3f}  "
                          f"({rec['tokens_per_s']:,.0f} vs {b['tokens_per_s']:,.0f} tok/s, "
                          f"{rec.get('peak_alloc_GiB', 0):.2f} vs {b.get('peak_alloc_GiB', 0):.2f} GiB) on {rec['versions']['gpu']}")
    return 0 if rec["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
