"""chat_template labels on real tokenizers: every template x train_on_eos mode x roles_to_train,
the Axolotl ChatML doc sample, tools/thinking, bad rows, and a property test over random conversations."""
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck
import ftkit_test_tokenizers as T
from ftkit.prompts.chat_template import build, TEMPLATES
from ftkit.prompts.registry import RowError, lookup

CONV = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there!"},
        {"role": "assistant", "content": "Hello world."}, {"role": "user", "content": "Can you add 3+5?"},
        {"role": "assistant", "content": "The answer is 8."}]

# template -> (tokenizer factory, extra dataset options, terminator per role or None, system folded into first user turn?)
CASES = {
    "chatml": (T.smollm2, {}, {"system": "<|im_end|>", "user": "<|im_end|>", "assistant": "<|im_end|>"}),
    "qwen": (T.smollm2, {}, {"system": "<|im_end|>", "user": "<|im_end|>", "assistant": "<|im_end|>"}),
    "alpaca": (T.smollm2, {}, {"system": None, "user": None, "assistant": "<|im_end|>"}),
    "llama3": (T.llama3, {}, {"system": "<|eot_id|>", "user": "<|eot_id|>", "assistant": "<|eot_id|>"}),
    "gemma": (T.gemma, {"eot_tokens": ["<end_of_turn>"]}, {"system": None, "user": "<end_of_turn>", "assistant": "<end_of_turn>"}),
    "mistral": (T.mistral, {}, {"system": None, "user": None, "assistant": "</s>"}),
    "phi_3": (T.phi3, {"eot_tokens": ["<|end|>"]}, {"system": "<|end|>", "user": "<|end|>", "assistant": "<|end|>"}),
}

# glue that byte-level BPE merges into the first content token (" Hello" after "[/INST]" + " ")
# (mistral: every turn but the system prompt and the user turn it is folded into)
LEAD = {"mistral": lambda i, m: "" if i <= 1 else " "}

def expected(conv, terms, roles, mode, lead=None):
    "The trained text, built from the messages alone (the oracle)."
    lead = lead or (lambda i, m: "")
    out, last_term = [], None
    # `last` (Axolotl): the last terminator found after a *located* turn, i.e. a trained one (under turn/last)
    found = [(i, terms[m["role"]]) for i, m in enumerate(conv) if terms[m["role"]] and m["role"] in roles]
    last_i = found[-1][0] if found else None
    for i, m in enumerate(conv):
        trains = m["role"] in roles
        if trains: out.append(lead(i, m) + m["content"].strip())
        t = terms[m["role"]]
        if t and (mode == "all" or (mode == "turn" and trains) or (mode == "last" and i == last_i)): out.append(t)
    return "".join(out)

@pytest.mark.parametrize("template", list(CASES))
@pytest.mark.parametrize("mode", ["turn", "all", "last"])
@pytest.mark.parametrize("roles", [["assistant"], ["user"], ["assistant", "user"], ["system", "assistant"]])
def test_template_mode_roles(template, mode, roles):
    tokf, extra, terms = CASES[template]
    tok = tokf()
    ds = {"chat_template": template, "train_on_eos": mode, "roles_to_train": roles}
    cfg = {"eot_tokens": extra["eot_tokens"]} if "eot_tokens" in extra else {}
    s = build(tok, ds, cfg)
    r = s.tokenize({"messages": CONV})[0]
    assert T.trained_text(tok, r) == expected(CONV, terms, roles, mode, LEAD.get(template))
    assert len(r["input_ids"]) == len(r["labels"]) == len(r["attention_mask"])
    # what was rendered is what the template renders through transformers
    assert tok.decode(r["input_ids"]) == tok.apply_chat_template(CONV, tokenize=False, chat_template=TEMPLATES[template])

def test_axolotl_chatml_doc_sample():
    "docs/dataset-formats: header masked, content + its <|im_end|> trained, the \\n after it masked, user <|im_end|> masked."
    tok = T.smollm2()
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "How can I help you?"},
            {"role": "user", "content": "Can you add 3+5?"}, {"role": "assistant", "content": "The answer is 8."}]
    r = build(tok, {"chat_template": "chatml", "roles_to_train": ["assistant"], "train_on_eos": "turn"}).tokenize({"messages": conv})[0]
    toks = [(tok.decode([i]), l, i) for i, l in zip(r["input_ids"], r["labels"])]
    nl, im_end, im_start = 198, tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|im_start|>")
    # every <|im_start|>, role name and newline is masked
    assert all(l == -100 for t, l, i in toks if i in (nl, im_start) or t in ("user", "assistant"))
    # trained tokens have label == id (not shifted)
    assert all(l == i for t, l, i in toks if l != -100)
    k = [t for t, l, i in toks].index("How")
    assert [l for t, l, i in toks[k - 3:k]] == [-100] * 3                      # <|im_start|> assistant \n
    assert T.trained_text(tok, r) == "How can I help you?<|im_end|>The answer is 8.<|im_end|>"
    ends = [l for t, l, i in toks if i == im_end]
    assert ends == [-100, im_end, -100, im_end]

def test_tokenizer_default_and_fallback():
    tok = T.smollm2()
    assert build(tok, {}).template_name == "tokenizer_default"
    assert build(tok, {"chat_template": "tokenizer_default_fallback_llama3"}).template_name == "tokenizer_default"
    s = build(tok, {"chat_template": "jinja", "chat_template_jinja": "{% for m in messages %}<<{{ m['content'] }}>>{{ eos_token }}{% endfor %}"})
    r = s.tokenize({"messages": CONV[1:3]})[0]
    assert tok.decode(r["input_ids"]) == "<<Hi there!>><|im_end|><<Hello world.>><|im_end|>"
    assert T.trained_text(tok, r) == "Hello world.<|im_end|>"

def test_eot_must_be_single_token_and_eos_mode_conflict():
    with pytest.raises(ValueError, match="one token"):
        build(T.smollm2(), {"chat_template": "chatml"}, {"eot_tokens": ["[/INST]"]})
    with pytest.raises(ValueError, match="differ"):
        build(T.smollm2(), {"chat_template": "chatml", "train_on_eos": "turn", "train_on_eot": "all"}, {"eot_tokens": ["<|im_end|>"]})

def test_eos_last_eot_turn_split():
    "mistral with [/INST] as EOT: train_on_eot governs [/INST] (user turns), train_on_eos governs </s>."
    tok = T.mistral()
    s = build(tok, {"chat_template": "mistral", "train_on_eos": "last", "train_on_eot": "all"}, {"eot_tokens": ["[/INST]"]})
    r = s.tokenize({"messages": CONV})[0]
    assert T.trained_text(tok, r) == "[/INST] Hello world.[/INST] The answer is 8.</s>"

def test_roles_mapping_and_unknown_role():
    tok = T.smollm2()
    s = build(tok, {"chat_template": "chatml", "field_messages": "conversations", "roles": {"user": ["human"], "assistant": ["bot"], "narrator": ["narrator"]},
                    "roles_to_train": ["assistant", "narrator"], "message_property_mappings": {"role": "from", "content": "value"}})
    conv = [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Yo"}, {"from": "narrator", "value": "Later."}]
    r = s.tokenize({"conversations": conv})[0]
    assert T.trained_text(tok, r) == "Yo<|im_end|>Later.<|im_end|>"
    assert "<|im_start|>narrator\n" in tok.decode(r["input_ids"])
    with pytest.raises(RowError) as e: s.tokenize({"conversations": [{"from": "alien", "value": "x"}]})
    assert e.value.reason == "unknown_role" and "alien" in e.value.detail

def test_roles_to_train_names_a_dataset_alias():
    "Axolotl maps roles_to_train through roles:, so it may name the dataset's own name for a role (issue 12)."
    tok = T.smollm2()
    conv = [{"from": "person", "value": "Hi"}, {"from": "bot", "value": "Yo"}, {"from": "model", "value": "Bye."}]
    for rtt in (["bot"], ["model"], ["assistant"]):
        s = build(tok, {"chat_template": "chatml", "field_messages": "conversations", "roles_to_train": rtt,
                        "roles": {"user": ["person"], "assistant": ["bot", "model"]},
                        "message_property_mappings": {"role": "from", "content": "value"}})
        assert T.trained_text(tok, s.tokenize({"conversations": conv})[0]) == "Yo<|im_end|>Bye.<|im_end|>", rtt

def test_a_given_roles_mapping_replaces_the_default():
    "As in Axolotl, roles: replaces the default mapping: `human` is no longer `user` unless listed (ftkit then says so)."
    tok = T.smollm2()
    s = build(tok, {"chat_template": "chatml", "roles": {"assistant": ["bot"]}})
    r = s.tokenize({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}]})[0]
    assert T.trained_text(tok, r) == "Yo<|im_end|>"
    with pytest.raises(RowError) as e: s.tokenize({"messages": [{"role": "human", "content": "Hi"}, {"role": "bot", "content": "Yo"}]})
    assert e.value.reason == "unknown_role" and "human" in e.value.detail and "roles:" in e.value.detail

def test_drop_system_and_field_system():
    tok = T.smollm2()
    r = build(tok, {"chat_template": "chatml", "drop_system_message": True}).tokenize({"messages": CONV})[0]
    assert "You are terse" not in tok.decode(r["input_ids"])
    r = build(tok, {"chat_template": "chatml", "field_system": "sys"}).tokenize({"messages": CONV[1:], "sys": "Be kind."})[0]
    assert tok.decode(r["input_ids"]).startswith("<|im_start|>system\nBe kind.<|im_end|>")
    assert "Be kind" not in T.trained_text(tok, r)

def test_tools_passed_and_tool_call_trained():
    tok = T.smollm2()
    tools = [{"type": "function", "function": {"name": "add", "description": "Add", "parameters": {"type": "object", "properties": {}}}}]
    conv = [{"role": "user", "content": "3+5?"},
            {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": "{\"a\": 3, \"b\": 5}"}}]},
            {"role": "tool", "content": "8"}, {"role": "assistant", "content": "8."}]
    r = build(tok, {"chat_template": "qwen"}).tokenize({"messages": conv, "tools": tools})[0]
    text = tok.decode(r["input_ids"])
    assert "# Tools" in text and '"name": "add"' in text
    tt = T.trained_text(tok, r)
    assert tt == '<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 5}}\n</tool_call><|im_end|>8.<|im_end|>', tt

def test_split_thinking_trains_reasoning():
    tok = T.smollm2()
    conv = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>add them</think>4"}]
    r = build(tok, {"chat_template": "qwen3", "split_thinking": True}).tokenize({"messages": conv})[0]
    assert tok.decode(r["input_ids"]).endswith("<|im_start|>assistant\n<think>\nadd them\n</think>\n\n4<|im_end|>\n")
    # as in Axolotl 0.19.0: qwen3 writes `<think>\n` for a final assistant turn whatever it holds, so only what follows trains
    assert T.trained_text(tok, r) == "add them\n</think>\n\n4<|im_end|>"

@pytest.mark.parametrize("row,reason", [
    ({"messages": []}, "empty_conversation"), ({"other": 1}, "missing_field"),
    ({"messages": [{"role": "user", "content": 5}]}, "non_string_content"),
    ({"messages": [{"content": "x"}]}, "missing_field"), ({"messages": "nope"}, "bad_message"),
    ({"messages": [{"role": "user", "content": "q"}, 7]}, "bad_message"),
    # found by the RL fuzz: tool_calls that are not a list of objects were an unexpected ValueError
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": "0"}]}, "bad_tool_call"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [1]}]}, "bad_tool_call"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [{"function": "f"}]}]},
     "bad_tool_call"),
])
def test_bad_rows(row, reason):
    with pytest.raises(RowError) as e: build(T.smollm2(), {"chat_template": "chatml"}).tokenize(row)
    assert e.value.reason == reason
    assert "'" in e.value.detail or "JSON" in e.value.detail or reason in ("empty_conversation",), e.value.detail   # names the key

def test_sharegpt_preset():
    tok = T.smollm2()
    s = lookup("sharegpt").build(tok, {"chat_template": "chatml"})
    r = s.tokenize({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]})[0]
    assert T.trained_text(tok, r) == "Yo<|im_end|>"

# ---- property test ----------------------------------------------------------------------------
_text = st.one_of(st.just(""), st.text(min_size=0, max_size=40),
                  st.text(alphabet="ab é漢🙂\n\t ", min_size=200, max_size=600))
_msg = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool"]), "content": _text})

def _oracle(template, conv, tok):
    "Rendered text and content spans, computed without the strategy (llama3 trims contents)."
    if template == "chatml": head, tail, pre, strip = "<|im_start|>{}\n", "<|im_end|>\n", "", False
    else: head, tail, pre, strip = "<|start_header_id|>{}<|end_header_id|>\n\n", "<|eot_id|>", tok.bos_token, True
    text, spans = pre, []
    for m in conv:
        c = m["content"].strip() if strip else m["content"]
        text += head.format(m["role"])
        spans.append((len(text), len(text) + len(c)))
        text += c + tail
    return text, spans

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(conv=st.lists(_msg, min_size=1, max_size=6), mode=st.sampled_from(["turn", "all", "last"]),
       roles=st.sampled_from([["assistant"], ["user", "tool"], ["assistant", "system"]]),
       template=st.sampled_from(["chatml", "llama3"]))
def test_property_trained_tokens_inside_trained_turns(conv, mode, roles, template):
    tok = T.smollm2() if template == "chatml" else T.llama3()
    s = build(tok, {"chat_template": template, "train_on_eos": mode, "roles_to_train": roles})
    text, spans = _oracle(template, conv, tok)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    r = s.tokenize({"messages": conv})[0]
    assert r["input_ids"] == enc["input_ids"]
    end_tok = tok.convert_tokens_to_ids("<|im_end|>" if template == "chatml" else "<|eot_id|>")
    trained_spans = [sp for m, sp in zip(conv, spans) if m["role"] in roles]
    ends_after = {sp[1] for sp in spans}
    for (a, b), i, l in zip(enc["offset_mapping"], r["input_ids"], r["labels"]):
        inside = any(a < e and b > s0 for s0, e in trained_spans)
        if l != -100:
            assert l == i
            assert inside or (i == end_tok and a in ends_after), (text[a:b], a, b)
        elif b > a and any(s0 <= a and b <= e for s0, e in trained_spans):
            raise AssertionError(f"token {text[a:b]!r} inside a trained content is masked")
    # the terminators, per mode, as Axolotl 0.19.0 trains them: a turn whose content renders empty
    # trains nothing, not even its terminator; `last` is the last terminator of a trained turn
    term_labels = [l for i, l in zip(r["input_ids"], r["labels"]) if i == end_tok]
    located = [b > a and (m["role"] in roles or mode == "all") for m, (a, b) in zip(conv, spans)]
    last_k = max((k for k, m in enumerate(conv) if located[k] and m["role"] in roles), default=None)
    want = [located[k] and (m["role"] in roles) if mode == "turn" else located[k] if mode == "all" else (k == last_k)
            for k, m in enumerate(conv)]
    assert [l != -100 for l in term_labels] == want

@pytest.mark.parametrize("ds,cfg", [({"train_on_eos": "all"}, {}), ({}, {"train_on_inputs": True}), ({"train_on_eos": "turn"}, {})])
def test_empty_turn_trains_nothing_not_even_its_end(ds, cfg):
    "Axolotl 0.19.0: a turn with content '' trains no token, its end-of-turn token included (issue 12)."
    tok = T.smollm2()
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""},
            {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Yes."}]
    r = build(tok, {"chat_template": "chatml", **ds}, cfg).tokenize({"messages": conv})[0]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    ends = [l for i, l in zip(r["input_ids"], r["labels"]) if i == im_end]
    assert ends[1] == -100                      # the empty assistant turn's <|im_end|>
    assert ends[3] == im_end                    # the last assistant turn's is trained in every mode here
    inputs = cfg.get("train_on_inputs") or ds.get("train_on_eos") == "all"
    assert (ends[0] != -100) == bool(inputs) and (ends[2] != -100) == bool(inputs)

def test_training_detail_boundaries_and_empty_detail():
    "message_field_training_detail spans meet tokens the way Axolotl computes it; [] trains nothing (issue 12)."
    tok = T.smollm2()
    base = {"chat_template": "chatml", "message_field_training": "train", "message_field_training_detail": "detail"}
    text = "I'm doing very well, thank you!"
    def trained(detail, **m):
        conv = [{"role": "user", "content": "How are you?"}, {"role": "assistant", "content": text, "detail": detail, **m}]
        return T.trained_text(tok, build(tok, base).tokenize({"messages": conv})[0])
    assert trained([{"begin_offset": 9, "end_offset": 18, "train": True}]) == " very well<|im_end|>"
    assert trained([{"begin_offset": 8, "end_offset": 18, "train": True}]) == " very well<|im_end|>"   # 8: last char of " doing"
    assert trained([{"begin_offset": 9, "end_offset": 14, "train": True}]) == " very<|im_end|>"       # 14: first char of " well"
    assert trained([]) == ""                                   # an empty list: nothing, not even <|im_end|>
    assert trained([], train=True) == text + "<|im_end|>"      # the turn's own flag wins; no detail to apply then
    assert trained([{"begin_offset": 9, "end_offset": 18, "train": False}]) == "<|im_end|>"
