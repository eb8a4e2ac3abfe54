"Model, tokenizer and adapter loading: the embedded model, GGUF, errors before long work, resizing, peft options."
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from ftkit.config import ConfigError
from ftkit.models import (EMBEDDED_GGUF, apply_adapter, embedded_gguf, embedded_model_path, load, load_model,
                          load_tokenizer, model_source, trainable_parameters)
from helpers import make_cfg, tiny_llama


def _problem(fn):
    with pytest.raises(ConfigError) as e:
        fn()
    return e.value.problems[0]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(make_cfg(), quiet=True)


@pytest.fixture(scope="module")
def model(tok):
    return load_model(make_cfg(), tok, quiet=True)


def _tiny(added=0):
    m = tiny_llama(vocab_size=64)
    m.ftkit_added_tokens = added
    return m


def test_embedded_is_cached_and_fast(tok):
    p = embedded_model_path()
    assert (p / "model.safetensors").exists()
    t = time.time()
    load_model(make_cfg(base_model="smollm2-135m-instruct"), tok, quiet=True)
    assert time.time() - t < 15           # ~1 s here; the GGUF path takes ~20 s


def test_embedded_tokenizer(tok):
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert "<|im_start|>" in tok.chat_template
    assert any("EOS is still trained" in n for n in tok.ftkit_notes)


def test_errors_name_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gg = embedded_gguf()
    assert _problem(lambda: model_source(make_cfg(base_model=str(gg.parent), gguf_file="x.gguf"))).key == "gguf_file"
    assert _problem(lambda: model_source(make_cfg(base_model=str(tmp_path / "nothing")))).key == "base_model"
    t = time.time()
    p = _problem(lambda: model_source(make_cfg(base_model="org/surely-not-cached-model")))
    assert p.key == "base_model" and "not a local folder" in p.message and time.time() - t < 10
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    p = _problem(lambda: model_source(make_cfg(base_model=str(tmp_path))))
    assert p.key == "base_model" and "no-such-arch" in p.message
    # an encoder-only architecture has no causal-LM class
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    p = _problem(lambda: model_source(make_cfg(base_model=str(tmp_path))))
    assert p.key == "base_model" and "causal" in p.message


def test_no_chat_template_is_an_error(tmp_path, tok):
    tok.save_pretrained(tmp_path)
    for f in tmp_path.glob("*.jinja"):
        f.unlink()
    tc = json.loads((tmp_path / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tc))
    cfg = make_cfg(tokenizer_config=str(tmp_path), chat_template="tokenizer_default")
    p = _problem(lambda: load_tokenizer(cfg, quiet=True))
    assert p.key == "chat_template" and "chatml" in p.hint
    t = load_tokenizer(make_cfg(tokenizer_config=str(tmp_path), chat_template="tokenizer_default_fallback_chatml"), quiet=True)
    assert "<|im_start|>" in t.chat_template


def test_chat_template_saved_into_tokenizer(tmp_path):
    t = load_tokenizer(make_cfg(chat_template="llama3"), quiet=True)
    t.save_pretrained(tmp_path)
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == t.chat_template
    assert "start_header_id" in t.chat_template


def test_tokens_added_resize_32x_never_shrink(tok):
    t = load_tokenizer(make_cfg(tokens=["<a1>", "<a2>", "<a3>"]), quiet=True)
    assert t.ftkit_added_tokens == 3 and len(t) == len(tok) + 3
    m = load_model(make_cfg(resize_token_embeddings_to_32x=True), t, quiet=True)
    assert m.get_input_embeddings().weight.shape[0] == 49184 and m.ftkit_added_tokens == 3
    m2 = load_model(make_cfg(), t, quiet=True)
    assert m2.get_input_embeddings().weight.shape[0] == len(t)
    # a tokenizer smaller than the model never shrinks the embeddings
    from ftkit.models import resize_embeddings
    small = _tiny()

    class _T:
        def __len__(self):
            return 10
    assert resize_embeddings(make_cfg(), small, _T(), quiet=True) == 64
    assert small.get_input_embeddings().weight.shape[0] == 64


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_quantized_loading_needs_gpu_and_bnb(tok):
    for cfg in (make_cfg(adapter="qlora", load_in_4bit=True), make_cfg(adapter="lora", load_in_8bit=True)):
        p = _problem(lambda: load_model(cfg, tok, quiet=True))
        assert p.key in ("load_in_4bit", "load_in_8bit") and ("GPU" in p.message or "bitsandbytes" in p.message)


def test_attention_backends(tok):
    from transformers import AttentionInterface
    m = load_model(make_cfg(sample_packing=True), tok, quiet=True)
    assert m.config._attn_implementation == "ftkit_varlen" and "ftkit_varlen" in AttentionInterface._global_mapping
    assert load_model(make_cfg(eager_attention=True), tok, quiet=True).config._attn_implementation == "eager"
    if not __import__("importlib").util.find_spec("flash_attn"):
        assert _problem(lambda: load_model(make_cfg(attn_implementation="flash_attention_2"), tok, quiet=True)).key == "flash_attention"


def test_lora_targets_and_count(model):
    import copy
    pm = apply_adapter(make_cfg(adapter="lora", lora_r=4, lora_target_modules=["q_proj", "v_proj"]), copy.deepcopy(model), quiet=True)
    names = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert names and all(("q_proj" in n or "v_proj" in n) and "lora_" in n for n in names)
    # 30 layers x (q: 4*(576+576) + v: 4*(576+192))
    assert pm.ftkit_trainable[0] == 30 * (4 * (576 + 576) + 4 * (576 + 192))


def test_dora_rslora_and_continue(tmp_path):
    dm = apply_adapter(make_cfg(adapter="lora", peft_use_dora=True, peft_use_rslora=True, lora_r=4, lora_alpha=8), _tiny(), quiet=True)
    lc = dm.peft_config["default"]
    assert lc.use_dora and lc.use_rslora and lc.lora_alpha == 8
    layer = dm.base_model.model.model.layers[0].self_attn.q_proj
    assert abs(layer.scaling["default"] - 8 / 4 ** 0.5) < 1e-6
    with torch.no_grad():
        for n, p in dm.named_parameters():
            if "lora_B" in n:
                p.normal_()
    dm.save_pretrained(tmp_path)
    rm = apply_adapter(make_cfg(adapter="lora", lora_model_dir=str(tmp_path)), _tiny(), quiet=True)
    x = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        assert torch.allclose(rm(x).logits, dm(x).logits, atol=1e-5)
    assert any(p.requires_grad for p in rm.parameters())
    assert _problem(lambda: apply_adapter(make_cfg(adapter="lora", lora_model_dir=str(tmp_path / "x")), _tiny(), quiet=True)).key == "lora_model_dir"


def test_added_tokens_require_modules_to_save():
    p = _problem(lambda: apply_adapter(make_cfg(adapter="lora"), _tiny(added=2), quiet=True))
    assert p.key == "lora_modules_to_save" and "embed_tokens" in p.hint
    ok = apply_adapter(make_cfg(adapter="lora", lora_modules_to_save=["embed_tokens", "lm_head"]), _tiny(added=2), quiet=True)
    assert any("modules_to_save" in n and p.requires_grad for n, p in ok.named_parameters())


def test_full_finetune_and_freezing():
    m = apply_adapter(make_cfg(), _tiny(), quiet=True)
    tr, tot = trainable_parameters(m)
    assert tr == tot
    m = apply_adapter(make_cfg(unfrozen_parameters=[r"^model\.layers\.0\."]), _tiny(), quiet=True)
    assert all(n.startswith("model.layers.0.") for n, p in m.named_parameters() if p.requires_grad)


def test_load_from_finetune_config():
    from ftkit.config import load as load_config
    cfg = load_config({"adapter": "lora", "lora_r": 2, "learning_rate": 1e-4})
    m, t = load(cfg, quiet=True)
    assert m.ftkit_trainable[0] > 0 and t.pad_token_id is not None and m.config.use_cache is False


@pytest.mark.slow
def test_gguf_file_loads_dequantized_and_saves(tmp_path, model):
    "base_model + gguf_file: dequantized into ordinary parameters, so saving (and merging) works."
    gg = embedded_gguf()
    cfg = make_cfg(base_model=str(gg.parent), gguf_file=EMBEDDED_GGUF)
    t = load_tokenizer(cfg, quiet=True)
    m = load_model(cfg, t, quiet=True)
    assert getattr(m, "hf_quantizer", None) is None
    sd, ref = m.state_dict(), model.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    m.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()


def test_precision_dtypes(tok):
    assert load_model(make_cfg(bf16=True), tok, quiet=True).dtype == torch.bfloat16
    assert load_model(make_cfg(fp16=True, adapter="lora"), tok, quiet=True).dtype == torch.float16
    # full fine-tune under fp16 AMP keeps float32 master weights; float16: true asks for pure fp16
    assert load_model(make_cfg(fp16=True), tok, quiet=True).dtype == torch.float32
    assert load_model(make_cfg(float16=True), tok, quiet=True).dtype == torch.float16
