"Inference, merge and evaluate on the CPU: the real tokenizer, tiny random-weight Llama models saved as local base models."
import argparse, io, json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from ftkit.config import load
from helpers import make_cfg
from ftkit.infer import (AdapterError, InferError, Prompter, check_adapter, evaluate, evaluate_main, generate, inference_main,
                         load_for_inference, merge, merge_main)


@pytest.fixture(scope="session")
def tok():
    from ftkit.models import load_tokenizer
    return load_tokenizer(make_cfg(), quiet=True)


def tiny_base(tok, folder: Path, hidden=32, seed=0) -> str:
    "A tiny random Llama saved with the real tokenizer: a local base model that loads in a blink."
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id))
    m.save_pretrained(folder); tok.save_pretrained(folder)
    return str(folder)


def make_adapter(base: str, folder: Path, r=4, seed=1) -> str:
    "A LoRA adapter with non-zero B (so merging changes the logits)."
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    m = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                       LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False))
    m.save_pretrained(folder)
    return str(folder)


CONV = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4, of course."}]


@pytest.mark.parametrize("template", ["tokenizer_default", "chatml", "phi_3"])
def test_inference_prompt_equals_training_prompt(tok, template):
    "The prompt tokens at inference are the masked prompt tokens of the training row that ends with the reply."
    from ftkit.prompts.registry import lookup
    cfg = make_cfg(chat_template=template, datasets=[{"path": "x.jsonl", "type": "chat_template"}])
    for conv in (CONV, CONV[1:3], CONV[1:]):
        sample = lookup("chat_template").build(tok, cfg.datasets[0], cfg).tokenize({"messages": conv})[0]
        labels, ids = sample["labels"], sample["input_ids"]
        trained = [i for i, l in enumerate(labels) if l != -100]
        # the final reply's first trained token: the last run of trained tokens
        start = trained[-1]
        while start - 1 in trained: start -= 1
        assert Prompter(tok, cfg).ids(conv[:-1]) == ids[:start]
        assert all(l == -100 for l in labels[:start]) is False or len(conv) == 2   # earlier assistant turns are trained too


def test_preference_prompt_equals_inference_prompt(tok):
    "DPO rows (chatml.* type) are rendered with the template inference uses."
    from ftkit.rl import build
    cfg = make_cfg(rl="dpo", datasets=[{"path": "x.jsonl", "type": "chatml.intel"}])
    out = build(tok, cfg.datasets[0], cfg, "chatml.intel").tokenize({"system": "Be terse.", "question": "2+2?", "chosen": "4", "rejected": "5"})[0]
    assert Prompter(tok, cfg).ids([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}]) == out["prompt_ids"]


def test_generate_stream_and_cli_stdin(tok, tmp_path):
    base = tiny_base(tok, tmp_path / "base")
    cfg = load({"base_model": base, "learning_rate": 1e-4, "chat_template": "chatml", "output_dir": str(tmp_path / "out")})
    model, t, what = load_for_inference(cfg, quiet=True)
    assert base in what
    full = generate(cfg, "Hello", model=model, tokenizer=t, max_new_tokens=6)
    assert "".join(generate(cfg, "Hello", model=model, tokenizer=t, max_new_tokens=6, stream=True)) == full
    args = argparse.Namespace(config=str(_write_cfg(tmp_path, cfg)), overrides=[], lora_model_dir=None, base_model=None,
                              max_new_tokens=6, temperature=0.0, top_p=1.0, prompter="chat_template", system=None)
    out = io.StringIO()
    assert inference_main(args, stdin=io.StringIO("Hello\n"), stdout=out) == 0
    assert out.getvalue().strip() == full.strip()


def _write_cfg(tmp_path, cfg) -> Path:
    p = tmp_path / "cfg.yml"; p.write_text(cfg.to_yaml()); return p


def test_merge_matches_adapter_logits(tok, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = tiny_base(tok, tmp_path / "base")
    ad = make_adapter(base, tmp_path / "out", r=4)
    cfg = load({"base_model": base, "adapter": "lora", "lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-4, "lora_on_cpu": True,
                "chat_template": "chatml", "output_dir": str(tmp_path / "out")})
    res = merge(cfg, quiet=True)
    out = Path(res.output_dir)
    assert out == tmp_path / "out" / "merged"
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists() and (out / "chat_template.jinja").exists()
    assert (out / "chat_template.jinja").read_text().startswith("{% for message in messages %}{{ '<|im_start|>'")
    x = torch.tensor([Prompter(tok, cfg).ids("Merge check, please.")])
    with torch.no_grad():
        ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), ad).eval()(x).logits
        plain = AutoModelForCausalLM.from_pretrained(base).eval()(x).logits
        merged = AutoModelForCausalLM.from_pretrained(out).eval()(x).logits
    assert (ref - plain).abs().max() > 1e-3           # the adapter does change the logits
    assert torch.allclose(merged, ref, atol=1e-4), (merged - ref).abs().max()
    # the merged folder is a full model: inference loads it with --base-model, evaluate/generate work on it
    m, t, what = load_for_inference(load(cfg.to_dict(), adapter=None, lora_r=None, lora_alpha=None), base_model=str(out), quiet=True)
    with torch.no_grad(): assert torch.allclose(m(x).logits, ref, atol=1e-4)
    # CLI entry point
    args = argparse.Namespace(config=str(_write_cfg(tmp_path, cfg)), overrides=[],
                              lora_model_dir=None, output_dir=str(tmp_path / "m2"), base_model=None)
    assert merge_main(args) == 0 and (tmp_path / "m2" / "model.safetensors").exists()


def test_bad_adapter_folders(tok, tmp_path):
    from transformers import AutoModelForCausalLM
    base = tiny_base(tok, tmp_path / "base", hidden=32)
    other = tiny_base(tok, tmp_path / "other", hidden=48, seed=3)
    cfg = load({"base_model": base, "adapter": "lora", "lora_r": 4, "learning_rate": 1e-4, "output_dir": str(tmp_path / "out")})
    model = AutoModelForCausalLM.from_pretrained(base)
    with pytest.raises(AdapterError, match=r"nowhere.*does not exist"):
        check_adapter(tmp_path / "nowhere", model, cfg)
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match=r"empty.*no adapter_config.json"):
        check_adapter(tmp_path / "empty", model, cfg)
    wrong_base = make_adapter(other, tmp_path / "ad_other", r=4)
    with pytest.raises(AdapterError) as e:
        check_adapter(wrong_base, model, cfg)
    assert "ad_other" in str(e.value) and "does not fit this base model" in str(e.value) and "other" in str(e.value)
    r8 = make_adapter(base, tmp_path / "ad_r8", r=8)
    with pytest.raises(AdapterError, match=r"ad_r8.*r=8.*lora_r: 4"):
        check_adapter(r8, model, cfg)
    with pytest.raises(AdapterError, match="ad_other"):
        merge(cfg, wrong_base, quiet=True)
    import contextlib
    from ftkit.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err):      # the CLI prints the adapter error without a traceback and exits 2
        code = main(["merge-lora", str(_write_cfg(tmp_path, cfg)), "--lora-model-dir", str(tmp_path / "ad_r8")])
    assert code == 2 and "ad_r8" in err.getvalue() and "Traceback" not in err.getvalue()


def test_evaluate_table(tok, tmp_path):
    base = tiny_base(tok, tmp_path / "base")
    rows = [{"messages": [{"role": "user", "content": f"Count to {n}."}, {"role": "assistant", "content": " ".join(map(str, range(1, n + 1)))}]}
            for n in range(2, 22)]
    data = tmp_path / "d.jsonl"; data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load({"base_model": base, "learning_rate": 1e-4, "chat_template": "chatml", "val_set_size": 0.25, "sequence_len": 128,
                "micro_batch_size": 4, "dataset_prepared_path": str(tmp_path / "prep"), "output_dir": str(tmp_path / "out"),
                "datasets": [{"path": str(data), "type": "chat_template"}]})
    rep = evaluate(cfg, train=True, save=True)
    print(rep)
    assert [r["split"] for r in rep.rows] == ["eval", "train"] and rep.rows[0]["samples"] == 5 and rep.rows[1]["samples"] == 15
    assert abs(rep["eval_perplexity"] - torch.tensor(rep["eval_loss"]).exp().item()) < 1e-3 * rep["eval_perplexity"]
    assert 9.0 < rep["eval_loss"] < 12.5           # a random model over a 49k vocabulary: about ln(49152) = 10.8
    assert "<table" in rep._repr_html_() and "perplexity" in str(rep)
    assert json.loads((tmp_path / "out" / "eval_metrics.json").read_text())["eval_loss"] == rep["eval_loss"]
    args = argparse.Namespace(config=str(_write_cfg(tmp_path, cfg)), overrides=[], train=False, lora_model_dir=None, base_model=None,
                              max_samples=None)
    assert evaluate_main(args) == 0
    with pytest.raises(InferError, match="no eval data"):
        evaluate(load(cfg.to_dict(), val_set_size=0))


def test_interactive_inference(tok, tmp_path, monkeypatch):
    "A blank line sends, /reset forgets, /exit quits; replies stream to stdout."
    base = tiny_base(tok, tmp_path / "base")
    cfg = load({"base_model": base, "learning_rate": 1e-4, "chat_template": "chatml", "output_dir": str(tmp_path / "out")})
    lines = iter(["Hello", "", "/reset", "Second", "line", "", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    class TTY(io.StringIO):
        def isatty(self): return True
    out = io.StringIO()
    args = argparse.Namespace(config=str(_write_cfg(tmp_path, cfg)), overrides=[], lora_model_dir=None, base_model=None,
                              max_new_tokens=4, temperature=0.0, top_p=1.0, prompter="chat_template", system=None)
    assert inference_main(args, stdin=TTY(), stdout=out) == 0
    replies = out.getvalue().splitlines()
    assert len(replies) == 2 and all(replies)
