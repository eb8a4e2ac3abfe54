#!/usr/bin/env python
"""Multi-GPU proof for ftkit: the same config on 1 and 2 GPUs, launched from the CLI and from a notebook,
plus FSDP2 and DeepSpeed ZeRO-2 runs that save a model which loads and generates.

Model: a Llama-shaped model with random weights built from a config (nothing is downloaded), with the
tokenizer folder given by --tokenizer (the SmolLM2 tokenizer saved by `ftkit.models`). Data: synthetic
chat rows of random words, long enough that packed rows are full. LoRA r16 on every linear layer,
sample packing into rows of --seq tokens, bf16.

  python benchmarks/multi_gpu.py --tokenizer DIR --out OUT [--steps 30] [--shape 1b|tiny] [--runs cli1,cli2,nb2,fsdp2,zero2]
  python benchmarks/multi_gpu.py --tokenizer DIR --out OUT --gpus 4 --runs allreduce,cli1,cliN,full1,fullN --steps 12 --warmup 4

Scaling runs (--gpus N, default 2): cliN = LoRA DDP on N GPUs (global batch kept: GA/N each), full1 / fullN = full
fine-tune on 1 GPU and FSDP2 on N GPUs, allreduce = NCCL all-reduce bus bandwidth between the N GPUs. OUT/scaling.json
and OUT/scaling.md hold tokens/s per GPU, scaling efficiency, memory per GPU and the paper estimate for 8 and 64 GPUs
(`estimate`: measured per-GPU throughput + gradient traffic over the measured bandwidth; the inter-node bandwidth is
an assumption given by --inter-node-gbps and named as such in the table).

Each run writes OUT/<run>/metrics.jsonl (rank 0) and OUT/<run>.log; OUT/multi_gpu.json holds the summary:
tokens/s over the steps after the first --warmup, loss per step, peak GPU memory per rank.
"""
import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}


def make_model(tok_dir: Path, dest: Path, shape: str):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    if (dest / "config.json").exists(): return dest
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def make_data(dest: Path, rows: int, median_words: int, seed: int = 0):
    if dest.exists(): return dest
    rng = random.Random(seed)
    words = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
             "romeo sierra tango uniform victor whiskey xray yankee zulu apple river stone cloud tree light house "
             "garden window paper music silver orange yellow purple winter summer").split()
    with open(dest, "w") as f:
        for _ in range(rows):
            n = max(4, min(int(rng.lognormvariate(math.log(median_words), 0.8)), 1500))
            q = " ".join(rng.choice(words) for _ in range(max(2, n // 4)))
            a = " ".join(rng.choice(words) for _ in range(n))
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    return dest


def base_config(model_dir, data, out, args, **kw):
    c = {"base_model": str(model_dir), "datasets": [{"path": str(data), "type": "chat_template"}],
         "dataset_prepared_path": str(Path(args.out) / "prepared"), "chat_template": "chatml",
         "sequence_len": args.seq, "sample_packing": True, "pad_to_sequence_len": True,
         "adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lora_target_linear": True,
         "micro_batch_size": 1, "gradient_accumulation_steps": args.ga, "max_steps": args.steps,
         "learning_rate": 1e-4, "lr_scheduler": "constant", "optimizer": "adamw_torch_fused", "bf16": True,
         "logging_steps": 1, "save_strategy": "no", "seed": 0, "output_dir": str(out), "dataset_num_proc": 8}
    c.update(kw)
    return c


def write(cfg: dict, path: Path) -> Path:
    import yaml
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run(cmd, log: Path, env=None, timeout=240) -> int:
    t = time.time()
    with open(log, "w") as f:
        try:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"  timed out after {timeout}s: {' '.join(map(str, cmd))[:120]}", flush=True)
            return 124
    print(f"  rc={r.returncode} in {time.time() - t:.0f}s  ({' '.join(map(str, cmd))[:160]})", flush=True)
    return r.returncode


NOTEBOOK = r'''
import json, time
from ftkit.config import load
from ftkit.launch import launch_train, parent_problems
cfg = load(CONFIG)
seen = []
t = time.time()
records = launch_train(cfg, 2, on_record=seen.append)
print("NB_RESULT", json.dumps({"streamed": sum(1 for r in seen if r.get("event") == "log"), "wall": time.time() - t,
                               "clean_after": parent_problems() == []}))
'''


def notebook_run(cfg_path: Path, out: Path, log: Path) -> int:
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f"CONFIG = {str(cfg_path)!r}\n" + NOTEBOOK)]
    t = time.time()
    try:
        NotebookClient(nb, timeout=900, kernel_name="python3").execute()
        rc = 0
    except Exception as e:
        rc = 1
        log.write_text(repr(e))
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "stream")
    with open(log, "a") as f: f.write(text)
    print(f"  notebook rc={rc} in {time.time() - t:.0f}s", flush=True)
    return rc


def summarize(out: Path, warmup: int) -> dict:
    p = out / "metrics.jsonl"
    if not p.exists(): return {"ok": False}
    recs = [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
    logs = [r for r in recs if r.get("event") == "log" and "loss" in r]
    res = {"ok": any(r.get("event") == "end" for r in recs), "losses": [r["loss"] for r in logs], "steps": len(logs)}
    begin = next((r for r in recs if r.get("event") == "begin"), {})
    res["world_size"] = begin.get("world_size")
    if begin.get("rank0_trainable_elements"):   # whole count under DDP (each rank holds all of it)
        res["trainable"] = begin["rank0_trainable_elements"] * (begin.get("world_size") or 1 if begin.get("sharding") == "fsdp" else 1)
    tok = [r for r in logs if "num_tokens" in r]
    if len(tok) > warmup + 1:
        a, b = tok[warmup], tok[-1]
        res["tokens_per_s"] = (b["num_tokens"] - a["num_tokens"]) / (b["time"] - a["time"])
    peaks = out / "peak_memory.jsonl"
    if peaks.exists():
        res["peak_gib_per_rank"] = {r["rank"]: r["peak_gib"] for r in map(json.loads, peaks.read_text().splitlines())}
    return res


def generate_check(model_dir: Path, log: Path) -> dict:
    "Load a saved model folder (merged/full) and generate a few tokens."
    code = ("import torch,sys; from transformers import AutoModelForCausalLM, AutoTokenizer; d=sys.argv[1];"
            "t=AutoTokenizer.from_pretrained(d); m=AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).cuda();"
            "x=t('alpha bravo', return_tensors='pt').to('cuda'); y=m.generate(**x, max_new_tokens=5, do_sample=False);"
            "print('GEN_OK', y.shape[1]-x['input_ids'].shape[1])")
    r = subprocess.run([sys.executable, "-c", code, str(model_dir)], capture_output=True, text=True)
    log.write_text(r.stdout + r.stderr)
    return {"loads_and_generates": "GEN_OK 5" in r.stdout}


ALLREDUCE = r'''
import json, os, sys, time, torch, torch.distributed as dist
dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
rank, n = dist.get_rank(), dist.get_world_size()
dev = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else torch.device("cpu")
if dev.type == "cuda": torch.cuda.set_device(dev)
res = []
for mib in [int(x) for x in sys.argv[2].split(",")]:
    x = torch.ones(mib * 2**20 // 2, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float16, device=dev)
    for _ in range(3): dist.all_reduce(x)
    if dev.type == "cuda": torch.cuda.synchronize()
    iters = 10 if dev.type == "cuda" else 2
    t = time.perf_counter()
    for _ in range(iters): dist.all_reduce(x)
    if dev.type == "cuda": torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / iters
    res.append({"mib": mib, "seconds": dt, "bus_gb_s": 2 * (n - 1) / n * mib * 2**20 / dt / 1e9})
if rank == 0: open(sys.argv[1], "w").write(json.dumps({"world_size": n, "backend": dist.get_backend(), "sizes": res}))
dist.destroy_process_group()
'''


def allreduce(out: Path, n: int, sizes: str = "64,256,1024") -> dict:
    "Bus bandwidth of all_reduce between `n` local GPUs (NCCL; gloo on a CPU machine), the nccl-tests definition."
    script = out / "allreduce.py"
    script.write_text(ALLREDUCE)
    res = out / "allreduce.json"
    rc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), str(script), str(res), sizes],
             out / "allreduce.log", timeout=180)
    return json.loads(res.read_text()) if rc == 0 and res.exists() else {"ok": False}


def per_gpu(run: dict, n: int) -> dict:
    "tokens/s per GPU and the most memory any GPU used."
    tps = run.get("tokens_per_s")
    peak = max((run.get("peak_gib_per_rank") or {"": None}).values(), default=None)
    return {"gpus": n, "tokens_per_s": tps, "tokens_per_s_per_gpu": tps / n if tps else None, "peak_gib_per_gpu": peak}


def estimate(per_gpu_tps: float, tokens_per_gpu_step: int, grad_bytes: float, bus_gb_s: float, n: int,
             inter_gb_s: float, gpus_per_node: int = 8, fsdp: bool = False) -> dict:
    """Paper estimate for `n` GPUs with the work per GPU fixed (weak scaling): compute time from the measured per-GPU
    throughput; communication = the bytes of a ring all-reduce of the gradients (DDP: 2(n-1)/n x grad bytes; FSDP: about
    1.5x that, an all-gather per pass and a reduce-scatter) over the slowest link (NVLink inside a node, the network
    between nodes). Two bounds: communication fully hidden behind the backward pass, or not hidden at all."""
    compute = tokens_per_gpu_step / per_gpu_tps
    bw = bus_gb_s if n <= gpus_per_node else min(bus_gb_s, inter_gb_s)
    comm = (1.5 if fsdp else 1.0) * 2 * (n - 1) / n * grad_bytes / (bw * 1e9)
    lo, hi = n * tokens_per_gpu_step / (compute + comm), n * tokens_per_gpu_step / max(compute, comm)
    return {"gpus": n, "compute_s": compute, "comm_s": comm, "tokens_per_s_no_overlap": lo, "tokens_per_s_full_overlap": hi,
            "bandwidth_gb_s": bw, "bandwidth_source": "measured between this node's GPUs" if n <= gpus_per_node else
            f"assumed --inter-node-gbps {inter_gb_s:g} GB/s per GPU" if inter_gb_s < bus_gb_s else "measured between this node's GPUs"}


def param_count(shape: str, lora: bool, r: int = 16, vocab: int = 49152) -> int:
    "Trainable parameters of the benchmark model: LoRA r16 on every linear layer, or the whole (tied-embedding) model."
    c = SHAPES[shape]
    h, L, ff = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    q = c["num_attention_heads"] * c["head_dim"]
    if lora: return L * r * ((h + q) * 2 + (h + kv) * 2 + (h + ff) * 3)
    return vocab * h + L * (h * q * 2 + h * kv * 2 + h * ff * 3 + 2 * h) + h


def scaling_report(summary: dict, args, out: Path) -> None:
    "OUT/scaling.json and OUT/scaling.md: measured per-GPU numbers and the estimate for 8 and 64 GPUs."
    n, rows, est = args.gpus, [], []
    bus = max((x["bus_gb_s"] for x in summary.get("allreduce", {}).get("sizes", [])), default=None)
    tokens_step = args.seq * args.ga                     # packed rows of --seq tokens, --ga rows per optimizer step (global)
    prev = json.loads(Path(args.previous).read_text()) if args.previous else {}
    for kind, one, many, old in (("LoRA r16 (DDP)", "cli1", "cliN", "cli2"), ("full fine-tune (1 GPU / FSDP2)", "full1", "fullN", "fsdp2")):
        a, b, nb = summary.get(one, {}), summary.get(many, {}), n
        if not b.get("tokens_per_s") and prev.get(old, {}).get("tokens_per_s"):     # throughput of an earlier call
            b, nb = {**prev[old], "source": f"{Path(args.previous).name}:{old}"}, prev[old].get("world_size") or 2
        if not b.get("tokens_per_s"): continue
        pb = per_gpu(b, nb)
        if a.get("tokens_per_s"):
            pa = per_gpu(a, 1)
            rows.append({"workload": kind, "one": pa, "many": pb, "speedup": pb["tokens_per_s"] / pa["tokens_per_s"],
                         "efficiency": pb["tokens_per_s"] / (nb * pa["tokens_per_s"])})
        grad = (b.get("trainable") or param_count(args.shape, lora="LoRA" in kind)) * (4 if "LoRA" in kind else 2)
        if bus:
            for m in (8, 64):
                est.append({"workload": kind, "throughput_from": b.get("source", many),
                            **estimate(pb["tokens_per_s_per_gpu"], tokens_step // nb, grad, bus, m, args.inter_node_gbps,
                                       fsdp="FSDP" in kind)})
    rep = {"gpus": n, "gpu": summary.get("gpu"), "seq": args.seq, "global_batch_rows": args.ga, "bus_gb_s": bus,
           "measured": rows, "estimate": est}
    (out / "scaling.json").write_text(json.dumps(rep, indent=1))
    md = [f"# Scaling on {n}x {summary.get('gpu', 'GPU')} (`benchmarks/multi_gpu.py`)", "",
          f"{'Llama-3.2-1B' if args.shape == '1b' else args.shape} shape, packed rows of {args.seq} tokens, global batch {args.ga} rows per step on 1 and on {n} GPUs.", ""]
    if rows: md += ["| workload | GPUs | tokens/s | tokens/s per GPU | speed-up | scaling efficiency | peak GiB per GPU |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        for side in ("one", "many"):
            p = r[side]
            md.append(f"| {r['workload']} | {p['gpus']} | {p['tokens_per_s']:,.0f} | {p['tokens_per_s_per_gpu']:,.0f} | "
                      + (f"x{r['speedup']:.2f} | {r['efficiency']:.0%}" if side == "many" else "— | —") + f" | {p['peak_gib_per_gpu']} |")
    if bus: md += ["", f"all-reduce bus bandwidth between the {n} GPUs ({summary['allreduce'].get('backend')}, best of "
                   f"{', '.join(str(x['mib']) for x in summary['allreduce']['sizes'])} MiB messages): **{bus:,.1f} GB/s**."]
    if est:
        md += ["", "Paper estimate, work per GPU fixed at the measured run's (compute from the measured tokens/s per GPU, "
               "gradient traffic over the bandwidth named in the row):", "",
               "| workload | GPUs | compute s/step | communication s/step | bandwidth | tokens/s (no overlap .. full overlap) |",
               "|---|---|---|---|---|---|"]
        for e in est:
            md.append(f"| {e['workload']} ({e['throughput_from']}) | {e['gpus']} | {e['compute_s']:.3f} | {e['comm_s']:.4f} | {e['bandwidth_gb_s']:,.1f} GB/s, "
                      f"{e['bandwidth_source']} | {e['tokens_per_s_no_overlap']:,.0f} .. {e['tokens_per_s_full_overlap']:,.0f} |")
    (out / "scaling.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (needed by every run except allreduce)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="1b", choices=list(SHAPES))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--ga", type=int, default=4)
    ap.add_argument("--rows", type=int, default=12000)
    ap.add_argument("--runs", default="cli1,cli2,nb2,fsdp2,zero2")
    ap.add_argument("--previous", default=None, help="an earlier multi_gpu.json whose cli2 / fsdp2 throughput the estimate uses "
                    "when this call did not run cliN / fullN (e.g. benchmarks/results/multi_gpu_H200x2.json)")
    ap.add_argument("--gpus", type=int, default=2, help="GPUs for the cliN / fullN / allreduce runs")
    ap.add_argument("--inter-node-gbps", type=float, default=50.0,
                    help="assumed network bandwidth per GPU between nodes for the 64-GPU estimate (GB/s; 8x400 Gb/s NICs = 50)")
    args = ap.parse_args()
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    ftkit = [sys.executable, "-m", "ftkit.cli"]
    runs = args.runs.split(",")
    model_dir = data = None
    if set(runs) - {"allreduce"}:          # a training run: the model and the data (not needed for the bandwidth alone)
        model_dir = make_model(Path(args.tokenizer), out / "model", args.shape)
        data = make_data(out / "data.jsonl", args.rows, 200)
    summary = {"shape": args.shape, "seq": args.seq, "steps": args.steps, "global_batch_rows": args.ga}
    try:
        import torch
        summary["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception: pass
    one_gpu = {"CUDA_VISIBLE_DEVICES": "0"}
    if "cli1" in runs:
        c = write(base_config(model_dir, data, out / "cli1", args), out / "cli1.yml")
        print("1 GPU (CLI)", flush=True)
        run(ftkit + ["preprocess", str(c)], out / "preprocess.log", one_gpu)
        run(ftkit + ["train", str(c)], out / "cli1.log", one_gpu)
        summary["cli1"] = summarize(out / "cli1", args.warmup)
        (out / "multi_gpu.json").write_text(json.dumps(summary, indent=1))
    if "cli2" in runs:
        c = write(base_config(model_dir, data, out / "cli2", args, gradient_accumulation_steps=args.ga // 2), out / "cli2.yml")
        print("2 GPUs (CLI, torchrun)", flush=True)
        run(ftkit + ["train", str(c), "--launcher", "torchrun", "--num-processes", "2"], out / "cli2.log")
        summary["cli2"] = summarize(out / "cli2", args.warmup)
        (out / "multi_gpu.json").write_text(json.dumps(summary, indent=1))
    if "nb2" in runs:
        c = write(base_config(model_dir, data, out / "nb2", args, gradient_accumulation_steps=args.ga // 2), out / "nb2.yml")
        print("2 GPUs (notebook, notebook_launcher)", flush=True)
        notebook_run(c, out / "nb2", out / "nb2.log")
        summary["nb2"] = summarize(out / "nb2", args.warmup)
        txt = (out / "nb2.log").read_text() if (out / "nb2.log").exists() else ""
        if "NB_RESULT " in txt: summary["nb2"].update(json.loads(txt.split("NB_RESULT ")[1].splitlines()[0]))
    n = args.gpus
    if "allreduce" in runs:
        print(f"all-reduce bandwidth, {n} processes", flush=True)
        summary["allreduce"] = allreduce(out, n)
    if "cliN" in runs:
        c = write(base_config(model_dir, data, out / "cliN", args, gradient_accumulation_steps=max(args.ga // n, 1)), out / "cliN.yml")
        print(f"{n} GPUs LoRA (CLI, torchrun)", flush=True)
        run(ftkit + ["train", str(c), "--launcher", "torchrun", "--num-processes", str(n)], out / "cliN.log")
        summary["cliN"] = summarize(out / "cliN", args.warmup)
    full = dict(adapter=None, lora_r=None, lora_alpha=None, lora_target_linear=None, lora_dropout=None, optimizer="adamw_torch")
    if "full1" in runs:
        c = write(base_config(model_dir, data, out / "full1", args, **full), out / "full1.yml")
        print("1 GPU full fine-tune", flush=True)
        run(ftkit + ["train", str(c)], out / "full1.log", one_gpu)
        summary["full1"] = summarize(out / "full1", args.warmup)
    if "fullN" in runs:
        c = write(base_config(model_dir, data, out / "fullN", args, **full, gradient_accumulation_steps=max(args.ga // n, 1),
                              fsdp_version=2, fsdp_config={"fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                                           "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
                                                           "fsdp_state_dict_type": "FULL_STATE_DICT"}), out / "fullN.yml")
        print(f"{n} GPUs FSDP2 full fine-tune", flush=True)
        run(ftkit + ["train", str(c), "--launcher", "accelerate", "--num-processes", str(n)], out / "fullN.log")
        summary["fullN"] = summarize(out / "fullN", args.warmup)
    (out / "multi_gpu.json").write_text(json.dumps(summary, indent=1))
    short = dict(max_steps=min(args.steps, 8), adapter=None, lora_r=None, lora_alpha=None, lora_target_linear=None,
                 lora_dropout=None, gradient_accumulation_steps=max(args.ga // 2, 1), optimizer="adamw_torch")
    if "fsdp2" in runs:
        c = write(base_config(model_dir, data, out / "fsdp2", args, **short, fsdp_version=2,
                              fsdp_config={"fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                           "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
                                           "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_sharding_strategy": "FULL_SHARD"}),
                  out / "fsdp2.yml")
        print("2 GPUs FSDP2 full fine-tune (accelerate)", flush=True)
        run(ftkit + ["train", str(c), "--launcher", "accelerate", "--num-processes", "2"], out / "fsdp2.log")
        summary["fsdp2"] = {**summarize(out / "fsdp2", 1), **generate_check(out / "fsdp2", out / "fsdp2_gen.log")}
        (out / "multi_gpu.json").write_text(json.dumps(summary, indent=1))
    if "zero2" in runs:
        c = write(base_config(model_dir, data, out / "zero2", args, **short,
                              deepspeed=str(ROOT / "examples" / "deepspeed" / "zero2.json")), out / "zero2.yml")
        print("2 GPUs DeepSpeed ZeRO-2 full fine-tune (accelerate)", flush=True)
        run(ftkit + ["train", str(c), "--launcher", "accelerate", "--num-processes", "2"], out / "zero2.log")
        summary["zero2"] = {**summarize(out / "zero2", 1), **generate_check(out / "zero2", out / "zero2_gen.log")}
    if summary.get("cli1", {}).get("tokens_per_s") and summary.get("cli2", {}).get("tokens_per_s"):
        summary["scaling_2gpu"] = summary["cli2"]["tokens_per_s"] / summary["cli1"]["tokens_per_s"]
        l1, l2 = summary["cli1"]["losses"], summary["cli2"]["losses"]
        n = min(len(l1), len(l2))
        summary["max_abs_loss_diff_1v2"] = max(abs(a - b) for a, b in zip(l1[:n], l2[:n])) if n else None
    (out / "multi_gpu.json").write_text(json.dumps(summary, indent=1))
    if {"allreduce", "cliN", "fullN"} & set(runs): scaling_report(summary, args, out)
    for name in runs:  # keep the raw records beside the summary
        for f in ("metrics.jsonl", "peak_memory.jsonl"):
            if (out / name / f).exists(): (out / f"{name}.{f}").write_text((out / name / f).read_text())
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)} |
                     {k: {kk: vv for kk, vv in v.items() if kk != "losses"} for k, v in summary.items() if isinstance(v, dict)}, indent=1))


if __name__ == "__main__":
    main()
