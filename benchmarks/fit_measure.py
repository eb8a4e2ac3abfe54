"""Measured peak GPU memory of ftkit training runs, next to `ftkit.fit`'s estimate for the same config (issue 18).

Each config trains a Llama-3.2-1B-shaped model with random weights (saved once to a folder and loaded through
`ftkit.models.load_model`, so QLoRA goes through ftkit's real bitsandbytes path) on synthetic packed documents for a
few optimizer steps through `ftkit.train.train`. The peak is `torch.cuda.max_memory_allocated()` from the start of
training (the model already on the GPU) to its end, which is what `ftkit.fit.estimate` models.

    python benchmarks/fit_measure.py --out $OUT/fit_measured.json [--only lora_4k,qlora_4k]   # on a GPU
    python benchmarks/fit_measure.py --tiny --out /tmp/fit.json                              # CPU smoke test

`benchmarks/fit_report.py` turns the JSON into benchmarks/results/fit_validation.{json,md}.
"""
import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# every kernel switch off (ftkit.kernels.patch.KERNEL_KEYS): the "_nok" runs measure the plain PyTorch path
KERNELS_OFF = dict(lora_mlp_kernel=False, lora_qkv_kernel=False, lora_o_kernel=False, liger_rope=False, liger_rms_norm=False,
                   liger_glu_activation=False, liger_fused_linear_cross_entropy=False, cut_cross_entropy=False,
                   chunked_cross_entropy=False)
# name -> config keys on top of the common ones below; in the order they run (most informative first)
CONFIGS = {
    "lora_4k":         dict(sequence_len=4096, adapter="lora"),
    "lora_16k":        dict(sequence_len=16384, adapter="lora"),
    "qlora_4k":        dict(sequence_len=4096, adapter="qlora", load_in_4bit=True),
    "full_4k":         dict(sequence_len=4096),
    "lora_4k_nok":     dict(sequence_len=4096, adapter="lora", **KERNELS_OFF),
    "lora_4k_gc":      dict(sequence_len=4096, adapter="lora", gradient_checkpointing=True),
    "qlora_16k":       dict(sequence_len=16384, adapter="qlora", load_in_4bit=True),
    "full_16k_gc":     dict(sequence_len=16384, gradient_checkpointing=True),
    "full_4k_paged8":  dict(sequence_len=4096, optimizer="paged_adamw_8bit"),
    "qlora_4k_nok":    dict(sequence_len=4096, adapter="qlora", load_in_4bit=True, **KERNELS_OFF),
    "full_4k_nok":     dict(sequence_len=4096, **KERNELS_OFF),
    "lora_16k_nok":    dict(sequence_len=16384, adapter="lora", **KERNELS_OFF),
    "lora_16k_gc":     dict(sequence_len=16384, adapter="lora", gradient_checkpointing=True),
}
LORA = dict(lora_r=16, lora_alpha=32, lora_dropout=0.0,
            lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def save_model(dest: Path, tiny: bool) -> Path:
    from transformers import AutoModelForCausalLM
    from bench_train import llama_1b
    if (dest / "config.json").exists(): return dest
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(llama_1b(tiny), dtype=torch.bfloat16)
    m.save_pretrained(dest)
    del m
    return dest


def config_for(name: str, model_dir: Path, out: Path, steps: int, tiny: bool) -> dict:
    c = dict(base_model=str(model_dir), learning_rate=1e-4, micro_batch_size=1, gradient_accumulation_steps=1,
             sample_packing=True, max_steps=steps, lr_scheduler="constant", warmup_steps=0, weight_decay=0.0,
             optimizer="adamw_torch_fused", bf16=torch.cuda.is_available(), logging_steps=1, save_strategy="no", seed=0,
             max_grad_norm=1.0, output_dir=str(out / name), datasets=[{"path": "synthetic", "type": "completion"}])
    c.update(CONFIGS[name])
    if c.get("adapter"): c.update(LORA)
    if tiny: c["sequence_len"] = min(c["sequence_len"], 256)
    return c


def measure(name: str, model_dir: Path, out: Path, steps: int, tiny: bool) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from bench_train import StubTok, make_docs
    from ftkit.config import load as load_config
    from ftkit import models
    from ftkit.train import train
    cuda = torch.cuda.is_available()
    d = config_for(name, model_dir, out, steps, tiny)
    cfg = load_config(d)
    rec = {"name": name, "config": {k: v for k, v in d.items() if k not in ("datasets", "output_dir", "base_model")}, "ok": False}
    a = SimpleNamespace(steps=steps, ga=1, seq=cfg.sequence_len, median=48 if tiny else 256, sigma=0.9, min_len=8 if tiny else 32, seed=0)
    docs = make_docs(a, 1000 if tiny else 128256)
    data = (Dataset.from_dict({"input_ids": docs, "labels": docs}), None)
    if cuda:
        torch.cuda.synchronize(); rec["allocated_before_load_GiB"] = torch.cuda.memory_allocated() / 2**30
    model = models.load_model(cfg, None, quiet=True)
    if not cfg.load_in_4bit and cuda: model = model.to("cuda")
    model = models.apply_adapter(cfg, model, quiet=True)
    rec["trainable_params"] = model.ftkit_trainable[0]
    marks = {}

    class Probe(TrainerCallback):
        trainer = None

        def on_train_begin(self, args, st, control, **kw):
            if cuda:
                torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
                rec["allocated_at_start_GiB"] = torch.cuda.memory_allocated() / 2**30
            marks[0] = (time.perf_counter(), 0)

        def on_step_end(self, args, st, control, **kw):
            if cuda: torch.cuda.synchronize()
            marks[st.global_step] = (time.perf_counter(), self.trainer.ftkit_tokens)
            if cuda and st.global_step == 1: rec["allocated_after_step1_GiB"] = torch.cuda.memory_allocated() / 2**30

    res = train(cfg, data=data, model=model, tokenizer=StubTok(), callbacks=[Probe()], quiet=True)
    if cuda:
        rec["peak_alloc_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        rec["peak_reserved_GiB"] = torch.cuda.max_memory_reserved() / 2**30
    if len(marks) > 2:
        (t0, n0), (t1, n1) = marks[1], marks[max(marks)]
        rec["tokens_per_s_after_step1"] = (n1 - n0) / (t1 - t0)
    rec["final_loss"] = res.metrics.get("train_loss")
    rec["kernels"] = kernels_report(res.model)
    rec["ok"] = True
    del res, model, data
    return rec


def kernels_report(model) -> dict:
    "Which ftkit kernels were patched into the trained model (ftkit.kernels.patch marks each module it patches)."
    from collections import Counter
    c = Counter(getattr(m, "_ftkit_kernel") for m in model.modules() if getattr(m, "_ftkit_kernel", None))
    return {"patched": dict(c)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default=",".join(CONFIGS))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--work", default="/tmp/ftkit_fit_measure")
    a = ap.parse_args()
    from bench_train import versions
    work = Path(a.work); work.mkdir(parents=True, exist_ok=True)
    model_dir = save_model(work / ("tiny" if a.tiny else "llama1b"), a.tiny)
    result = {"versions": versions(), "steps": a.steps, "model": "Llama-3.2-1B shape (vocab 128256, tied), random bf16 weights",
              "data": "synthetic documents (lognormal lengths, median 256), every token trained, packed rows of sequence_len",
              "runs": {}}
    for name in a.only.split(","):
        t = time.time()
        try:
            rec = measure(name, model_dir, work, a.steps, a.tiny)
        except Exception as e:  # noqa: BLE001  (one failing config must not lose the others)
            rec = {"name": name, "ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        rec["wall_s"] = round(time.time() - t, 1)
        result["runs"][name] = rec
        print(name, json.dumps({k: rec.get(k) for k in ("ok", "peak_alloc_GiB", "tokens_per_s_after_step1", "wall_s", "error")}), flush=True)
        gc.collect()
        if torch.cuda.is_available(): torch.cuda.empty_cache()
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
