"""The registry (every name imports and builds on a real tokenizer) and the instruct / completion /
input_output / pre-tokenized strategies on sample rows of each documented schema."""
import subprocess, sys
import pytest
import ftkit_test_tokenizers as T
from ftkit.prompts.registry import REGISTRY, known_types, lookup, resolve_type, RowError
from ftkit.prompts.instruct import PRESETS

# one documented row per type (docs/dataset-formats/inst_tune and friends)
ROWS = {
    "chat_template": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
    "pygmalion": {"conversations": [{"role": "human", "value": "Hi"}, {"role": "bot", "value": "Yo"}]},
    "alpaca": {"instruction": "Add", "input": "2 3", "output": "5"},
    "jeopardy": {"question": "Red planet", "category": "Space", "answer": "Mars"},
    "oasst": {"INSTRUCTION": "Hi", "RESPONSE": "Yo"},
    "gpteacher": {"instruction": "Add", "input": "", "response": "5"},
    "reflection": {"instruction": "Add", "input": "", "output": "6", "reflection": "wrong", "corrected": "5"},
    "explainchoice": {"question": "2+3?", "choices": ["4", "5"], "solution": "5", "explanation": "sum"},
    "concisechoice": {"question": "2+3?", "choices": ["4", "5"], "solution": "5", "explanation": "sum"},
    "summarizetldr": {"article": "Long text.", "summary": "Short."},
    "alpaca_chat": {"instruction": "Add", "input": "2 3", "output": "5"},
    "alpaca_chat.load_qa": {"question": "2+3?", "answer": "5"},
    "alpaca_chat.load_concise": {"instruction": "Add", "input": "2 3", "output": "5"},
    "alpaca_chat.load_camel_ai": {"message_1": "Hi", "message_2": "Yo"},
    "alpaca_w_system.load_open_orca": {"system_prompt": "Be nice.", "question": "Hi", "response": "Yo"},
    "orcamini": {"system_prompt": "Be nice.", "question": "Hi", "response": "Yo"},
    "context_qa": {"article": "Paris is in France.", "question": "Where is Paris?", "answer": "France"},
    "context_qa.load_v2": {"context": "Paris is in France.", "question": "Where is Paris?", "answer": "France"},
    "context_qa.load_404": {"article": "Paris is in France.", "unanswerable_question": "Where is Rome?"},
    "creative_acr.load_answer": {"instruction": "Write", "revision": "Better text"},
    "creative_acr.load_critique": {"scores": {"style": 3}, "critiques": {"style": "flat"}, "instruction": "Write", "answer": "Text"},
    "creative_acr.load_revise": {"scores": "3", "critiques": "flat", "instruction": "Write", "answer": "Text", "revision": "Better"},
    "metharme": {"prompt": "Hi", "generation": "Yo"},
    "completion": {"text": "Some raw text to learn."},
    "input_output": {"segments": [{"label": False, "text": "Q: hi\n"}, {"label": True, "text": "A: yo"}]},
    "user_defined": {"instruction": "Hi", "output": "Yo"},
    "pretokenized": {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
}

def test_registry_cheap_import():
    code = "import sys, ftkit.prompts.registry as r; r.known_types(); print(sorted(m for m in ('torch','transformers','datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr

SFT = sorted(n for n, s in REGISTRY.items() if s.target.startswith("ftkit.prompts."))   # preference types live in ftkit.rl

def test_every_registered_name_has_a_sample():
    assert set(SFT) == set(ROWS)

@pytest.mark.parametrize("name", SFT)
def test_every_registered_name_imports_builds_and_tokenizes(name):
    tok = T.smollm2()
    ds = {"chat_template": "chatml"} if name in ("chat_template", "sharegpt") else {}
    s = REGISTRY[name].build(tok, ds, {"sequence_len": 64})
    out = s.tokenize(ROWS[name])
    assert out and all(len(x["input_ids"]) == len(x["labels"]) == len(x["attention_mask"]) > 0 for x in out)
    assert any(l != -100 for x in out for l in x["labels"]), name
    assert isinstance(s.fingerprint(), dict)

def test_unknown_type_suggests():
    with pytest.raises(KeyError, match="Did you mean 'alpaca_chat'"): lookup("alpaca_chta")
    assert "metharme" in known_types() and resolve_type(None).name == "pretokenized"

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_instruct_presets_mask_prompt_train_response(name):
    tok = T.smollm2()
    r = lookup(name).build(tok).tokenize(ROWS[name])[0]
    labels, ids = r["labels"], r["input_ids"]
    k = next(i for i, l in enumerate(labels) if l != -100)
    assert all(l == -100 for l in labels[:k]) and labels[k:] == ids[k:]      # one masked prompt, then the response
    assert ids[-1] == tok.eos_token_id
    with_inputs = lookup(name).build(tok, {}, {"train_on_inputs": True}).tokenize(ROWS[name])[0]
    assert with_inputs["labels"] == with_inputs["input_ids"]

@pytest.mark.parametrize("name", ["alpaca", "gpteacher", "oasst", "metharme", "alpaca_chat.load_qa"])
def test_instruct_missing_field(name):
    row = dict(ROWS[name]); row.pop(sorted(k for k in row if k not in ("input",))[-1])
    with pytest.raises(RowError) as e: lookup(name).build(T.smollm2()).tokenize(row)
    assert e.value.reason == "missing_field"

def test_instruct_texts_exact():
    tok = T.llama3()
    r = lookup("alpaca").build(tok).tokenize({"instruction": "Hi", "output": "Yo"})[0]
    assert tok.decode(r["input_ids"]) == ("Below is an instruction that describes a task. Write a response that appropriately completes "
                                          "the request.\n\n### Instruction:\nHi\n\n### Response:\nYo<|eot_id|>")
    assert T.trained_text(tok, r) == "Yo<|eot_id|>"
    r = lookup("metharme").build(tok).tokenize({"prompt": "<|user|>Hi<|model|>", "generation": "Yo"})[0]
    assert tok.decode(r["input_ids"]) == "<|user|>Hi<|model|>Yo<|eot_id|><|eot_id|><|eot_id|>"    # Axolotl: three EOS
    r = lookup("alpaca_chat").build(tok).tokenize({"instruction": "Hi", "input": "there", "output": "Yo"})[0]
    assert tok.decode(r["input_ids"]) == ("SYSTEM: Below is an instruction that describes a task, paired with an input that provides "
                                          "further context. Write a response that appropriately completes the request.\n"
                                          "USER: Hi\nthere\nASSISTANT:Yo<|eot_id|>")          # issue 12.1
    assert T.trained_text(tok, r) == "Yo<|eot_id|>"

def test_completion_windows_and_input_output():
    tok = T.smollm2()
    text = "the quick brown fox " * 50
    w = lookup("completion").build(tok, {"field": "body"}, {"sequence_len": 32}).tokenize({"body": text})
    assert all(len(x["input_ids"]) <= 32 for x in w) and len(w) > 1
    assert tok.decode(sum((x["input_ids"] for x in w), [])) == text + tok.eos_token
    with pytest.raises(RowError): lookup("completion").build(tok, {}, {"sequence_len": 32}).tokenize({"body": text})
    r = lookup("input_output").build(tok).tokenize(ROWS["input_output"])[0]
    assert T.trained_text(tok, r) == "A: yo" and tok.decode(r["input_ids"]) == "Q: hi\nA: yo"

def test_every_registered_builder_imports():
    for name, spec in REGISTRY.items():
        assert callable(spec.load()), name
