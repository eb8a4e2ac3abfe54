#!/usr/bin/env python
"""Multi-GPU proof for ftkit: the same config on 1 and 2 GPUs, launched from the CLI and from a notebook,
plus FSDP2 and DeepSpeed ZeRO-2 runs that save a model which loads and generates.

Model: a Llama-shaped model with random weights built from a config (nothing is downloaded), with the
tokenizer folder given by --tokenizer (the SmolLM2 tokenizer saved by `ftkit.models`). Data: synthetic
chat rows of random words, long enough that packed rows are full. LoRA r16 on every linear layer,
sample packing into rows of --seq tokens, bf16.

  python benchmarks/multi_gpu.py --tokenizer DIR --out OUT [--steps 30] [--shape 1b|tiny] [--runs cli1,cli2,nb2,fsdp2,zero2]

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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="1b", choices=list(SHAPES))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--ga", type=int, default=4)
    ap.add_argument("--rows", type=int, default=12000)
    ap.add_argument("--runs", default="cli1,cli2,nb2,fsdp2,zero2")
    args = ap.parse_args()
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    ftkit = [sys.executable, "-m", "ftkit.cli"]
    model_dir = make_model(Path(args.tokenizer), out / "model", args.shape)
    data = make_data(out / "data.jsonl", args.rows, 200)
    runs = args.runs.split(",")
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
    for name in runs:  # keep the raw records beside the summary
        for f in ("metrics.jsonl", "peak_memory.jsonl"):
            if (out / name / f).exists(): (out / f"{name}.{f}").write_text((out / name / f).read_text())
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)} |
                     {k: {kk: vv for kk, vv in v.items() if kk != "losses"} for k, v in summary.items() if isinstance(v, dict)}, indent=1))


if __name__ == "__main__":
    main()
