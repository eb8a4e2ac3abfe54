"""ftkit.data: loading every local source, bad rows, length rules, merge/shuffle/split, the cache key
(every rule that must miss the cache has a test), the report and its warnings, num_proc parity."""
import json
import pytest
import ftkit_test_tokenizers as T
from ftkit.data import prepare, DataError, cache_key
from ftkit.train import preprocess as preprocess_main
from helpers import make_cfg

def conv(i, a=None):
    return {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": a or f"Answer {i}."}]}

def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n"); return path

@pytest.fixture()
def tok(): return T.smollm2()

@pytest.fixture()
def chat(tmp_path): return write_jsonl(tmp_path / "chat.jsonl", [conv(i) for i in range(20)])

def mk(tmp_path, path, **kw):
    ds = {"path": str(path), "type": "chat_template", "chat_template": "chatml"}
    ds.update(kw.pop("ds", {}))
    return {"datasets": [ds], "sequence_len": 128, "dataset_prepared_path": str(tmp_path / "prep"),
            "shuffle_merged_datasets": False, **kw}

def run(cfg, tok, **kw): return prepare(make_cfg(**cfg), tok, quiet=True, **kw)

# ---- loading ---------------------------------------------------------------------------------
def test_load_formats_and_folders(tmp_path, tok):
    import datasets
    rows = [{"instruction": f"Say {i}", "input": "", "output": f"{i}"} for i in range(10)]
    d = datasets.Dataset.from_list(rows)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    d.to_csv(str(tmp_path / "a.csv")); d.to_parquet(str(tmp_path / "a.parquet"))
    d.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": d, "other": d.select(range(3))}).save_to_disk(str(tmp_path / "saved_dict"))
    folder = tmp_path / "folder"; folder.mkdir(); write_jsonl(folder / "x.jsonl", rows[:4]); write_jsonl(folder / "y.jsonl", rows[4:])
    arrow_src = datasets.load_from_disk(str(tmp_path / "saved"))
    arrow_file = next((tmp_path / "saved").glob("*.arrow"))
    want = None
    for path, extra in [(tmp_path / "a.json", {}), (tmp_path / "a.csv", {}), (tmp_path / "a.parquet", {}), (tmp_path / "saved", {}),
                        (tmp_path / "saved_dict", {}), (folder, {}), (arrow_file, {}),
                        ("json", {"data_files": [str(folder / "x.jsonl"), str(folder / "y.jsonl")]}),
                        (folder, {"data_files": ["x.jsonl", "y.jsonl"], "ds_type": "json"})]:
        cfg = {"datasets": [{"path": str(path), "type": "alpaca", **extra}], "sequence_len": 128, "shuffle_merged_datasets": False,
               "dataset_prepared_path": str(tmp_path / "prep")}
        p = run(cfg, tok)
        assert len(p.train) == 10, path
        want = want or p.train["input_ids"]
        assert p.train["input_ids"] == want, path
    p = run({**cfg, "datasets": [{"path": str(tmp_path / "saved_dict"), "split": "other", "type": "alpaca"}]}, tok)
    assert len(p.train) == 3
    saved = {**cfg, "datasets": [{"path": str(tmp_path / "saved"), "type": "alpaca"}]}
    assert run(saved, tok).report.from_cache                # datasets' cache-*.arrow files in the folder do not count
    with pytest.raises(DataError, match="split 'nope' not found"):
        run({**cfg, "datasets": [{"path": str(tmp_path / "saved_dict"), "split": "nope", "type": "alpaca"}]}, tok)

def test_missing_file_and_unreachable_hub(tmp_path, tok, monkeypatch):
    with pytest.raises(DataError, match="does not exist") as e: run(mk(tmp_path, "./nope/data.jsonl"), tok)
    assert "datasets[0].path" in str(e.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as e: run(mk(tmp_path, "someorg/some-dataset"), tok)
    msg = str(e.value)
    assert "someorg/some-dataset" in msg and "neither a local file or folder nor reachable" in msg and "fix:" in msg

def test_malformed_json_names_file_and_line(tmp_path, tok):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(conv(0)) + "\n" + json.dumps(conv(1)) + "\n{\"messages\": [}\n")
    with pytest.raises(DataError) as e: run(mk(tmp_path, p), tok)
    assert f"{p}:3" in str(e.value) and "not valid JSON" in str(e.value)

# ---- bad rows ---------------------------------------------------------------------------------
def test_bad_rows_counted_with_first_example_and_strict(tmp_path, tok):
    rows = [conv(0), {"messages": []}, conv(2), {"messages": [{"role": "robot", "content": "x"}]}, {"messages": [{"role": "user", "content": 7}]},
            {"nothing": 1}, {"messages": [{"role": "user", "content": "no answer"}]}, {"messages": []}]
    p = write_jsonl(tmp_path / "mixed.jsonl", rows)
    r = run(mk(tmp_path, p), tok).report
    assert r.rows_in == 8 and r.samples_out == 2
    assert r.dropped == {"empty_conversation": 2, "unknown_role": 1, "non_string_content": 1, "missing_field": 1, "no_trainable_tokens": 1}
    assert r.examples["empty_conversation"].startswith("datasets[0]") and "mixed.jsonl row 1" in r.examples["empty_conversation"]
    assert "robot" in r.examples["unknown_role"] and "row 3" in r.examples["unknown_role"]
    assert "dropped 6 rows" in str(r)
    with pytest.raises(DataError) as e: run(mk(tmp_path, p, strict=True), tok)
    assert "mixed.jsonl row 1" in str(e.value) and "empty_conversation" in str(e.value)

def test_everything_dropped_is_an_error(tmp_path, tok):
    p = write_jsonl(tmp_path / "none.jsonl", [{"messages": []}] * 3)
    with pytest.raises(DataError, match="no trainable rows"): run(mk(tmp_path, p), tok)

# ---- length rules -----------------------------------------------------------------------------
def test_excess_length_drop_truncate_and_min_len(tmp_path, tok):
    long = conv(0, "word " * 200)
    p = write_jsonl(tmp_path / "len.jsonl", [conv(1), long])
    r = run(mk(tmp_path, p, sequence_len=64), tok)
    assert len(r.train) == 1 and r.report.dropped == {"too_long": 1}
    r = run(mk(tmp_path, p, sequence_len=64, excess_length_strategy="truncate"), tok)
    assert len(r.train) == 2 and r.report.truncated == 1 and max(len(x) for x in r.train["input_ids"]) == 64
    assert all(len(a) == len(b) == len(c) for a, b, c in zip(r.train["input_ids"], r.train["labels"], r.train["attention_mask"]))
    n = min(len(x) for x in r.train["input_ids"])
    r = run(mk(tmp_path, p, sequence_len=64, excess_length_strategy="truncate", min_sample_len=n + 1), tok)
    assert len(r.train) == 1 and r.report.dropped == {"too_short": 1}

def test_completion_windows_counted(tmp_path, tok):
    p = write_jsonl(tmp_path / "text.jsonl", [{"text": "the quick brown fox " * 40}, {"text": "short"}])
    cfg = {"datasets": [{"path": str(p), "type": "completion"}], "sequence_len": 32, "shuffle_merged_datasets": False,
           "dataset_prepared_path": str(tmp_path / "prep")}
    r = run(cfg, tok)
    assert r.report.rows_in == 2 and len(r.train) > 2 and all(len(x) <= 32 for x in r.train["input_ids"])

# ---- merge, shuffle, split, dedup, shards -------------------------------------------------------
def test_merge_order_split_and_test_datasets(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", [conv(i) for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [conv(100 + i) for i in range(10)])
    cfg = mk(tmp_path, a); cfg["datasets"].append({"path": str(b), "type": "chat_template", "chat_template": "chatml"})
    p = run(cfg, tok)
    texts = [tok.decode(x) for x in p.train["input_ids"]]
    assert "Question 0?" in texts[0] and "Question 109?" in texts[-1]          # input order kept
    shuffled = run({**cfg, "shuffle_merged_datasets": True}, tok)
    assert sorted(map(tuple, shuffled.train["input_ids"])) == sorted(map(tuple, p.train["input_ids"]))
    assert shuffled.train["input_ids"] != p.train["input_ids"]
    assert len(run({**cfg, "val_set_size": 0.25}, tok).eval) == 5
    s = run({**cfg, "val_set_size": 3}, tok)
    assert len(s.eval) == 3 and len(s.train) == 17 and "Question 109?" in tok.decode(s.eval[-1]["input_ids"])
    t = run({**cfg, "test_datasets": [{"path": str(b), "type": "chat_template", "chat_template": "chatml"}]}, tok)
    assert len(t.train) == 20 and len(t.eval) == 10
    assert len(run({**cfg, "dataset_shard_num": 4, "dataset_shard_idx": 1}, tok).train) == 5

def test_dedup_and_entry_shards(tmp_path, tok):
    p = write_jsonl(tmp_path / "dup.jsonl", [conv(i % 4) for i in range(12)])
    r = run(mk(tmp_path, p, dataset_exact_deduplication=True), tok)
    assert len(r.train) == 4 and r.report.deduplicated == 8
    r = run(mk(tmp_path, p, ds={"shards": 3, "shards_idx": 2}), tok)
    assert r.report.rows_in == 4 and len(r.train) == 4

# ---- cache -----------------------------------------------------------------------------------
def test_cache_hit_then_every_rule_misses(tmp_path, tok, chat):
    base = mk(tmp_path, chat)
    first = run(base, tok)
    assert not first.report.from_cache and (first.cache_path / "train" / "state.json").exists()
    second = run(base, tok)
    assert second.report.from_cache and second.cache_path == first.cache_path
    assert second.train["labels"] == first.train["labels"]
    assert run({**base, "val_set_size": 2}, tok).report.from_cache            # split happens after the cache
    k0 = cache_key(make_cfg(**base), tok)[0]
    def key(cfg, t=tok): return cache_key(make_cfg(**cfg), t)[0]
    changed = {
        "sequence_len": {**base, "sequence_len": 256},
        "train_on_inputs": {**base, "train_on_inputs": True},
        "global chat_template": {**base, "chat_template": "llama3"},
        "eot_tokens": {**base, "eot_tokens": ["<|endoftext|>"]},
        "excess_length_strategy": {**base, "excess_length_strategy": "truncate"},
        "seed": {**base, "seed": 7},
    }
    for k in ("roles_to_train", "train_on_eos", "field_messages", "message_property_mappings", "chat_template", "drop_system_message",
              "message_field_training", "split"):
        val = {"roles_to_train": ["user"], "train_on_eos": "all", "field_messages": "msgs", "message_property_mappings": {"role": "r"},
               "chat_template": "qwen", "drop_system_message": True, "message_field_training": "train", "split": "train[:5]"}[k]
        changed[f"datasets[0].{k}"] = {**base, "datasets": [{**base["datasets"][0], k: val}]}
    for name, cfg in changed.items():
        assert key(cfg) != k0, name
    # the dataset file's content, with the same name, size and path
    chat.write_text(chat.read_text().replace("Answer 3.", "Answer 4."))
    assert key(base) != k0
    assert not run(base, tok).report.from_cache
    # the tokenizer: a different EOS, or an added special token
    import copy
    t2 = copy.deepcopy(tok); t2.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    assert key(base, t2) != key(base)
    t3 = copy.deepcopy(tok); t3.eos_token = "<|endoftext|>"
    assert key(base, t3) != key(base)
    # the chat template text inside the tokenizer (tokenizer_default)
    cfg_td = {**base, "datasets": [{"path": str(chat), "type": "chat_template"}]}
    t4 = copy.deepcopy(tok); t4.chat_template = tok.chat_template.replace("helpful", "useful")
    assert key(cfg_td, t4) != key(cfg_td)

def test_cache_written_with_save_to_disk_and_columns(tmp_path, tok, chat):
    import datasets
    p = run(mk(tmp_path, chat), tok)
    d = datasets.load_from_disk(str(p.cache_path / "train"))
    assert d.column_names == ["input_ids", "attention_mask", "labels"] and len(d) == 20
    assert json.loads((p.cache_path / "inputs.json").read_text())["global"]["sequence_len"] == 128

def test_default_cache_folder(tmp_path, tok, chat, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = mk(tmp_path, chat); cfg.pop("dataset_prepared_path")
    p = run(cfg, tok)
    assert p.cache_path.parent.resolve() == (tmp_path / "last_run_prepared").resolve() and run(cfg, tok).report.from_cache

# ---- report ----------------------------------------------------------------------------------
def test_report_numbers(tmp_path, tok, chat):
    r = run(mk(tmp_path, chat), tok).report
    lens = [len(x) for x in run(mk(tmp_path, chat), tok).train["input_ids"]]
    assert r.lengths["min"] == min(lens) and r.lengths["max"] == max(lens) and r.tokens == sum(lens)
    assert 0 < r.trainable_fraction < 1 and sum(c for _, _, c in r.histogram) == 20
    assert not r.warnings
    s = str(r)
    assert "20 rows in" in s and "tokens per sample: min" in s and "trained tokens:" in s

def test_warning_eos_never_trained_and_template_eot(tmp_path, chat):
    tok = T.llama3(eos="<|end_of_text|>")       # a base-model EOS while the template ends turns with <|eot_id|>
    r = run(mk(tmp_path, chat, ds={"chat_template": "llama3"}), tok).report
    assert any("never trained" in w for w in r.warnings)
    assert any("'<|eot_id|>'" in w and "eot_tokens" in w for w in r.warnings)
    r = run({**mk(tmp_path, chat, ds={"chat_template": "llama3"}), "eot_tokens": ["<|eot_id|>"]}, tok).report
    assert not r.warnings

def test_num_proc_parity(tmp_path, tok):
    p = write_jsonl(tmp_path / "many.jsonl", [conv(i) for i in range(2500)])
    one = prepare(make_cfg(**mk(tmp_path, p, dataset_num_proc=1)), tok, quiet=True, use_cache=False)
    two = prepare(make_cfg(**mk(tmp_path, p, dataset_num_proc=2)), tok, quiet=True, use_cache=False)
    assert one.train["input_ids"] == two.train["input_ids"] and one.train["labels"] == two.train["labels"]

def test_preprocess_main_with_real_config(tmp_path, tok, chat, capsys):
    cfg = {**mk(tmp_path, chat), "learning_rate": 1e-4}
    p = preprocess_main(cfg, debug=True, num_examples=2, tokenizer=tok)
    out = capsys.readouterr().out
    assert "20 rows in" in out and out.count("Count of labels:") == 2 and "(-100, " in out
    from ftkit.config import load
    assert preprocess_main(load(cfg), tokenizer=tok).report.from_cache

def test_user_module_strategy_and_unexpected_errors(tmp_path, tok, monkeypatch):
    (tmp_path / "my_rules.py").write_text(
        "from ftkit.prompts.registry import PromptStrategy\n"
        "class S(PromptStrategy):\n"
        "    def __init__(self, tok): self.tok = tok\n"
        "    def tokenize_one(self, row):\n"
        "        if row['q'] == 'boom': raise ZeroDivisionError('bad luck')\n"
        "        ids = self.tok.encode(row['q'] + ' ' + row['a'], add_special_tokens=False)\n"
        "        return [{'input_ids': ids, 'attention_mask': [1] * len(ids), 'labels': ids}]\n"
        "def build(tok, ds, cfg): return S(tok)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    p = write_jsonl(tmp_path / "qa.jsonl", [{"q": "hi", "a": "yo"}, {"q": "boom", "a": "x"}, {"q": "why", "a": "because"}])
    cfg = {"datasets": [{"path": str(p), "type": "my_rules.build"}], "sequence_len": 64, "shuffle_merged_datasets": False,
           "dataset_prepared_path": str(tmp_path / "prep")}
    r = run(cfg, tok)
    assert len(r.train) == 2 and r.report.dropped == {"strategy_error": 1} and "ZeroDivisionError" in r.report.examples["strategy_error"]
