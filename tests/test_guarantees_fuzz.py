"""Guarantee 4, bad input never crashes: hypothesis throws random and hostile input at the config loader (random YAML,
YAML-like token soup, wrong types for every schema key, deep nesting, alias bombs, huge documents, random bytes, Latin-1,
UTF-16/32 with and without BOM) and at the data pipeline (every supervised dataset type's strategy through the real
tokenize step with random rows, enormous and invalid strings; and real files through `ftkit.data.prepare`: broken JSON
lines, missing fields, wrong roles, invalid UTF-8, empty files, folders, missing paths). Each case must end in ftkit's own
error (FtkitError) that names the key / line or the file / row, or in a counted drop, within a time bound and without
blowing up memory. The number of cases run is recorded for RELIABILITY.md."""
import json
import resource
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ftkit.config import load
from ftkit.errors import ConfigError, FtkitError
from guarantees_util import record

pytestmark = pytest.mark.slow
N = Counter()               # cases per family
FINDINGS = Counter()        # config rules that raised on odd input (shown as an 'internal check ... failed' warning)
T_MAX = 10.0                # CPU seconds one case may take (CPU time: CI machines are shared, wall time is noisy)
BASE = {"base_model": "smollm2-135m-instruct", "datasets": [{"path": "d.jsonl", "type": "alpaca"}], "learning_rate": 1e-4}
FAST = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))
S = lambda n: settings(FAST, max_examples=n)


def check_config(source, family):
    "load(source) returns a config or raises an FtkitError whose problems each name a key, a line or the file's size/encoding."
    t = time.process_time()
    try:
        load(source)
        outcome = "ok"
    except ConfigError as e:
        assert e.problems, e
        for p in e.problems:
            if p.message.startswith("internal check "):      # a rule that crashed on odd input: reported, never hides the errors
                FINDINGS[p.message.split(" failed")[0][len("internal check "):]] += 1
                continue
            assert p.message and (p.key or p.line is not None or any(w in p.message for w in (
                "unknown key", "bytes", "characters", "config file", "a config must be"))), str(e)
        outcome = "error"
    except FtkitError:
        outcome = "error"
    dt = time.process_time() - t
    assert dt < T_MAX, f"{family}: {dt:.1f} CPU s"
    N[family] += 1
    N[f"{family}:{outcome}"] += 1


# ---------------------------------------------------------------- the config loader
TOKENS = [":", ": ", "-", "- ", " ", "  ", "\n", "\n  ", "&a ", "*a", "&b ", "*b", "<<: ", "[", "]", "{", "}", ",", "?", "|", ">",
          "#", "\t", "'", '"', "!!python/object:os.system", "!!binary", "%YAML 1.2\n", "---\n", "...\n", "0x1f", ".inf", ".nan",
          "1e-4", "2e-4", "null", "~", "true", "no", "base_model", "learning_rate", "datasets", "path", "type", "lora_r",
          "micro_batch_size", "\u00e9", "\ufeff", "\x00", "\x85", "\u2028", "é", "日本"]


@S(2500)
@given(st.text(max_size=200))
def test_fuzz_config_random_text(text):
    check_config(text if "\n" in text else text + "\n", "yaml_text")


@S(2500)
@given(st.lists(st.sampled_from(TOKENS), max_size=60).map("".join))
def test_fuzz_config_yaml_token_soup(text):
    check_config(text + "\n", "yaml_tokens")


_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                  st.text(max_size=20), st.binary(max_size=8))
_value = st.recursive(_leaf, lambda ch: st.one_of(st.lists(ch, max_size=4), st.dictionaries(st.text(max_size=8), ch, max_size=4)),
                      max_leaves=12)


def _schema_keys():
    from ftkit.config import FinetuneConfig
    return sorted(FinetuneConfig.model_fields)


@S(2500)
@given(st.data())
def test_fuzz_config_wrong_types_for_every_key(data):
    keys = _schema_keys()
    d = dict(BASE)
    for k in data.draw(st.lists(st.sampled_from(keys), min_size=1, max_size=4)):
        d[k] = data.draw(_value)
    if data.draw(st.booleans()):
        d["datasets"] = [data.draw(st.dictionaries(st.sampled_from(["path", "type", "split", "field_messages", "roles",
                                                                    "message_property_mappings", "chat_template", "ds_type",
                                                                    "shards", "shards_idx", "data_files", "name"]), _value, max_size=5))]
    check_config(d, "typed_dict")


@S(1000)
@given(st.dictionaries(st.text(max_size=12), _value, max_size=8))
def test_fuzz_config_random_mappings(d):
    check_config(d, "random_dict")


ENCODINGS = ["latin-1", "cp1252", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig", "utf-8"]


@S(1500)
@given(st.one_of(st.binary(max_size=300),
                 st.tuples(st.text(max_size=60), st.sampled_from(ENCODINGS)).map(
                     lambda t: (f"base_model: smollm2-135m-instruct\nlearning_rate: 1e-4\nname: {t[0]}\n"
                                "datasets:\n  - path: d.jsonl\n    type: alpaca\n").encode(t[1], errors="replace"))))
def test_fuzz_config_files_bytes_and_encodings(tmp_path_factory, raw):
    p = tmp_path_factory.getbasetemp() / "fuzz_cfg.yml"
    p.write_bytes(raw)
    check_config(p, "file_bytes")


@S(150)
@given(st.integers(1, 20000), st.sampled_from(["[", "{a: ", "- ", "a:\n"]))
def test_fuzz_config_deep_nesting(n, opener):
    if opener == "[": text = "x: " + "[" * n + "]" * n
    elif opener == "{a: ": text = "x: " + "{a: " * n + "1" + "}" * n
    elif opener == "- ": text = "x:\n" + "".join("  " * i + "-\n" for i in range(min(n, 3000)))
    else: text = "".join("  " * i + "a:\n" for i in range(min(n, 3000)))
    check_config(text, "deep_nesting")


@S(120)
@given(st.integers(2, 14), st.integers(2, 14), st.booleans())
def test_fuzz_config_alias_bombs(levels, width, as_mapping):
    lines = ["a0: &a0 [lol, lol]"]
    for i in range(1, levels):
        refs = ", ".join([f"*a{i-1}"] * width)
        lines.append(f"a{i}: &a{i} " + ("{" + ", ".join(f"k{j}: *a{i-1}" for j in range(width)) + "}" if as_mapping else f"[{refs}]"))
    lines += ["base_model: smollm2-135m-instruct", "learning_rate: 1e-4", f"datasets: *a{levels - 1}"]
    check_config("\n".join(lines) + "\n", "alias_bomb")


@S(12)
@given(st.sampled_from([10_000, 200_000, 600_000, 2_000_000]), st.sampled_from(["keys", "string", "list"]))
def test_fuzz_config_huge_documents(n, shape):
    if shape == "keys": text = "".join(f"k{i}: {i}\n" for i in range(n // 8))
    elif shape == "string": text = "base_model: " + "x" * n + "\n"
    else: text = "datasets:\n" + "  - {path: a.jsonl, type: alpaca}\n" * (n // 32)
    check_config(text, "huge_document")


def test_yaml_with_500k_unknown_keys_is_refused_at_once():
    text = "".join(f"unknown_key_{i}: 1\n" for i in range(500_000))
    t = time.process_time()
    with pytest.raises(ConfigError) as e:
        load(text)
    assert time.process_time() - t < 2 and "at most" in str(e.value)
    N["huge_document"] += 1


# ---------------------------------------------------------------- the data pipeline
@pytest.fixture(scope="module")
def tok():
    from ftkit_test_tokenizers import smollm2
    return smollm2()


def _sft_types():
    from ftkit.prompts.registry import REGISTRY, known_types
    return [n for n in known_types() if not REGISTRY[n].target.startswith("ftkit.rl")]


_text = st.one_of(st.text(max_size=40), st.just(""), st.just("\ud800 lone surrogate"), st.just("x" * 200_000),
                  st.just("<|im_end|><|im_start|>assistant\n"), st.just("{{ 7 * 7 }}"), st.just("\x00\x01\x02"))
_role = st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "human", "gpt", "bot", ""]), st.text(max_size=6))
_message = st.dictionaries(st.sampled_from(["role", "content", "from", "value", "tool_calls", "weight", "train"]),
                           st.one_of(_text, _role, st.integers(), st.none(), st.lists(st.text(max_size=5), max_size=2)), max_size=4)
_field = st.one_of(_text, st.integers(), st.none(), st.booleans(), st.lists(_message, max_size=4),
                   st.lists(st.integers(-5, 70000), max_size=20),
                   st.lists(st.dictionaries(st.sampled_from(["text", "label"]), st.one_of(_text, st.booleans(), st.integers()), max_size=2), max_size=3))
ROW_KEYS = ["messages", "conversations", "text", "segments", "instruction", "input", "output", "response", "question", "answer",
            "category", "INSTRUCTION", "RESPONSE", "system", "prompt", "generation", "article", "summary", "choices", "solution",
            "explanation", "input_ids", "labels", "attention_mask", "context", "unanswerable_question", "scores", "critiques",
            "revision", "reflection", "corrected", "system_prompt", "message_1", "message_2", "conversation"]


@S(1800)
@given(st.data())
def test_fuzz_every_dataset_type_through_the_tokenize_step(tok, data):
    "Random rows through each supervised type's strategy and ftkit.data's tokenize step: a sample or a counted drop per row."
    from ftkit.config import load as load_cfg
    from ftkit.data import _tokenize_fn
    from ftkit.prompts.registry import resolve_type
    name = data.draw(st.sampled_from(_sft_types() + [None]))
    cfg = load_cfg({**BASE, "datasets": [{"path": "d.jsonl", "type": name}], "sequence_len": 64})
    entry = cfg.datasets[0]
    strat = resolve_type(name).build(tok, entry, cfg)
    rows = data.draw(st.lists(st.dictionaries(st.sampled_from(ROW_KEYS), _field, max_size=5), min_size=1, max_size=3))
    keys = sorted({k for r in rows for k in r})
    batch = {k: [r.get(k) for r in rows] for k in keys}
    t = time.process_time()
    out = _tokenize_fn(batch, list(range(len(rows))), strategy=strat, max_len=64, min_len=2, truncate=False,
                       term_ids=(tok.eos_token_id,))
    assert time.process_time() - t < T_MAX
    assert len(out["_drop"]) >= len(rows) and set(out["_row"]) <= set(range(len(rows)))
    for ids, lab, drop in zip(out["input_ids"], out["labels"], out["_drop"]):
        assert drop or (0 < len(ids) <= 64 and len(lab) == len(ids))
    N["dataset_type_rows"] += 1
    N["dataset_type_rows:dropped"] += sum(1 for d in out["_drop"] if d)


_line = st.one_of(
    st.builds(lambda r: json.dumps(r), st.dictionaries(st.sampled_from(ROW_KEYS), _field.filter(lambda v: not isinstance(v, str) or len(v) < 1000), max_size=4)),
    st.just('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'),
    st.just('{"instruction": "a", "output": "b"}'), st.just('{"text": "some text"}'),
    st.just('{"messages": [{"role": "wizard", "content": "hi"}]}'), st.just('{"messages": "not a list"}'),
    st.just('{"broken": '), st.just("not json at all"), st.just(""), st.just("[1, 2, 3]"), st.just('{"text": "' + "y" * 300_000 + '"}'),
)


@S(110)
@given(st.data())
def test_fuzz_dataset_files_through_prepare(tok, tmp_path_factory, data):
    "Real files (or folders, or missing paths) through ftkit.data.prepare: PreparedData with counted drops, or a DataError naming where."
    from ftkit.config import load as load_cfg
    from ftkit.data import prepare
    d = Path(tmp_path_factory.mktemp("fuzzdata"))
    kind = data.draw(st.sampled_from(["lines", "lines", "lines", "invalid_utf8", "empty", "folder", "missing", "folder_with_file"]))
    name = data.draw(st.sampled_from(["chat_template", "alpaca", "completion", "input_output", None, "sharegpt", "pygmalion"]))
    path = d / "data.jsonl"
    if kind == "lines": path.write_text("\n".join(data.draw(st.lists(_line, min_size=1, max_size=8))) + "\n")
    elif kind == "invalid_utf8": path.write_bytes(b'{"text": "ok"}\n{"text": "bad \xff\xfe bytes"}\n')
    elif kind == "empty": path.write_bytes(b"")
    elif kind == "folder": path = d / "folder"; path.mkdir()
    elif kind == "folder_with_file":
        path = d / "folder"; path.mkdir(); (path / "a.jsonl").write_text('{"text": "hello there"}\n{"oops": 1}\n')
    else: path = d / "missing.jsonl"
    extra = {}
    if name == "chat_template":          # hostile or broken templates too
        tpl = data.draw(st.sampled_from([None, "hello {% for m in messages %}[{{ m['role'] }}]{% endfor %}", "{{ undefined.x.y }}",
                                         "{% for m in messages %}", "{{ raise_exception('no') }}", "{% for m in messages %}{{ m }}{% endfor %}"]))
        if tpl: extra = {"chat_template": "jinja", "chat_template_jinja": tpl}
    cfg = load_cfg({**BASE, "datasets": [{"path": str(path), "type": name}], "sequence_len": 64, "dataset_prepared_path": str(d / "prep"), **extra})
    t = time.process_time()
    try:
        prep = prepare(cfg, tok, use_cache=False, quiet=True)
        assert len(prep.train) > 0 and sum(prep.report.dropped.values()) <= prep.report.rows_in   # what was dropped is counted
        outcome = "prepared"
    except FtkitError as e:
        where = getattr(e, "where", "") or ""
        assert where and ("datasets[0]" in where or path.name in where or str(path) in where), (str(e), where)
        outcome = "error"
    assert time.process_time() - t < T_MAX * 3
    N["dataset_files"] += 1
    N[f"dataset_files:{outcome}"] += 1


# ---------------------------------------------------------------- preference / RL data (dpo ipo simpo orpo kto grpo reward prm)
RL_METHODS = {"dpo": {"rl": "dpo"}, "ipo": {"rl": "ipo"}, "simpo": {"rl": "simpo"}, "orpo": {"rl": "orpo"}, "kto": {"rl": "kto"},
              "grpo": {"rl": "grpo"}, "reward": {"reward_model": True}, "prm": {"process_reward_model": True}}


def _rl_types(method):
    from ftkit.rl import KTO_PRESETS, PAIR_PRESETS
    if method == "prm": return ["stepwise_supervised"]
    if method == "grpo": return ["passthrough", "chat_template.default", None]
    presets = KTO_PRESETS if method == "kto" else PAIR_PRESETS
    fams = [f"{f}.{p}" for f in ("chatml", "llama3") for p in presets]
    plain = ["chat_template.default", "user_defined.default", "passthrough", None,
             {"field_prompt": "question", "field_chosen": "good", "field_rejected": "bad", "field_completion": "answer",
              "prompt_format": "Q: {prompt}", "chosen_format": "{chosen}!", "rejected_format": "{rejected}?"}]
    return fams + plain + (["chat_template.argilla"] if method == "orpo" else []) + (["bradley_terry.chat_template"] if method == "reward" else [])


RL_KEYS = ["prompt", "chosen", "rejected", "completion", "label", "messages", "instruction", "chosen_response", "rejected_response",
           "input", "question", "system", "completions", "labels", "good", "bad", "answer", "conversation"]
_rl_value = st.one_of(_text, st.integers(), st.none(), st.booleans(), st.floats(allow_nan=True), st.lists(_message, max_size=3),
                      _message, st.lists(st.one_of(st.text(max_size=8), st.booleans(), st.integers(-1, 2)), max_size=4),
                      st.sampled_from(["true", "no", "maybe"]))
_rl_row = st.builds(lambda r: json.dumps(r), st.dictionaries(
    st.sampled_from(RL_KEYS), _rl_value.filter(lambda v: not isinstance(v, str) or len(v) < 2000), max_size=6))
_rl_good = st.sampled_from([
    '{"prompt": "hi", "chosen": "good answer", "rejected": "bad answer", "completion": "ok", "label": true, '
    '"completions": ["step one", "step two"], "labels": [true, false], "question": "q?", "instruction": "do it", '
    '"chosen_response": "yes", "rejected_response": "no", "input": "x", "good": "g", "bad": "b", "answer": "a"}',
    '{"messages": [{"role": "user", "content": "hi"}], "chosen": {"role": "assistant", "content": "a"}, '
    '"rejected": [{"role": "assistant", "content": "b"}], "completion": [{"role": "assistant", "content": "c"}], "label": 0}',
    '{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
    '"rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}], "label": "false", "prompt": "p"}',
    '{"prompt": "' + "y" * 100_000 + '", "chosen": "a", "rejected": "b", "completion": "c", "label": true}'])
_rl_broken = st.sampled_from(['{"broken": ', "not json", "[1, 2, 3]", '"a string"', "null", "", "3.5"])
_RL_VALID = [   # a row every plain-text type reads, and one every message-list type reads
    {"prompt": "hi", "chosen": "good answer", "rejected": "bad answer", "completion": "ok", "label": True,
     "completions": ["step one", "step two"], "labels": [True, False], "question": "q?", "instruction": "do it", "system": "be brief",
     "chosen_response": "yes", "rejected_response": "no", "input": "x", "good": "g", "bad": "b", "answer": "a"},
    {"messages": [{"role": "user", "content": "hi"}], "prompt": "p", "label": True,
     "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
     "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
     "completion": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "c"}]}]
_DROP = object()


def _mutate(base_changes):
    base, changes = base_changes
    row = dict(base)
    for k, v in changes.items():
        if v is _DROP: row.pop(k, None)
        else: row[k] = v
    return json.dumps(row)


_rl_mutant = st.tuples(st.sampled_from(_RL_VALID), st.dictionaries(st.sampled_from(RL_KEYS), st.one_of(_rl_value, st.just(_DROP)),
                                                                    min_size=1, max_size=2)).map(_mutate)
_rl_line = st.one_of(_rl_row, _rl_good, _rl_mutant, _rl_mutant, st.sampled_from(_RL_VALID).map(json.dumps))


@pytest.fixture(scope="module")
def rl_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz_rl")
    (d / "rewards.py").write_text("def score(completions, **kw): return [1.0] * len(completions)\n")
    return d


@S(700)
@given(st.data())
def test_fuzz_rl_datasets_every_method_and_type(tok, rl_dir, data):
    """Random preference / KTO / stepwise / GRPO rows (and broken lines, invalid UTF-8, empty files, folders, missing
    paths) through ftkit.rl.prepare_rl_data: every row is used, or ftkit's error names the file, every bad row and its
    field; nothing is dropped silently."""
    from ftkit.config import load as load_cfg
    from ftkit.rl import RLDataError, prepare_rl_data
    method = data.draw(st.sampled_from(sorted(RL_METHODS)))
    type_ = data.draw(st.sampled_from(_rl_types(method)))
    kind = data.draw(st.sampled_from(["lines"] * 8 + ["broken_lines"] * 2 + ["invalid_utf8", "empty", "folder", "missing", "json_array"]))
    case = uuid.uuid4().hex[:8]
    path = rl_dir / f"case{case}.jsonl"
    lines = data.draw(st.lists(st.one_of(_rl_line, _rl_broken) if kind == "broken_lines" else _rl_line, min_size=1, max_size=6))
    if kind in ("lines", "broken_lines"): path.write_text("\n".join(lines) + "\n")
    elif kind == "json_array": path = path.with_suffix(".json"); path.write_text("[" + ", ".join(l for l in lines if l.strip()) + "]")
    elif kind == "invalid_utf8": path.write_bytes(b'{"prompt": "ok", "chosen": "a", "rejected": "b"}\n{"prompt": "bad \xff\xfe"}\n')
    elif kind == "empty": path.write_bytes(b"")
    elif kind == "folder": path = rl_dir / f"folder{case}"; path.mkdir()
    else: path = rl_dir / "missing.jsonl"
    entry = {"path": str(path)}
    if type_ is not None: entry["type"] = type_
    extra = {"trl": {"reward_funcs": [f"{rl_dir}/rewards.py:score"]}} if method == "grpo" else {}
    cfg = load_cfg({**BASE, **RL_METHODS[method], "datasets": [entry], "sequence_len": 64, **extra})
    n_rows = len([l for l in lines if l.strip()]) if kind in ("lines", "broken_lines", "json_array") else None
    t = time.process_time()
    try:
        out = prepare_rl_data(cfg, tok)
        assert n_rows is None or len(out.train) + len(out.eval) == n_rows, (n_rows, out)     # nothing dropped silently
        outcome = "prepared"
    except RLDataError as e:
        assert e.problems and all(str(path) in src or path.name in src for src, _, _ in e.problems), e
        assert all(isinstance(i, int) and msg and not msg.startswith("unexpected") for _, i, msg in e.problems), e
        if n_rows and e.total == n_rows:   # per-row problems: each names its row and field (a column or message key)
            assert all(i >= 0 and ("'" in msg or "JSON" in msg or msg.startswith("the row is")) for _, i, msg in e.problems), e
        outcome = "error"
    except FtkitError as e:
        where = getattr(e, "where", "") or ""
        assert str(path) in str(e) + where or path.name in str(e) + where or "datasets[0]" in str(e) + where, str(e)
        outcome = "error"
    assert time.process_time() - t < T_MAX, f"{method}/{type_}: {time.process_time() - t:.1f} CPU s"
    N["rl_rows"] += 1
    N[f"rl_rows:{outcome}"] += 1
    N[f"rl_rows:{method}"] += 1


def test_zz_record_fuzz():
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert peak_mib < 4096, f"peak memory {peak_mib:.0f} MiB"
    total = sum(v for k, v in N.items() if ":" not in k)
    record("fuzz", cases=total, families={k: v for k, v in sorted(N.items())}, peak_rss_mib=round(peak_mib),
           rules_that_raised=dict(FINDINGS),
           time_bound_s=T_MAX, test="tests/test_guarantees_fuzz.py")
    assert total >= 10_000, f"only {total} fuzz cases ran"
