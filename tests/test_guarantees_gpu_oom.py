"""Guarantee 3 on a GPU (`pytest -m gpu tests/test_guarantees_gpu_oom.py`): a real CUDA out-of-memory error.

`ftkit train` runs in a fresh process whose CUDA caching allocator is capped at 1 GiB with
`torch.cuda.set_per_process_memory_fraction` (the allocator itself raises `torch.cuda.OutOfMemoryError`, as on a full
GPU), on a Llama-shaped model with random weights and a small local tokenizer (nothing downloaded), with a micro-batch
far too large for the cap. The run must stop with exit status 2 and ftkit's explanation — this config's numbers, the
cap, the peak, and the knobs to change — never a traceback, and write no adapter. Then the advice is taken (smaller
micro-batch with more accumulation, gradient checkpointing) and the same command under the same cap finishes.
Skipped without CUDA (conftest); the CPU allocator's failure through the same code is in test_guarantees_faults.py."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]
CAP_GIB = 1.0
WORDS = ("the quick brown fox jumps over the lazy dog hello world fine tuning language models needs exact labels "
         "system user assistant model tool how can i help you today the answer is eight").split()

# `ftkit train` (the CLI's own main) in a process whose CUDA allocator may hold at most CAP GiB
RUN = r'''
import sys, torch
if len(sys.argv) > 2 and torch.cuda.is_available():
    torch.cuda.set_per_process_memory_fraction(float(sys.argv[2]) * 2**30 / torch.cuda.get_device_properties(0).total_memory)
from ftkit.cli import main
sys.exit(main(["train", sys.argv[1]]))
'''


def setup_run(d: Path, *, rows: int = 64, words: int = 1600, hidden: int = 512, layers: int = 8, **cfg_changes) -> Path:
    "A base_model folder (random Llama + local BPE tokenizer), long completion rows and a config in folder `d`; the config path."
    sys.path.insert(0, str(ROOT / "tests"))
    from ftkit_test_tokenizers import llama3
    from helpers import tiny_llama
    tok = llama3()
    base = d / "base"
    if not (base / "config.json").exists():
        m = tiny_llama(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                       num_attention_heads=8, num_key_value_heads=2, head_dim=hidden // 8, max_position_embeddings=4096,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        m.save_pretrained(base)
        tok.save_pretrained(base)
    import json
    import random
    rnd = random.Random(0)
    (d / "data.jsonl").write_text("".join(json.dumps({"text": " ".join(rnd.choice(WORDS) for _ in range(words))}) + "\n"
                                          for _ in range(rows)))
    cfg = {"base_model": str(base), "adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_target_linear": True,
           "datasets": [{"path": str(d / "data.jsonl"), "type": "completion"}], "dataset_prepared_path": str(d / "prep"),
           "sequence_len": 2048, "excess_length_strategy": "truncate", "sample_packing": False, "micro_batch_size": 64,
           "gradient_accumulation_steps": 1, "max_steps": 1, "learning_rate": 1e-4, "optimizer": "adamw_torch",
           "save_strategy": "no", "logging_steps": 1, "output_dir": str(d / "out"), "seed": 0}
    cfg.update(cfg_changes)
    p = d / "config.yml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def run_train(cfg: Path, cap_gib: float | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(cfg.parent / "hf_datasets"), PYTHONPATH=os.pathsep.join(
                   [p for p in (os.environ.get("PYTHONPATH", ""), str(ROOT)) if p]))
    argv = [sys.executable, "-c", RUN, str(cfg)] + ([str(cap_gib)] if cap_gib else [])
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cfg.parent, timeout=540)


def test_a_real_cuda_oom_says_what_to_change_and_the_advice_fits(tmp_path):
    cfg = setup_run(tmp_path)
    r = run_train(cfg, CAP_GIB)
    err = r.stderr
    print(err[-3000:])
    assert r.returncode == 2, f"exit {r.returncode}\n" + r.stdout[-2000:] + err[-4000:]
    assert "Traceback" not in err and "out of memory on " in err and "the CPU" not in err.split("out of memory on ")[1][:40], err[-3000:]
    assert "micro_batch_size 64 x sequence_len 2048" in err and "this process may use" in err and "at its peak" in err, err[-3000:]
    assert "micro_batch_size: 32 with gradient_accumulation_steps: 2" in err and "gradient_checkpointing: true" in err, err[-3000:]
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    # take the advice: the same effective batch in smaller micro-batches, with gradient checkpointing; same cap
    fitted = setup_run(tmp_path, micro_batch_size=2, gradient_accumulation_steps=32, gradient_checkpointing=True)
    r = run_train(fitted, CAP_GIB)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
