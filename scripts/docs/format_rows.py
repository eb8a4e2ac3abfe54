"""Example rows for the dataset-formats page: one small row per `type:`. Types not listed in ROWS get a row
built from the keys the registry says they read (FIELD_VALUES), so a newly registered format still
appears on the page."""

MSG = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]

FIELD_VALUES = {
    "instruction": "Name the capital of France.", "input": "", "output": "Paris.", "response": "Paris.",
    "question": "What is the capital of France?", "answer": "Paris.", "system": "Answer briefly.",
    "system_prompt": "Answer briefly.", "prompt": "What is the capital of France?", "chosen": "Paris.",
    "rejected": "Lyon.", "completion": "Paris.", "label": True, "text": "The capital of France is Paris.",
    "article": "Paris is the capital and largest city of France.", "summary": "Paris is France's capital.",
    "context": "Paris is the capital of France.", "category": "GEOGRAPHY", "message_1": "What is the capital of France?",
    "message_2": "Paris.", "generation": "Paris.", "INSTRUCTION": "Name the capital of France.", "RESPONSE": "Paris.",
    "revision": "Paris is the capital of France.", "reflection": "The answer is right but terse.",
    "corrected": "Paris is the capital of France.", "unanswerable_question": "Who founded Paris?",
    "choices": ["Lyon", "Paris", "Nice"], "solution": "B", "explanation": "Paris is the capital.",
    "scores": "3", "critiques": "Too short.", "messages": MSG, "input_ids": [1, 2, 3], "labels": [-100, 2, 3],
    "attention_mask": [1, 1, 1], "chosen_response": "Paris.", "rejected_response": "Lyon.",
}

ROWS = {
    "chat_template": MSG,
    "sharegpt": {"conversations": [{"from": "human", "value": "What is the capital of France?"}, {"from": "gpt", "value": "Paris."}]},
    "pygmalion": {"conversations": [{"role": "system", "value": "Enter RP mode."}, {"role": "human", "value": "Hello!"},
                                    {"role": "bot", "value": "Hi there."}]},
    "input_output": {"segments": [{"label": False, "text": "Q: capital of France?\n"}, {"label": True, "text": "A: Paris."}]},
    "completion": {"text": "The capital of France is Paris."},
    "pretokenized": {"input_ids": [1, 4093, 198, 2], "attention_mask": [1, 1, 1, 1], "labels": [-100, -100, 198, 2]},
    "user_defined": {"question": "What is the capital of France?", "answer": "Paris."},
    "alpaca": {"instruction": "Name the capital of the country.", "input": "France", "output": "Paris."},
    "stepwise_supervised": {"prompt": "What is 2+2*2?", "completions": ["2*2 = 4", "4 + 2 = 6"], "labels": [True, True]},
    "chat_template.argilla": {"chosen": MSG, "rejected": [MSG[0], {"role": "assistant", "content": "Lyon."}]},
    "chat_template.default": {"messages": [MSG[0]], "chosen": {"role": "assistant", "content": "Paris."},
                              "rejected": {"role": "assistant", "content": "Lyon."}},
    "bradley_terry.chat_template": {"input": "What is the capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
}
ROWS["chat_template"] = {"messages": MSG}
for fam in ("chatml", "llama3"):
    ROWS[f"{fam}.icr"] = {"input": "What is the capital of France?", "chosen": "Paris.", "rejected": "Lyon."}
    ROWS[f"{fam}.argilla_chat"] = ROWS["chat_template.argilla"]
    ROWS[f"{fam}.ultra"] = {"prompt": "What is the capital of France?", "chosen": [MSG[0], MSG[1]],
                            "rejected": [MSG[0], {"role": "assistant", "content": "Lyon."}]}

CONFIGS = {   # extra dataset-entry keys / top-level keys a type needs for its example
    "user_defined": ({"type": {"field_instruction": "question", "field_output": "answer",
                               "format": "Q: {instruction}\nA: ", "no_input_format": "Q: {instruction}\nA: "}}, {}),
    "pretokenized": ({"type": None}, {}),
    "chat_template": ({"chat_template": "tokenizer_default"}, {}),
    "stepwise_supervised": ({}, {"process_reward_model": True}),
    "bradley_terry.chat_template": ({}, {"reward_model": True}),
}


def _is_pref(name: str, spec) -> bool:
    return spec.target.startswith("ftkit.rl")


def example(name: str, spec) -> dict:
    "{config: YAML text, row, ds: the dataset entry, cfg: top-level config} for `name`."
    import yaml
    row = ROWS.get(name)
    if row is None:
        row = {f: FIELD_VALUES.get(f, f"<{f}>") for f in spec.fields}
    ds_extra, top = CONFIGS.get(name, ({}, {}))
    ds = {"path": "data.jsonl", "type": name, **ds_extra}
    if ds.get("type") is None:
        ds.pop("type")
    cfg = {"base_model": "smollm2-135m-instruct", "learning_rate": 2e-4, "sequence_len": 256, **top}
    if _is_pref(name, spec) and not top:
        cfg["rl"] = "dpo"
    config = yaml.safe_dump({**cfg, "datasets": [ds]}, sort_keys=False, default_flow_style=False, allow_unicode=True)
    return {"config": config, "row": row, "ds": ds, "cfg": cfg}
