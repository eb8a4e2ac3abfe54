"""The conformance cases: configs x small datasets, each run through `axolotl preprocess` and
`ftkit preprocess` with the same YAML. A case is a name, one line saying what it checks, the global
keys it sets, and its datasets (a dataset entry plus the rows written to a JSONL file).

Plain data, importable from both interpreters (no ftkit, no axolotl)."""
from __future__ import annotations
import json
from dataclasses import dataclass, field
from pathlib import Path

@dataclass
class DS:
    entry: dict                    # the dataset entry, without path / ds_type
    rows: list[dict]

@dataclass
class Case:
    name: str
    what: str
    datasets: list[DS]
    config: dict = field(default_factory=dict)    # global keys (sequence_len, train_on_inputs, ...)

# --- rows ---------------------------------------------------------------------------------------
LONG = " ".join(f"Step {i}: multiply the running total by {i % 7 + 2} and note the result." for i in range(40))

def conv(*turns, key="messages", role="role", content="content", **extra):
    return {key: [{role: r, content: c} for r, c in turns], **extra}

CHAT = [
    conv(("user", "Hi"), ("assistant", "Hello there. How can I help?")),
    conv(("system", "You are terse."), ("user", "Add 3+5"), ("assistant", "8"), ("user", "And 2+2?"), ("assistant", "4")),
    conv(("user", "Grüße aus Köln — 漢字 and 🙂 emoji?"), ("assistant", "Ja! 漢字 means Chinese characters 🙂👍🏽.")),
    conv(("user", "Write the steps."), ("assistant", LONG)),
    conv(("user", "Show code:\n```py\nprint( 1 )\n```  "), ("assistant", "  Indented answer with trailing spaces   \n\n")),
    conv(("user", "Ends on a user turn"), ("assistant", "ok"), ("user", "still there?")),
]
EDGE = [
    conv(("user", "Hi"), ("assistant", ""), ("user", "Again?"), ("assistant", "Yes.")),
    conv(("user", ""), ("assistant", "Empty question, full answer.")),
    conv(("user", "Blank answer?"), ("assistant", " "), ("user", "Newline?"), ("assistant", "\n")),
    conv(("user", "   "), ("assistant", "\t tabbed \t")),
]
SHAREGPT = [conv(("human", "Hi"), ("gpt", "Hello!"), ("human", "Bye"), ("gpt", "Bye."), key="conversations", role="from", content="value"),
            conv(("system", "Be nice."), ("human", "Q?"), ("gpt", "A."), key="conversations", role="from", content="value")]
ALIAS = [conv(("person", "Hi"), ("bot", "Hello!"), ("person", "More?"), ("model", "Sure, more."), key="conversations",
              role="speaker", content="text"),
         conv(("narrator", "Once upon a time."), ("person", "Go on"), ("bot", "The end."), key="conversations", role="speaker", content="text")]
TEXT = "I'm doing very well, thank you!"      # tokens: I | 'm | doing | very | well | , | thank | you | !
_n = iter(range(1000))
def detail_row(detail, **flags):      # a distinct question per row, so rows can be told apart in the diff
    return {"messages": [{"role": "user", "content": f"How are you? ({next(_n)})", "train": None, "detail": None},
                         {"role": "assistant", "content": TEXT, "train": flags.get("train"), "detail": detail}]}
DETAIL = [
    detail_row([{"begin_offset": 9, "end_offset": 18, "train": True}]),
    detail_row([{"begin_offset": 8, "end_offset": 18, "train": True}]),        # begins on the last char of " doing"
    detail_row([{"begin_offset": 7, "end_offset": 18, "train": True}]),
    detail_row([{"begin_offset": 9, "end_offset": 14, "train": True}]),        # ends on the first char of " well"
    detail_row([{"begin_offset": 9, "end_offset": 15, "train": True}]),
    detail_row([{"begin_offset": 0, "end_offset": 8, "train": False}, {"begin_offset": 9, "end_offset": 18, "train": True},
                {"begin_offset": 19, "end_offset": 30, "train": False}]),
    detail_row([{"begin_offset": 2, "end_offset": 3, "train": True}]),         # inside tokens only
    detail_row([], train=True),
    detail_row([], train=False),
    detail_row([{"begin_offset": 0, "end_offset": 30, "train": True}], train=False),
    detail_row([{"begin_offset": 21, "end_offset": 30, "train": True}], train=True),
    detail_row([]),                                                           # nothing trained: the row is dropped
]
FIELD_SYSTEM = [dict(conv(("user", "Hi"), ("assistant", "Hello.")), sys="You speak like a pirate."),
                dict(conv(("system", "Own system."), ("user", "Hi"), ("assistant", "Hello.")), sys="Column system.")]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                            "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}]
TOOL_ROWS = [{"tools": json.dumps(TOOLS), "messages": [
    {"role": "user", "content": "Hi", "tool_calls": None}, {"role": "assistant", "content": "Hello.", "tool_calls": None}]},
    {"tools": json.dumps(TOOLS), "messages": [
    {"role": "user", "content": "3+5?", "tool_calls": None},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": "{\"a\": 3, \"b\": 5}"}}]},
    {"role": "tool", "content": "8", "tool_calls": None}, {"role": "assistant", "content": "It is 8.", "tool_calls": None}]}]
TOOL_JINJA = ("{% if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif %}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
              "{{ message['content'] }}{% if message.tool_calls %}{% for tc in message.tool_calls %}<call>{{ tc.function.name }}"
              "({{ tc.function.arguments | tojson }})</call>{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PLAIN_JINJA = ("{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n{% else %}A: {{ m['content'] }}{{ eos_token }}\n"
               "{% endif %}{% endfor %}")
EOS_LAST_JINJA = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"   # ends on the EOS
EMPTY_FIRST = [conv(("user", ""), ("assistant", "Hi.")), conv(("user", "Hi"), ("assistant", "Hello."))]
EOS_FIRST_JINJA = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}\n{% endfor %}"   # an empty first turn: EOS at token 0
THINK = [conv(("user", "2+2?"), ("assistant", "<think>add two and two</think>4")),
         {"messages": [{"role": "user", "content": "3+3?", "reasoning_content": None},
                       {"role": "assistant", "content": "6", "reasoning_content": "three doubled"}]}]
ALPACA = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
          {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour."},
          {"instruction": "Summarise: 漢字 🙂", "input": "Grüße", "output": "A greeting with emoji 🙂."},
          {"instruction": "Long one.", "input": "", "output": LONG}]
QA = [{"question": "What is 2+2?", "answer": "4"}, {"question": "Capital of France?", "answer": "Paris."}]

def pair(rows):
    "Two rows at least: Axolotl's preprocess picks its debug row with randrange(0, len - 1), which fails on one row."
    if len(rows) > 1: return rows
    return rows + [{k: (v + " Again." if isinstance(v, str) else v) for k, v in rows[0].items()}]

def inst(type_, rows, **entry): return DS({"type": type_, **entry}, pair(rows))
def chat(rows, **entry): return DS({"type": "chat_template", **entry}, rows)

CASES: list[Case] = [
    # --- chat_template ---------------------------------------------------------------------------
    Case("ct_tokenizer_default", "chat_template with the tokenizer's own template (SmolLM2 ChatML + default system)", [chat(CHAT)]),
    Case("ct_chatml", "chat_template: chatml", [chat(CHAT, chat_template="chatml")]),
    Case("ct_global_template", "a top-level chat_template is used by the dataset", [chat(CHAT)], {"chat_template": "chatml"}),
    Case("ct_eos_all", "train_on_eos: all", [chat(CHAT, train_on_eos="all")]),
    Case("ct_eos_last", "train_on_eos: last", [chat(CHAT, train_on_eos="last")]),
    Case("ct_eos_none", "train_on_eos: none", [chat(CHAT, train_on_eos="none")]),
    Case("ct_roles_user", "roles_to_train: [user]", [chat(CHAT, roles_to_train=["user"])]),
    Case("ct_roles_all", "roles_to_train: [system, user, assistant]", [chat(CHAT, roles_to_train=["system", "user", "assistant"])]),
    Case("ct_train_on_inputs", "train_on_inputs: true", [chat(CHAT)], {"train_on_inputs": True}),
    Case("ct_eot_tokens", "eot_tokens given, EOS a different token (special_tokens.eos_token), train_on_eot: all",
         [chat(CHAT, train_on_eos="turn", train_on_eot="all")],
         {"eot_tokens": ["<|im_end|>"], "special_tokens": {"eos_token": "<|endoftext|>"}}),
    Case("ct_empty_turns_turn", "empty and whitespace contents, train_on_eos: turn", [chat(EDGE)]),
    Case("ct_empty_turns_all", "empty and whitespace contents, train_on_eos: all (issue 12.3)", [chat(EDGE, train_on_eos="all")]),
    Case("ct_empty_turns_inputs", "empty and whitespace contents, train_on_inputs (issue 12.3)", [chat(EDGE)], {"train_on_inputs": True}),
    Case("ct_empty_last_turn_eos", "an empty last turn in a template that ends the conversation on EOS",
         [chat([conv(("user", "Hi"), ("assistant", "Hello.")), conv(("user", "Hi"), ("assistant", "Hello."), ("user", "Bye"), ("assistant", ""))],
               chat_template="jinja", chat_template_jinja=EOS_LAST_JINJA)]),
    Case("ct_empty_first_turn_eos", "an empty first turn whose EOS is token 0, train_on_eos: all (Axolotl's lookup from index -1)",
         [chat(EMPTY_FIRST, chat_template="jinja", chat_template_jinja=EOS_FIRST_JINJA, train_on_eos="all")]),
    Case("ct_sharegpt_mapping", "field_messages + message_property_mappings (ShareGPT from/value)",
         [chat(SHAREGPT, field_messages="conversations", message_property_mappings={"role": "from", "content": "value"})]),
    Case("ct_legacy_fields", "message_field_role / message_field_content (legacy keys)",
         [chat(SHAREGPT, field_messages="conversations", message_field_role="from", message_field_content="value")]),
    Case("ct_roles_alias", "roles: with several aliases, roles_to_train naming a dataset alias (issue 12.2)",
         [chat(ALIAS, field_messages="conversations", message_property_mappings={"role": "speaker", "content": "text"},
               roles={"user": ["person"], "assistant": ["bot", "model"], "system": ["narrator"]}, roles_to_train=["model"])]),
    Case("ct_roles_replace_default", "a roles: mapping replaces the default one; a role it leaves out (human) is not renamed",
         [chat(SHAREGPT, field_messages="conversations", message_property_mappings={"role": "from", "content": "value"},
               roles={"assistant": ["gpt"]})]),
    Case("ct_detail", "message_field_training + message_field_training_detail spans (issue 12.4)",
         [chat(DETAIL, roles_to_train=[], message_field_training="train", message_field_training_detail="detail")]),
    Case("ct_detail_roles", "training_detail with roles_to_train: [assistant] and train_on_eos: all",
         [chat(DETAIL, message_field_training="train", message_field_training_detail="detail", train_on_eos="all")]),
    Case("ct_field_system", "field_system column (ignored when the messages have a system turn)", [chat(FIELD_SYSTEM, field_system="sys")]),
    Case("ct_drop_system", "drop_system_message", [chat(CHAT, drop_system_message=True)]),
    Case("ct_jinja", "chat_template: jinja with an inline template (EOS from the template variable)",
         [chat(CHAT, chat_template="jinja", chat_template_jinja=PLAIN_JINJA)]),
    Case("ct_tools", "tools column (JSON string) and assistant tool_calls, jinja template",
         [chat(TOOL_ROWS, chat_template="jinja", chat_template_jinja=TOOL_JINJA)]),
    Case("ct_tpl_llama3", "chat_template: llama3 (built-in) on the SmolLM2 tokenizer", [chat(CHAT, chat_template="llama3")]),
    Case("ct_tpl_gemma", "chat_template: gemma (built-in), conversations without a system turn",
         [chat([r for r in CHAT if r["messages"][0]["role"] != "system"], chat_template="gemma")]),
    Case("ct_tpl_gemma_system", "chat_template: gemma with a system turn", [chat(CHAT[:2], chat_template="gemma")]),
    Case("ct_tpl_phi_3", "chat_template: phi_3 (built-in)", [chat(CHAT, chat_template="phi_3")]),
    Case("ct_tpl_alpaca", "chat_template: alpaca (built-in)", [chat(CHAT, chat_template="alpaca")]),
    Case("ct_tpl_metharme", "chat_template: metharme (built-in)", [chat(CHAT, chat_template="metharme")]),
    Case("ct_tpl_qwen3", "chat_template: qwen3 with reasoning_content and split_thinking", [chat(THINK, chat_template="qwen3", split_thinking=True)]),
    Case("ct_tpl_fallback", "tokenizer_default_fallback_chatml (the tokenizer has a template)", [chat(CHAT, chat_template="tokenizer_default_fallback_chatml")]),
    Case("ct_tpl_qwen_25", "chat_template: qwen_25 (Axolotl's name for Qwen2.5)", [chat(CHAT, chat_template="qwen_25")]),
    Case("ct_tpl_qwen_25_tools", "chat_template: qwen_25 with tools and a tool-call turn", [chat(TOOL_ROWS, chat_template="qwen_25")]),
    Case("ct_tpl_mistral_v1", "chat_template: mistral_v1 (Axolotl's name)", [chat([CHAT[1], CHAT[2]], chat_template="mistral_v1")]),
    Case("ct_thinking_keys", "field_thinking / template_thinking_key name the reasoning key (qwen3)",
         [chat([{"messages": [{"role": "user", "content": "3+3?", "thought": None}, {"role": "assistant", "content": "6", "thought": "three doubled"}]},
                {"messages": [{"role": "user", "content": "1+1?", "thought": None}, {"role": "assistant", "content": "2", "thought": "one more"}]}],
               chat_template="qwen3", field_thinking="thought", template_thinking_key="reasoning_content")]),
    Case("ct_template_kwargs", "chat_template_kwargs reach the template", [chat(CHAT[:2], chat_template="jinja",
         chat_template_jinja="{{ greeting }}\n" + PLAIN_JINJA)], {"chat_template_kwargs": {"greeting": "Welcome!"}}),
    Case("ct_default_system_message", "default_system_message with chatml", [chat(CHAT, chat_template="chatml")],
         {"default_system_message": "You are a careful assistant."}),
    Case("ct_truncate", "sequence_len 48 with excess_length_strategy: truncate", [chat(CHAT)], {"sequence_len": 48, "excess_length_strategy": "truncate"}),
    Case("ct_drop_long", "sequence_len 48: longer rows dropped", [chat(CHAT)], {"sequence_len": 48}),
    # --- instruct family --------------------------------------------------------------------------
    Case("alpaca", "type: alpaca (with and without input)", [inst("alpaca", ALPACA)]),
    Case("alpaca_missing_field", "a row without its output field among good rows", [inst("alpaca", ALPACA[:2] + [{"instruction": "No output."}])]),
    Case("alpaca_inputs", "type: alpaca with train_on_inputs", [inst("alpaca", ALPACA)], {"train_on_inputs": True}),
    Case("alpaca_chat", "type: alpaca_chat reads instruction/input/output (issue 12.1)", [inst("alpaca_chat", ALPACA)]),
    Case("alpaca_chat_qa", "alpaca_chat.load_qa", [inst("alpaca_chat.load_qa", QA)]),
    Case("alpaca_chat_concise", "alpaca_chat.load_concise", [inst("alpaca_chat.load_concise", ALPACA)]),
    Case("alpaca_chat_camel", "alpaca_chat.load_camel_ai", [inst("alpaca_chat.load_camel_ai", [{"message_1": "Teach me.", "message_2": "Sure."}])]),
    Case("open_orca", "alpaca_w_system.load_open_orca", [inst("alpaca_w_system.load_open_orca",
         [{"system_prompt": "Be brief.", "question": "Why?", "response": "Because."}, {"system_prompt": "", "question": "No system?", "response": "Fine."}])]),
    Case("orcamini", "orcamini (OpenOrca fields, `### System:` layout)", [inst("orcamini", [{"system_prompt": "Be brief.", "question": "Why?", "response": "Because."}])]),
    Case("jeopardy", "jeopardy", [inst("jeopardy", [{"question": "This planet is red.", "category": "SPACE", "answer": "Mars"}])]),
    Case("oasst", "oasst", [inst("oasst", [{"INSTRUCTION": "Say hi.", "RESPONSE": "Hi!"}])]),
    Case("gpteacher", "gpteacher", [inst("gpteacher", [{"instruction": "Add.", "input": "2 and 3", "response": "5"},
                                                       {"instruction": "Greet.", "input": "", "response": "Hello."}])]),
    Case("reflection", "reflection", [inst("reflection", [{"instruction": "Why is the sky blue?", "input": "", "output": "Scattering.",
                                                           "reflection": "Too short.", "corrected": "Rayleigh scattering of sunlight."}])]),
    Case("explainchoice", "explainchoice", [inst("explainchoice", [{"question": "2+2?", "choices": ["3", "4"], "solution": "4", "explanation": "Add them."}])]),
    Case("concisechoice", "concisechoice", [inst("concisechoice", [{"question": "2+2?", "choices": ["3", "4"], "solution": "4", "explanation": "Add them."}])]),
    Case("summarizetldr", "summarizetldr", [inst("summarizetldr", [{"article": "A long article about cats.", "summary": "Cats."}])]),
    Case("context_qa", "context_qa", [inst("context_qa", [{"article": "Paris is in France.", "question": "Where is Paris?", "answer": "France."}])]),
    Case("context_qa_v2", "context_qa.load_v2", [inst("context_qa.load_v2", [{"context": "Paris is in France.", "question": "Where is Paris?", "answer": "France."}])]),
    Case("context_qa_404", "context_qa.load_404", [inst("context_qa.load_404", [{"article": "Paris is in France.", "unanswerable_question": "Who won in 1990?"}])]),
    Case("creative_answer", "creative_acr.load_answer", [inst("creative_acr.load_answer", [{"instruction": "Write a haiku.", "revision": "Leaves fall."}])]),
    Case("creative_critique", "creative_acr.load_critique (ftkit's own rubric wording: a known difference)", [inst("creative_acr.load_critique",
         [{"instruction": "Write a haiku.", "answer": "Leaves fall.", "scores": {"creativity": 6, "refusal": 10},
           "critiques": {"creativity": {"explanation": "Plain.", "improvements": "Add an image."}}}])], {"sequence_len": 1024}),
    Case("creative_revise", "creative_acr.load_revise (ftkit's own rubric wording: a known difference)", [inst("creative_acr.load_revise",
         [{"instruction": "Write a haiku.", "answer": "Leaves fall.", "revision": "Red leaves drift down.", "scores": {"creativity": 6},
           "critiques": {"creativity": {"explanation": "Plain.", "improvements": "Add an image."}}}])]),
    Case("metharme", "metharme (several EOS tokens)", [inst("metharme", [{"prompt": "<|user|>Hi<|model|>", "generation": "Hello."}])]),
    Case("user_defined", "user-defined instruct format (type: mapping)",
         [DS({"type": {"field_instruction": "q", "field_output": "a", "format": "[INST] {instruction} {input} [/INST]",
                       "no_input_format": "[INST] {instruction} [/INST]", "system_prompt": "Sys.", "system_format": "<<{system}>>"}},
             [{"q": "Hi", "a": "Hello."}, {"q": "Hi", "input": "there", "a": "Hello again."}])]),
    Case("pygmalion", "type: pygmalion (system / human / bot conversations)", [inst("pygmalion", [
        {"conversations": [{"role": "system", "value": "A cheerful pirate.\n<START>"}, {"role": "human", "value": "Hi there "},
                           {"role": "bot", "value": " Arr, hello!"}, {"role": "human", "value": "Bye"}, {"role": "bot", "value": "Farewell."}]},
        {"conversations": [{"role": "human", "value": "Who are you?"}, {"role": "bot", "value": "A pirate 🏴‍☠️."}]}])]),
    Case("sharegpt_type", "type: sharegpt (deprecated; ftkit keeps it as a chat_template preset)", [inst("sharegpt", SHAREGPT, chat_template="chatml")]),
    # --- template-free, completion, pre-tokenized -----------------------------------------------------
    Case("input_output", "type: input_output segments", [inst("input_output", [
        {"segments": [{"label": False, "text": "<|im_start|>user\nHi<|im_end|>\n"}, {"label": True, "text": "<|im_start|>assistant\nHello<|im_end|>"}]},
        {"segments": [{"label": True, "text": "Hello"}, {"label": False, "text": " hi there!. "}, {"label": True, "text": "goodbye farewell"}]}])]),
    Case("completion", "type: completion (long text cut into sequence_len windows)", [inst("completion", [{"text": "Short text."}, {"text": LONG}])],
         {"sequence_len": 64}),
    Case("completion_field", "type: completion with field:", [inst("completion", [{"body": "Body text here."}], field="body")]),
    Case("pretokenized", "empty type: rows already tokenized", [DS({}, [
        {"input_ids": [1, 9690, 198, 19556, 2], "attention_mask": [1, 1, 1, 1, 1], "labels": [-100, -100, -100, 19556, 2]},
        {"input_ids": [19556, 665, 30], "attention_mask": [1, 1, 1], "labels": [19556, 665, 30]}])]),
    # --- several datasets -----------------------------------------------------------------------------
    Case("merged", "three datasets of different types merged (order kept: shuffle_merged_datasets false)",
         [chat(CHAT[:3]), inst("alpaca", ALPACA[:2]), chat(SHAREGPT, field_messages="conversations",
                                                          message_property_mappings={"role": "from", "content": "value"}, train_on_eos="all")]),
]

BASE = {"sequence_len": 256, "micro_batch_size": 1, "gradient_accumulation_steps": 1, "learning_rate": 1e-4, "num_epochs": 1,
        "shuffle_merged_datasets": False, "dataset_num_proc": 1}

def write_case(case: Case, root: Path, tokenizer_dir: str, side: str) -> Path:
    "Write the case's data and its YAML for `side` ('axolotl' or 'ftkit'); returns the YAML path."
    import yaml
    d = root / case.name; d.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, ds in enumerate(case.datasets):
        p = d / f"data{i}.jsonl"
        p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ds.rows))
        entries.append({"path": str(p), "ds_type": "json", **ds.entry})
    cfg = {"base_model": tokenizer_dir, **BASE, **case.config, "datasets": entries,
           "dataset_prepared_path": str(d / f"prepared-{side}"), "output_dir": str(d / f"out-{side}")}
    y = d / f"{side}.yml"
    y.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return y
