"ftkit.config: examples validate, every rule fires with its message, errors point at lines, fuzzed configs only ever raise ConfigError."
import pathlib
import subprocess
import sys

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from ftkit.config import (ConfigError, Env, FinetuneConfig, SECTIONS, json_schema, load, resolve, validate)

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = [p for p in sorted((ROOT / "examples").rglob("*.yml")) + sorted((ROOT / "examples").rglob("*.yaml"))
            if "lm_eval" not in p.parts]   # examples/lm_eval/ holds lm-eval task files, not ftkit configs
BASE = {"learning_rate": 1e-4, "micro_batch_size": 2, "gradient_accumulation_steps": 2,
        "datasets": [{"path": "d.jsonl", "type": "chat_template"}]}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_config_validates(path):
    cfg = load(path)
    assert isinstance(cfg, FinetuneConfig)
    assert load(cfg.to_yaml()) == cfg, "YAML round trip"


def test_examples_exist():
    assert len(EXAMPLES) >= 2


def problems_of(extra: dict, drop=()):
    d = {**BASE, **extra}
    for k in drop:
        d.pop(k, None)
    cfg, problems, _, _ = validate(d)
    return problems


RULE_CASES = [
    ({"warmup_steps": 10, "warmup_ratio": 0.1}, "warmup_ratio", "cannot be used together"),
    ({"val_set_size": 0.1, "eval_steps": 10, "evals_per_epoch": 2}, "evals_per_epoch", "cannot be used together"),
    ({"save_steps": 10, "saves_per_epoch": 2}, "saves_per_epoch", "cannot be used together"),
    ({"load_in_4bit": True, "adapter": "lora"}, "load_in_4bit", "needs `adapter: qlora`"),
    ({"adapter": "qlora"}, "adapter", "needs `load_in_4bit: true`"),
    ({"bf16": True, "fp16": True}, "fp16", "cannot both be on"),
    ({"batch_size": 5}, "batch_size", "!= micro_batch_size 2 x gradient_accumulation_steps 2"),
    ({"adapter": "lora", "load_in_8bit": True, "lora_mlp_kernel": True}, "lora_mlp_kernel", "8-bit LoRA"),
    ({"adapter": "lora", "peft_use_dora": True, "lora_qkv_kernel": True}, "lora_qkv_kernel", "DoRA"),
    ({"val_set_size": 0.1, "test_datasets": [{"path": "t.jsonl", "type": "chat_template"}]}, "val_set_size", "cannot be used together"),
    ({"flash_attention": True, "sdp_attention": True}, "sdp_attention", "Only one attention backend"),
    ({"activation_offloading": True}, "activation_offloading", "needs gradient_checkpointing"),
    ({"cuda_graphs": False, "cuda_graph_attention": "triton"}, "cuda_graph_attention", "turns the graphs off"),
    ({"eval_steps": 10}, "eval_steps", "no eval data"),
    ({"early_stopping_patience": 3}, "early_stopping_patience", "no eval data"),
    ({"sample_packing": True, "rl": "dpo"}, "sample_packing", "cannot be used with rl"),
    ({"chat_template": "jinja"}, "chat_template", "chat_template_jinja is empty"),
    ({"chat_template": "chatml", "chat_template_jinja": "{{x}}"}, "chat_template_jinja", "only used with `chat_template: jinja`"),
    ({"chat_template": "chatmll"}, "chat_template", "unknown chat template"),
    ({"load_in_8bit": True, "load_in_4bit": True, "adapter": "qlora"}, "load_in_4bit", "cannot be used together"),
    ({"deepspeed": "ds.json", "fsdp_config": {"a": 1}}, "fsdp_config", "cannot be used together"),
    ({"rl": "grpo"}, "trl.reward_funcs", "needs at least one reward function"),
    ({"rl": "simpo", "warmup_ratio": 0.1}, "warmup_ratio", "not supported with SimPO"),
    ({"trl": {"beta": 0.2}, "rl_beta": 0.1, "rl": "dpo"}, "trl.beta", "differ"),
    ({"reward_model": True, "rl": "dpo"}, "rl", "cannot be used together"),
    ({"datasets": [{"path": "d.jsonl", "type": "alpacca"}]}, "datasets[0].type", "unknown dataset type"),
    ({"datasets": [{"path": "d.jsonl", "type": "alpaca", "shards_idx": 1}]}, "datasets[0].shards_idx", "needs shards"),
    ({"datasets": [{"path": "d.jsonl", "type": "alpaca", "shards": 2, "shards_idx": 2}]}, "datasets[0].shards_idx", "must be < shards"),
    ({"datasets": [{"path": "d.jsonl", "type": "input_output"}], "train_on_inputs": True}, "datasets[0].type", "train_on_inputs: false"),
    ({"datasets": [{"type": "alpaca"}]}, "datasets[0].path", "needs `path`"),
    ({"datasets": [{"path": "d.jsonl", "type": "chat_template", "field_chosen": "c"}]}, "datasets[0].field_chosen", "preference data"),
    ({"datasets": [{"path": "d.jsonl", "type": "chat_template", "field_completion": "c"}], "rl": "dpo"}, "datasets[0].field_completion", "KTO"),
]


@pytest.mark.parametrize("extra,key,fragment", RULE_CASES, ids=[c[1] + ":" + c[2][:20] for c in RULE_CASES])
def test_rule_fires_with_its_message(extra, key, fragment):
    errors = [p for p in problems_of(extra) if p.level == "error"]
    hits = [p for p in errors if p.key == key and fragment in p.message]
    assert hits, f"expected an error on {key} containing {fragment!r}; got {[str(p) for p in errors]}"
    assert all(p.hint for p in hits), "every rule says what to do"


def test_valid_base_has_no_problem():
    assert [p for p in problems_of({}) if p.level == "error"] == []


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as ei:
        load({**BASE, "warmup_steps": 1, "warmup_ratio": 0.1, "bf16": True, "fp16": True, "lerning_rate": 1, "sequence_len": "long"})
    keys = {p.key for p in ei.value.errors}
    assert {"warmup_ratio", "fp16", "lerning_rate", "sequence_len"} <= keys


def test_typo_gets_a_suggestion_top_level_and_nested():
    with pytest.raises(ConfigError) as ei:
        load({**BASE, "lora_alpah": 16, "datasets": [{"path": "d.jsonl", "type": "chat_template", "roles_to_trian": ["assistant"]}]})
    by_key = {p.key: p for p in ei.value.errors}
    assert "'lora_alpha'" in by_key["lora_alpah"].hint
    assert "'roles_to_train'" in by_key["datasets[0].roles_to_trian"].hint


def test_renamed_key_loads_with_warning_and_suggestion():
    cfg = load({**BASE, "evaluation_strategy": "no"})
    assert cfg.eval_strategy == "no"
    assert any("eval_strategy" in p.hint for p in cfg.warnings)


def test_yaml_syntax_error_names_line_and_column():
    text = "learning_rate: 1e-4\nmicro_batch_size: 2\ndatasets:\n  - path: a.jsonl\n    type: [chat_template\n"
    with pytest.raises(ConfigError) as ei:
        load(text)
    p = ei.value.problems[0]
    assert "YAML syntax error" in p.message and p.line is not None and p.line >= 5
    assert f"line {p.line}" in str(ei.value)


def test_problem_lines_point_into_the_yaml():
    text = "learning_rate: 1e-4\nmicro_batch_size: 2\ngradient_accumulation_steps: 1\ndatasets:\n  - path: a.jsonl\n    type: chat_template\n    train_on_eos: sometimes\n"
    with pytest.raises(ConfigError) as ei:
        load(text)
    p = next(p for p in ei.value.errors if p.key == "datasets[0].train_on_eos")
    assert (p.line, p.column) == (7, 5)
    assert "sometimes" in p.message and "'turn'" in p.message
    assert "7 |     train_on_eos: sometimes" in str(ei.value)


def test_overrides_dash_and_underscore_and_yaml_scalars():
    a = load(BASE, {"--learning-rate": "3e-5", "sample-packing": "true", "trl.beta": "0.1"})
    b = load(BASE, learning_rate=3e-5, sample_packing=True)
    assert a.learning_rate == b.learning_rate == 3e-5 and a.sample_packing is True and a.trl.beta == 0.1


def test_resolve_precision_batch_and_attention():
    cfg = load({**BASE, "sample_packing": True})
    gpu = resolve(cfg, Env(cuda=True, bf16_supported=True, world_size=4))
    assert gpu.effective_batch_size == 2 * 2 * 4 and gpu.precision == "bf16" and "supports" in gpu.precision_reason
    assert gpu.attention == "ftkit_varlen"
    assert resolve(cfg, Env(cuda=True, bf16_supported=False)).precision == "fp16"
    assert resolve(cfg, Env()).precision == "fp32"
    only_bs = load({"learning_rate": 1e-4, "micro_batch_size": 2, "batch_size": 8})
    assert resolve(only_bs, Env()).gradient_accumulation_steps == 4


def test_sections_cover_every_key_once():
    keys = [k for s in SECTIONS.values() for k in s.model_fields if k != "section"]
    assert len(keys) == len(set(keys))
    assert set(keys) == set(FinetuneConfig.model_fields) - {"section"}
    assert all(FinetuneConfig.model_fields[k].description for k in keys), "every key has help text"


def test_schema_lists_every_key():
    props = json_schema()["properties"]
    assert set(props) == set(FinetuneConfig.model_fields) - {"section"}


def test_cli_validate_and_schema(tmp_path):
    good = tmp_path / "good.yml"
    good.write_text(yaml.safe_dump(BASE))
    exe = [sys.executable, "-m", "ftkit.cli"]
    ok = subprocess.run([str(pathlib.Path(sys.executable).parent / "ftkit"), "validate", str(good), "--learning-rate", "5e-5"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "learning_rate: 5.0e-05" in ok.stdout and "resolved plan" in ok.stdout
    bad = tmp_path / "bad.yml"
    bad.write_text("learning_rate: 1e-4\nmicro_batch_size: 2\ngradient_accumulation_steps: 2\nwarmup_steps: 3\nwarmup_ratio: 0.1\nlora_rr: 3\n")
    r = subprocess.run([str(pathlib.Path(sys.executable).parent / "ftkit"), "validate", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "line 5" in r.stderr and "lora_rr" in r.stderr and "Did you mean 'lora_r'" in r.stderr
    s = subprocess.run([str(pathlib.Path(sys.executable).parent / "ftkit"), "schema"], capture_output=True, text=True)
    assert s.returncode == 0 and '"learning_rate"' in s.stdout


# ---------------------------------------------------------------- property-based: mutated configs
VALID = [yaml.safe_load(p.read_text()) for p in EXAMPLES] + [BASE]
TOP_KEYS = sorted(set(FinetuneConfig.model_fields) - {"section"})
ODD = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
                st.text(max_size=12), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
                st.just([{"path": 1}]), st.just({"nested": {"deep": [1, {"x": None}]}}))


def check_only_config_errors(d, must_name=None):
    try:
        cfg = load(d)
    except ConfigError as ex:
        assert ex.problems, "a ConfigError carries at least one problem"
        text = str(ex)
        if must_name is not None:
            assert must_name in text, f"error does not name {must_name!r}:\n{text}"
        return None
    assert isinstance(cfg, FinetuneConfig)
    return cfg


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from(VALID), key=st.sampled_from(TOP_KEYS), value=ODD)
def test_fuzz_wrong_values(base, key, value):
    d = dict(base)
    d[key] = value
    cfg = check_only_config_errors(d)
    if cfg is None:
        cfg2, problems, _, _ = validate(d)
        errors = [p for p in problems if p.level == "error"]
        assert any(key in p.key or key in p.message for p in errors), f"mutating {key!r} gave errors that do not name it: {errors}"


@settings(max_examples=60, deadline=None)
@given(base=st.sampled_from(VALID), key=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=20), value=ODD)
def test_fuzz_unknown_keys_are_named(base, key, value):
    if key in FinetuneConfig.model_fields or key.strip() in ("",) or key in ("evaluation_strategy", "noisy_embedding_alpha", "dataset_processes", "dpo_beta", "sequence_parallel_degree"):
        return
    d = dict(base)
    d[key] = value
    check_only_config_errors(d, must_name=repr(key) if key.isprintable() else None)


@settings(max_examples=60, deadline=None)
@given(base=st.sampled_from(VALID), data=st.data())
def test_fuzz_deleted_keys_and_nested_mutations(base, data):
    d = dict(base)
    keys = sorted(d)
    for k in data.draw(st.lists(st.sampled_from(keys), max_size=3, unique=True)):
        d.pop(k)
    if isinstance(d.get("datasets"), list) and d["datasets"]:
        entry = dict(d["datasets"][0])
        k = data.draw(st.sampled_from(sorted(entry) + ["typo_key", "roles_to_train", "train_on_eos"]))
        entry[k] = data.draw(ODD)
        d["datasets"] = [entry]
    check_only_config_errors(d)


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=200))
def test_fuzz_arbitrary_yaml_text(text):
    check_only_config_errors(text if "\n" in text or not text.strip().endswith((".yml", ".yaml", ".json")) else text + "\n")
