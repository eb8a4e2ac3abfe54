"""Estimate vs measured peak GPU memory: `ftkit.fit.estimate` for each measured run, written to
benchmarks/results/fit_validation.{json,md}.

    python benchmarks/fit_report.py [--measured benchmarks/results/fit_measured_H200.json]

Measured points: this script's own GPU run (benchmarks/fit_measure.py: LoRA / QLoRA / full, 4k and 16k, with and
without gradient checkpointing, 8-bit paged AdamW), the earlier single-GPU benchmark (gpu_F_H200.json) and the 2-GPU
runs (multi_gpu_H200x2.json: DDP LoRA, FSDP2 and ZeRO-2 full fine-tunes). Peaks are torch.cuda.max_memory_allocated.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ftkit.config import load  # noqa: E402
from ftkit.fit import GiB, ModelShape, estimate  # noqa: E402

L1B = ModelShape("llama-3.2-1b shape", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                 num_heads=32, num_kv_heads=8, head_dim=64, tie_embeddings=True, model_type="llama")
L1B_49K = ModelShape("llama-1b shape, vocab 49152", 49152, 2048, 8192, 16, 32, 8, 64, True, model_type="llama")
LORA = dict(adapter="lora", lora_r=16, lora_alpha=32, lora_dropout=0.0, lora_target_linear=True)
COMMON = dict(learning_rate=1e-4, micro_batch_size=1, sample_packing=True, bf16=True, optimizer="adamw_torch_fused",
              datasets=[{"path": "synthetic", "type": "completion"}])


def multi_gpu_points(results: Path) -> list[dict]:
    p = results / "multi_gpu_H200x2.json"
    if not p.exists(): return []
    m = json.loads(p.read_text())
    chat = dict(datasets=[{"path": "chat.jsonl", "type": "chat_template"}])
    full = dict(adapter=None, optimizer="adamw_torch", gradient_accumulation_steps=2)
    rows = [("DDP LoRA, 1 GPU (cli1)", "cli1", dict(**LORA, **chat, gradient_accumulation_steps=4), 1),
            ("DDP LoRA, 2 GPUs (cli2)", "cli2", dict(**LORA, **chat, gradient_accumulation_steps=2), 2),
            ("FSDP2 full, 2 GPUs", "fsdp2", dict(**chat, **full, fsdp_version=2, fsdp_config={"fsdp_sharding_strategy": "FULL_SHARD"}), 2),
            ("ZeRO-2 full, 2 GPUs", "zero2", dict(**chat, **full, deepspeed=str(ROOT / "examples/deepspeed/zero2.json")), 2)]
    out = []
    for name, key, over, world in rows:
        r = m.get(key, {})
        peaks = list((r.get("peak_gib_per_rank") or {}).values())
        if not peaks: continue
        out.append(dict(name=name, shape=L1B_49K, config={**COMMON, "sequence_len": 4096, **over}, world=world,
                        measured=max(peaks), kernels=[], source=f"multi_gpu_H200x2.json ({key}), vocab 49152, chat rows"))
    return out


def earlier_points(results: Path) -> list[dict]:
    out = []
    p = results / "gpu_F_H200.json"
    if p.exists():
        f = json.loads(p.read_text())
        out.append(dict(name="LoRA 4k, GA 4 (bench_train F)", shape=L1B, world=1, measured=f["peak_alloc_GiB"], kernels=[],
                        config={**COMMON, **LORA, "sequence_len": 4096, "gradient_accumulation_steps": 4},
                        source="gpu_F_H200.json"))
    out.append(dict(name="LoRA 16k, GA 4 (issue 10 table)", shape=L1B, world=1, measured=56.13, kernels=[],
                    config={**COMMON, **LORA, "sequence_len": 16384, "gradient_accumulation_steps": 4},
                    source="issue 10 text (same harness as gpu_F, rows of 16,384 tokens)"))
    return out


def measured_points(path: Path) -> list[dict]:
    if not path.exists(): return []
    m = json.loads(path.read_text())
    out = []
    for name, r in m["runs"].items():
        if not r.get("ok"): continue
        c = {**r["config"], "datasets": [{"path": "synthetic", "type": "completion"}]}   # as run there (bf16 on the GPU)
        ks = r.get("kernels")
        kernels = sorted((ks.get("patched") or {}).keys()) if isinstance(ks, dict) else []
        leaked = r.get("allocated_before_load_GiB") or 0.0          # left over from the previous config in the same process
        out.append(dict(name=name, shape=L1B, world=1, measured=r["peak_alloc_GiB"] - leaked, config=c, kernels=kernels,
                        source=f"{path.name} ({m['versions'].get('gpu')})", tokens_per_s=r.get("tokens_per_s_after_step1")))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measured", default=str(ROOT / "benchmarks/results/fit_measured_H200.json"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/fit_validation"))
    a = ap.parse_args()
    results = ROOT / "benchmarks" / "results"
    points = measured_points(Path(a.measured)) + earlier_points(results) + multi_gpu_points(results)
    rows = []
    for p in points:
        cfg = load(p["config"])
        e = estimate(cfg, p["shape"], gpus=p["world"], kernels=frozenset(p["kernels"]))
        err = (e.peak_gib - p["measured"]) / p["measured"]
        rows.append(dict(name=p["name"], gpus=p["world"], estimate_GiB=round(e.peak_gib, 2), measured_GiB=round(p["measured"], 2),
                         error=round(err, 4), within_15pct=abs(err) <= 0.15, kernels=p["kernels"], source=p["source"],
                         parts_GiB={x.name: round(x.bytes / GiB, 2) for x in e.parts if x.bytes},
                         **({"tokens_per_s": round(p["tokens_per_s"])} if p.get("tokens_per_s") else {})))
    summary = dict(points=len(rows), within_15pct=sum(r["within_15pct"] for r in rows),
                   max_abs_error=max((abs(r["error"]) for r in rows), default=None),
                   mean_abs_error=sum(abs(r["error"]) for r in rows) / max(len(rows), 1))
    Path(a.out + ".json").write_text(json.dumps(dict(summary=summary, rows=rows), indent=1))
    md = ["# Will it fit? `ftkit.fit.estimate` vs measured peak GPU memory", "",
          "Peak = `torch.cuda.max_memory_allocated()` during training (per GPU). Estimate = `ftkit.fit.estimate` for the same "
          "config and model shape, computed without a GPU. Model: Llama-3.2-1B shape, random bf16 weights. Regenerate with "
          "`python benchmarks/fit_report.py` (measurements: `python benchmarks/fit_measure.py --out ...` on a GPU).", "",
          "The runs named like `lora_4k` are this validation's own (one H200 call, 2026-11-30, transformers 5.24, peft 0.21.2, "
          "bitsandbytes 0.50.2, torch 2.11): 5 optimizer steps each, micro-batch 1, packed rows of 4k or 16k tokens, LoRA r16 "
          "on all 7 linears, AdamW fused (8-bit paged where named), with ftkit's kernels as `ftkit.train` applies them by "
          "default, or all switched off (`_nok`). The kernels' memory terms in `ftkit.fit` were written from the kernels' "
          "source before this measurement; nothing was fitted to it. The three `qlora_*` runs were measured again in a later "
          "call the same day (2026-11-30 16:30 UTC, `bash benchmarks/gpu_suite.sh last`, 4 steps), after QLoRA stopped "
          "casting embeddings, LM head and norms to float32 (`ftkit.models.prepare_kbit`): 6.98 / 20.74 / 18.69 GiB "
          "before, 5.47 / 17.63 / 13.56 GiB after.", "",
          "| run | GPUs | kernels | estimate GiB | measured GiB | error | source |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['name']} | {r['gpus']} | {', '.join(r['kernels']) or 'off'} | {r['estimate_GiB']:.2f} | {r['measured_GiB']:.2f} | "
                  f"{r['error']:+.1%} | {r['source']} |")
    md += ["", f"{summary['within_15pct']} of {summary['points']} within 15 %; mean |error| {summary['mean_abs_error']:.1%}, "
               f"max |error| {summary['max_abs_error']:.1%}."]
    Path(a.out + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
