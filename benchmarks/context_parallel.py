"""The longest trainable packed row on 1 GPU vs 2 GPUs with `context_parallel_size: 2` (issue 16, item 3).

A Llama-3.2-1B-shaped model with random weights (saved once), LoRA r16 on every linear layer, gradient checkpointing,
bf16, one packed row of `sequence_len` tokens per step (synthetic documents, lognormal lengths, padded to the full row),
2 optimizer steps per trial. The search doubles `sequence_len` until a trial fails (out of memory), then bisects
between the last length that trained and the first that did not, to `--step` tokens. Every trial runs in fresh
processes (`torch.distributed.run` for 2), so an OOM leaves nothing behind; trials already in the result file are not
run again, so a search cut by a time limit continues where it stopped.

    python benchmarks/context_parallel.py search --gpus 1 --out benchmarks/results/context_parallel_H200.json
    python benchmarks/context_parallel.py search --gpus 2 --out benchmarks/results/context_parallel_H200.json
    # fewer, cheaper trials (one GPU call for both): probes at 64k and 128k, a linear memory fit, then a bracket
    python benchmarks/context_parallel.py search --gpus 1 --predict --start 65536 --steps 1 --doc-median 4096 --rel 0.05 --out R.json
    python benchmarks/context_parallel.py search --gpus 2 --tiny --start 64 --max 256 --out /tmp/cp.json   # CPU smoke (gloo)

Not run yet on GPUs: no result file is committed until it is.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
LORA = dict(adapter="lora", lora_r=16, lora_alpha=32, lora_dropout=0.0,
            lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def save_model(dest: Path, tiny: bool) -> Path:
    "The random-weight model, saved once (bf16)."
    import torch
    from transformers import AutoModelForCausalLM
    from bench_train import llama_1b
    if (dest / "config.json").exists(): return dest
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(llama_1b(tiny), dtype=torch.bfloat16).save_pretrained(dest)
    return dest


def trial_config(model_dir: str, length: int, cp: int, out: str, tiny: bool, steps: int = 2) -> dict:
    import torch
    c = dict(base_model=model_dir, learning_rate=1e-4, micro_batch_size=1, gradient_accumulation_steps=1, sample_packing=True,
             sequence_len=length, pad_to_sequence_len=True, max_steps=steps, lr_scheduler="constant", optimizer="adamw_torch",
             bf16=torch.cuda.is_available(), gradient_checkpointing=True, logging_steps=1, save_strategy="no", seed=0,
             ddp_timeout=300, output_dir=out, datasets=[{"path": "synthetic", "type": "completion"}], **LORA)
    if cp > 1: c["context_parallel_size"] = cp
    return c


def docs_for(length: int, rows: int, tiny: bool, seed: int = 0, median: int | None = None) -> list[list[int]]:
    """Documents (lognormal lengths, median `median` tokens, else 1/8 of the row) that fill `rows` packed rows of `length`
    tokens. Varlen attention's memory grows with the row, not with its documents, so a fixed median (e.g. 4096) finds
    the same longest row while keeping each trial's attention time linear in the row length."""
    import numpy as np
    rng = np.random.default_rng(seed)
    hi = 1000 if tiny else 128000
    med = min(median, length) if median else max(length / 8, 8)
    docs, total = [], 0
    while total < rows * length * 1.02:
        n = int(np.clip(np.rint(np.exp(np.log(med) + 0.6 * rng.standard_normal())), 8, length))
        docs.append(rng.integers(3, hi, size=n, dtype=np.int64).tolist())
        total += n
    return docs


def trial(a) -> int:
    "One trial in this process (one rank of it): train 2 steps, write this rank's result file."
    import torch
    from datasets import Dataset
    from bench_train import StubTok
    from ftkit import models
    from ftkit.config import load
    from ftkit.train import train
    rank = int(os.environ.get("RANK", "0") or 0)
    rec = {"rank": rank, "length": a.length, "cp": a.cp, "ok": False}
    t = time.time()
    try:
        cfg = load(trial_config(a.model, a.length, a.cp, a.workdir, a.tiny, a.steps))
        docs = docs_for(a.length, a.steps + 1, a.tiny, median=a.doc_median)
        model = models.apply_adapter(cfg, models.load_model(cfg, None, quiet=True), quiet=True)   # no tokenizer: embeddings as saved
        res = train(cfg, data=(Dataset.from_dict({"input_ids": docs, "labels": docs}), None), model=model, tokenizer=StubTok(),
                    quiet=True, save=False, return_model=False)
        rec.update(ok=True, steps=res.global_step, loss=res.metrics.get("train_loss"), tokens=res.tokens)
    except Exception as e:  # noqa: BLE001 — an OOM (ftkit explains it) or anything else, recorded
        rec["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        rec["oom"] = "out of memory" in str(e).lower() or "OutOfMemory" in type(e).__name__
    rec["seconds"] = round(time.time() - t, 1)
    if torch.cuda.is_available():
        rec["peak_alloc_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        rec["total_GiB"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2)
        rec["gpu"] = torch.cuda.get_device_name(0)
    Path(f"{a.result}.rank{rank}.json").write_text(json.dumps(rec))
    return 0 if rec["ok"] else 1


def run_trial(length: int, gpus: int, model_dir: Path, work: Path, tiny: bool, timeout: int, port: int, steps: int = 2,
              doc_median: int | None = None) -> dict:
    "A trial in fresh processes; the ranks' records merged (ok only when every rank trained)."
    res = work / f"trial_{gpus}_{length}"
    for f in work.glob(f"{res.name}.rank*.json"): f.unlink()
    inner = [__file__, "trial", "--length", str(length), "--cp", str(gpus), "--model", str(model_dir), "--workdir",
             str(work / f"out_{gpus}_{length}"), "--result", str(res), "--steps", str(steps)] + (["--tiny"] if tiny else []) + \
        (["--doc-median", str(doc_median)] if doc_median else [])
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--nproc_per_node", str(gpus), "--master_port", str(port)] if gpus > 1 else []) + inner
    t = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, start_new_session=True)
        rc, tail = p.returncode, (p.stderr or "")[-1500:]
    except subprocess.TimeoutExpired:
        rc, tail = "timeout", ""
    ranks = [json.loads(f.read_text()) for f in sorted(work.glob(f"{res.name}.rank*.json"))]
    ok = rc == 0 and len(ranks) == gpus and all(r["ok"] for r in ranks)
    out = {"length": length, "gpus": gpus, "ok": ok, "rc": rc, "wall_s": round(time.time() - t, 1), "ranks": ranks}
    if not ok: out["stderr_tail"] = tail
    return out


def _peak(t: dict) -> float | None:
    peaks = [r.get("peak_alloc_GiB") for r in t["ranks"] if r.get("peak_alloc_GiB") is not None]
    return max(peaks) if peaks else None


def predict_bracket(a, runs: dict, attempt, done: dict, unit: int):
    """Fewer trials: train at --start and 2x --start, fit peak memory = c + b x length (per GPU, the largest rank), aim at
    95 % of the card, then step by 1.25x up (or 0.8x down) until one length trains and the next one does not. The
    fitted line and its guess are kept in the results; the answer is still the trials' own ok / failed."""
    p1, p2 = a.start, 2 * a.start
    if not (attempt(p1) and attempt(p2)):
        return (p1 if done[p1]["ok"] else None), (p2 if done[p1]["ok"] else p1)
    m1, m2 = _peak(done[p1]), _peak(done[p2])
    cap = next((r.get("total_GiB") for r in done[p2]["ranks"] if r.get("total_GiB")), None)
    if m1 is None or m2 is None or cap is None or m2 <= m1:
        raise SystemExit("--predict needs the GPU's peak memory of two trials (CUDA); run without it on the CPU")
    b = (m2 - m1) / (p2 - p1)
    c = m1 - b * p1
    guess = max(int((0.95 * cap - c) / b) // unit * unit, p2 + unit)
    runs["prediction"] = {"GiB_per_1k_tokens": round(b * 1024, 4), "GiB_fixed": round(c, 2), "card_GiB": cap, "guess": guess}
    print(f"gpus {a.gpus}: peak = {c:.2f} GiB + {b * 1024:.4f} GiB per 1k tokens -> first guess {guess}", flush=True)
    good, bad, n = p2, None, guess
    if attempt(n):
        good = n
        while bad is None and n * 1.25 <= a.max:
            n = int(n * 1.25) // unit * unit
            if attempt(n): good = n
            else: bad = n
    else:
        bad = n
        while True:
            n = int(n * 0.8) // unit * unit
            if n <= good: break
            if attempt(n): good = n; break
            bad = n
    return good, bad


def search(a) -> dict:
    "Double until a failure, then bisect to --step; every trial appended to --out as it finishes."
    from bench_train import versions
    out = Path(a.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data.setdefault("setup", {"model": "Llama-3.2-1B shape, random weights" if not a.tiny else "tiny Llama (CPU smoke)",
                              "lora_r": 16, "gradient_checkpointing": True, "micro_batch_size": 1,
                              "rows": "one packed row of sequence_len tokens per step (pad_to_sequence_len), 2 steps"})
    data.setdefault("versions", versions())
    runs = data.setdefault("runs", {}).setdefault(str(a.gpus), {"context_parallel_size": a.gpus, "trials": []})
    work = Path(a.work); work.mkdir(parents=True, exist_ok=True)
    model_dir = save_model(work / ("model_tiny" if a.tiny else "model_1b"), a.tiny)
    done = {t["length"]: t for t in runs["trials"]}

    def attempt(n: int) -> bool:
        if n not in done:
            t = run_trial(n, a.gpus, model_dir, work, a.tiny, a.timeout, a.port, a.steps, a.doc_median)
            runs["trials"].append(t); done[n] = t
            print(f"gpus {a.gpus}  sequence_len {n:>8}: {'ok' if t['ok'] else 'FAILED'}  ({t['wall_s']} s)", flush=True)
            out.parent.mkdir(parents=True, exist_ok=True); out.write_text(json.dumps(data, indent=1))
        return done[n]["ok"]

    unit = 2 * a.gpus * 8
    good, bad, n = None, None, a.start
    if a.predict:
        good, bad = predict_bracket(a, runs, attempt, done, unit)
    else:
        while n <= a.max:
            if attempt(n): good, n = n, n * 2
            else: bad = n; break
    if good is None: runs["max_len"] = None
    else:
        while bad is not None and bad - good > max(a.step, a.rel * good):
            mid = (good + bad) // 2 // unit * unit
            if mid in (good, bad): break
            if attempt(mid): good = mid
            else: bad = mid
        runs["max_len"], runs["first_failed"] = good, bad
    r = data["runs"]
    if r.get("1", {}).get("max_len") and r.get("2", {}).get("max_len"):
        data["ratio_2_over_1"] = round(r["2"]["max_len"] / r["1"]["max_len"], 3)
    out.write_text(json.dumps(data, indent=1))
    print(f"gpus {a.gpus}: longest trainable row {runs.get('max_len')} tokens (first failure {runs.get('first_failed')})")
    return data


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("search")
    s.add_argument("--gpus", type=int, choices=(1, 2), required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--start", type=int, default=16384)
    s.add_argument("--max", type=int, default=2 ** 21)
    s.add_argument("--step", type=int, default=4096)
    s.add_argument("--timeout", type=int, default=420)
    s.add_argument("--port", type=int, default=29655)
    s.add_argument("--work", default="/tmp/ftkit_cp_bench")
    s.add_argument("--tiny", action="store_true")
    s.add_argument("--steps", type=int, default=2, help="optimizer steps per trial")
    s.add_argument("--doc-median", type=int, help="median document length in tokens (default: 1/8 of the row)")
    s.add_argument("--predict", action="store_true", help="two probe trials, a linear memory fit, then a bracket (GPU)")
    s.add_argument("--rel", type=float, default=0.0, help="stop bisecting when the bracket is within this fraction")
    t = sub.add_parser("trial")
    for k in ("--length", "--cp"): t.add_argument(k, type=int, required=True)
    for k in ("--model", "--workdir", "--result"): t.add_argument(k, required=True)
    t.add_argument("--tiny", action="store_true")
    t.add_argument("--steps", type=int, default=2)
    t.add_argument("--doc-median", type=int)
    a = ap.parse_args()
    if a.cmd == "trial": sys.exit(trial(a))
    search(a)


if __name__ == "__main__":
    main()
