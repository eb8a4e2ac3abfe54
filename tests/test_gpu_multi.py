"""Sharded training on 2 GPUs (`pytest -m gpu tests/test_gpu_multi.py`): FSDP2 with LoRA, DeepSpeed ZeRO-3 with LoRA
and a full fine-tune with `zero3_offload`; each saves, reloads and generates, and reports memory per GPU against 1 GPU.

A Llama-shaped model with random weights and a locally trained tokenizer (nothing downloaded). Every run goes through
`ftkit train CONFIG --num-processes 2` (accelerate), as a user would start it. Needs 2 visible GPUs.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]
FTKIT = [sys.executable, "-m", "ftkit.cli"]
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def _two_gpus():
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2: pytest.skip("needs 2 CUDA GPUs")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    "A random Llama (hidden 512, 8 layers, ~30M parameters) with a local tokenizer, and chat rows that reverse word lists."
    from transformers import LlamaConfig, LlamaForCausalLM
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ftkit_test_tokenizers import llama3
    d = tmp_path_factory.mktemp("multi")
    tok = llama3()
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                     num_attention_heads=8, num_key_value_heads=4, bos_token_id=tok.bos_token_id,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False))
    m.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    import random
    rng = random.Random(0)
    with open(d / "rows.jsonl", "w") as f:
        for _ in range(256):
            w = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
            f.write(json.dumps({"messages": [{"role": "user", "content": "reverse: " + " ".join(w)},
                                             {"role": "assistant", "content": " ".join(reversed(w))}]}) + "\n")
    return d


def _config(base, out, **kw):
    c = {"base_model": str(base / "model"),
         "datasets": [{"path": str(base / "rows.jsonl"), "type": "chat_template"}],
         "dataset_prepared_path": str(base / "prepared"), "sequence_len": 128, "micro_batch_size": 4,
         "gradient_accumulation_steps": 1, "max_steps": 6, "learning_rate": 1e-3, "lr_scheduler": "constant",
         "optimizer": "adamw_torch", "bf16": True, "logging_steps": 1, "seed": 0, "save_strategy": "no",
         "output_dir": str(out), "adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
         "lora_target_linear": True, **kw}
    p = out.parent / f"{out.name}.yml"
    p.write_text(yaml.safe_dump(c))
    return p


def _train(cfg, n, env=None):
    cmd = FTKIT + ["train", str(cfg)] + (["--num-processes", str(n)] if n > 1 else [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=500, env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    out = Path(yaml.safe_load(Path(cfg).read_text())["output_dir"])
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    peaks = [json.loads(l)["peak_gib"] for l in (out / "peak_memory.jsonl").read_text().splitlines()]
    return out, recs, peaks


def _losses(recs):
    return [r["loss"] for r in recs if r.get("event") == "log" and "loss" in r]


def _generates(out, base):
    code = ("import sys; from ftkit.infer import generate; from ftkit.config import load;"
            f"cfg = load({str(out / 'config.yml')!r}); print('GEN', repr(generate(cfg, 'reverse: alpha bravo', max_new_tokens=4)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return "GEN '" in r.stdout or 'GEN "' in r.stdout, r.stdout[-500:] + r.stderr[-1500:]


FSDP = {"fsdp_version": 2, "fsdp_config": {"fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                           "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
                                           "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_sharding_strategy": "FULL_SHARD"}}


def _report(name, one, two, rec2):
    line = {"run": name, "peak_gib_1gpu": one, "peak_gib_per_gpu_2": two, "sharding": rec2.get("sharding"),
            "rank0_param_elements": rec2.get("rank0_param_elements")}
    print("MULTI_GPU_MEMORY", json.dumps(line))
    dest = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")      # $OUT on the GPU machine: it comes back
    with open(dest / "multi_gpu_sharded.jsonl", "a") as f: f.write(json.dumps(line) + "\n")


def test_fsdp2_lora_two_gpus(tmp_path, base):
    "FSDP2 + LoRA: the same losses as 1 GPU, parameters really sharded, the adapter alone saved whole, reloaded, generating."
    _two_gpus()
    out1, r1, p1 = _train(_config(base, tmp_path / "one", gradient_accumulation_steps=2), 1, {"CUDA_VISIBLE_DEVICES": "0"})
    out2, r2, p2 = _train(_config(base, tmp_path / "fsdp", **FSDP), 2)
    begin = next(r for r in r2 if r["event"] == "begin")
    total = next(r for r in r1 if r["event"] == "begin")["rank0_param_elements"]
    assert begin["world_size"] == 2 and begin["sharding"] == "fsdp"
    assert begin["rank0_param_elements"] < 0.6 * total, (begin, total)      # each rank holds about half
    l1, l2 = _losses(r1), _losses(r2)
    assert len(l1) == len(l2) == 6 and max(abs(a - b) for a, b in zip(l1, l2)) < 0.05, (l1, l2)   # bf16, other reduction order
    from safetensors.torch import load_file
    sd = load_file(str(out2 / "adapter_model.safetensors"))
    assert sd and all("lora_" in k for k in sd), "adapter-only state dict"
    assert all(v.shape[0] in (8,) or v.shape[1] in (8,) for v in sd.values()), "gathered: full LoRA shapes, not shards"
    assert not (out2 / "model.safetensors").exists()
    ok, log = _generates(out2, base)
    assert ok, log
    _report("fsdp2_lora", p1[0], p2, begin)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (pip install 'ftkit[deepspeed]')")
def test_zero3_lora_and_full_offload_two_gpus(tmp_path, base):
    "DeepSpeed ZeRO-3 with LoRA, and a full fine-tune with zero3_offload: save, reload, generate; memory per GPU."
    _two_gpus()
    out, recs, peaks = _train(_config(base, tmp_path / "z3lora", deepspeed=str(ROOT / "examples/deepspeed/zero3.json")), 2)
    begin = next(r for r in recs if r["event"] == "begin")
    assert begin["world_size"] == 2 and begin["sharding"] == "deepspeed" and len(_losses(recs)) == 6
    assert (out / "adapter_model.safetensors").exists()
    ok, log = _generates(out, base)
    assert ok, log
    _report("zero3_lora", None, peaks, begin)
    full = dict(adapter=None, lora_r=None, lora_alpha=None, lora_dropout=None, lora_target_linear=None, learning_rate=1e-5,
                deepspeed=str(ROOT / "examples/deepspeed/zero3_offload.json"))
    out, recs, peaks = _train(_config(base, tmp_path / "z3full", **full), 2)
    assert (out / "model.safetensors").exists() or list(out.glob("model-*.safetensors")), sorted(p.name for p in out.iterdir())
    ok, log = _generates(out, base)
    assert ok, log
    _report("zero3_offload_full", None, peaks, next(r for r in recs if r["event"] == "begin"))


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_fsdp2_qlora_two_gpus(tmp_path, base):
    "QLoRA under FSDP2 (4-bit base stored as bf16 for sharding): trains, saves the adapter alone, reloads, generates."
    _two_gpus()
    out, recs, peaks = _train(_config(base, tmp_path / "fsdp_qlora", adapter="qlora", load_in_4bit=True, **FSDP), 2)
    begin = next(r for r in recs if r["event"] == "begin")
    assert begin["world_size"] == 2 and begin["sharding"] == "fsdp" and len(_losses(recs)) == 6
    from safetensors.torch import load_file
    sd = load_file(str(out / "adapter_model.safetensors"))
    assert sd and all("lora_" in k for k in sd)
    ok, log = _generates(out, base)
    assert ok, log
    _report("fsdp2_qlora", None, peaks, begin)
