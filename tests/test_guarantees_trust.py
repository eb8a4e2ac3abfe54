"""Guarantee 6, nothing runs that the config does not name: dotted `type:` values and reward functions are imported only
from an installed package or a .py file the config names (never the current folder implicitly, also under
`python -m ftkit.cli`, never the standard library); chat templates render sandboxed (templates that reach for Python
internals get nothing); `chat_template_jinja` is read as a file only when it names a .jinja file; work is bounded (alias
bombs, constant-folded template strings); no pickle, no shell, trust_remote_code off unless set."""
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from guarantees_util import ROOT, child_env, record

CASES = []
EVIL = ("import pathlib\npathlib.Path('pwned').write_text('imported')\nprint('EVIL MODULE RAN')\n"
        "from ftkit.prompts.basic import build_completion\n"
        "def build(tok, ds, cfg): return build_completion(tok, ds, cfg)\n")


def _cfg(d: Path, type_, **extra):
    (d / "data.jsonl").write_text('{"text": "hello there general"}\n{"text": "one two three"}\n')
    c = {"base_model": "smollm2-135m-instruct", "learning_rate": 1e-4, "sequence_len": 64,
         "datasets": [{"path": "data.jsonl", "type": type_}], "dataset_prepared_path": "prep", **extra}
    (d / "cfg.yml").write_text(yaml.safe_dump(c))
    return d / "cfg.yml"


def _preprocess_m(d: Path):
    "`python -m ftkit.cli preprocess cfg.yml` in folder d (how launched workers start: the current folder is on sys.path)."
    return subprocess.run([sys.executable, "-m", "ftkit.cli", "preprocess", "cfg.yml"], cwd=d, capture_output=True, text=True,
                          env=child_env(d), timeout=300)


def test_dotted_type_is_never_imported_from_the_current_folder(tmp_path):
    (tmp_path / "evil.py").write_text(EVIL)
    _cfg(tmp_path, "evil.build")
    r = _preprocess_m(tmp_path)
    assert r.returncode == 2 and "./evil.py:build" in r.stderr and "Traceback" not in r.stderr, r.stdout[-1500:] + r.stderr[-2000:]
    assert not (tmp_path / "pwned").exists() and "EVIL MODULE RAN" not in r.stdout
    CASES.append("dotted type from the current folder (python -m ftkit.cli)")
    # the standard library is not a strategy: `this` would print the Zen of Python
    _cfg(tmp_path, "this.build")
    r = _preprocess_m(tmp_path)
    assert r.returncode == 2 and "standard-library" in r.stderr and "Beautiful is better" not in r.stdout + r.stderr, r.stderr[-2000:]
    CASES.append("standard-library module as a dataset type")
    # a module that exists without the function: ftkit's error, not an AttributeError traceback
    _cfg(tmp_path, "yaml.no_such_builder")
    r = _preprocess_m(tmp_path)
    assert r.returncode == 2 and "has no function 'no_such_builder'" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    CASES.append("installed module without the named function")


def test_a_file_the_config_names_is_imported_and_listed(tmp_path):
    (tmp_path / "evil.py").write_text(EVIL)
    cfg = _cfg(tmp_path, "./evil.py:build")
    r = _preprocess_m(tmp_path)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-2000:]
    assert (tmp_path / "pwned").exists()                       # named explicitly: imported
    from ftkit.config import load
    from ftkit.prompts.registry import user_modules
    import os
    old = os.getcwd(); os.chdir(tmp_path)
    try:
        assert user_modules(load(cfg)) == ["datasets[0].type: ./evil.py:build (file)"]
        assert user_modules(load(cfg, {"trust_remote_code": True}))[0].startswith("trust_remote_code: true")
    finally:
        os.chdir(old)
    CASES.append("explicit ./file.py:function imported and listed")


def test_reward_functions_are_not_imported_from_the_current_folder(tmp_path, monkeypatch):
    from ftkit.config import load
    from ftkit.rl import RewardFuncError, load_reward_funcs
    (tmp_path / "my_rewards.py").write_text("import pathlib\npathlib.Path('pwned').write_text('x')\ndef score(completions, **kw): return [1.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend("")                            # as under `python -m` or in a notebook
    base = {"base_model": "smollm2-135m-instruct", "learning_rate": 1e-4, "rl": "grpo", "datasets": [{"path": "p.jsonl"}]}
    with pytest.raises(RewardFuncError) as e:
        load_reward_funcs(load({**base, "trl": {"reward_funcs": ["my_rewards.score"]}}))
    assert "./my_rewards.py:score" in str(e.value) and not (tmp_path / "pwned").exists() and "my_rewards" not in sys.modules
    funcs, _ = load_reward_funcs(load({**base, "trl": {"reward_funcs": ["./my_rewards.py:score"]}}))
    assert funcs[0](["a", "b"]) == [1.0, 1.0]
    CASES.append("reward function from the current folder refused; named file imported")


ATTACKS = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch pwned').read() }}",
    "{{ self.__init__.__globals__['__builtins__']['open']('/etc/passwd').read() }}",
    "{{ namespace.__init__.__globals__ }}",
    "{% set x = joiner %}{{ x.__init__.__globals__.__builtins__.__import__('os').system('touch pwned') }}",
    "{{ lipsum.__globals__['os'].popen('touch pwned').read() }}",
]


@pytest.fixture(scope="module")
def tok():
    from ftkit_test_tokenizers import smollm2
    return smollm2()


@pytest.mark.parametrize("attack", ATTACKS)
def test_templates_cannot_reach_python_internals(tok, tmp_path, monkeypatch, attack):
    from ftkit.config import load
    from ftkit.data import prepare
    from ftkit.errors import FtkitError
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    tpl = attack + "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    cfg = load({"base_model": "smollm2-135m-instruct", "learning_rate": 1e-4, "sequence_len": 64, "chat_template": "jinja",
                "chat_template_jinja": tpl, "datasets": [{"path": "d.jsonl", "type": "chat_template"}]})
    try:
        prep = prepare(cfg, tok, use_cache=False, quiet=True)
        text = tok.decode(prep.train[0]["input_ids"])
    except FtkitError as e:
        text = str(e)
    assert not (tmp_path / "pwned").exists()
    assert "<class" not in text and "root:x:0:0" not in text and "__builtins__" not in text.replace(attack, "")
    CASES.append(f"sandboxed template: {attack[:40]}")


def test_chat_template_jinja_is_a_path_only_when_it_says_so(tok, tmp_path, monkeypatch):
    from ftkit.prompts.chat_template import resolve_template
    from ftkit.config import load
    monkeypatch.chdir(tmp_path)
    base = {"base_model": "smollm2-135m-instruct", "learning_rate": 1e-4, "chat_template": "jinja", "datasets": [{"path": "d.jsonl"}]}
    name, text = resolve_template(tok, None, load({**base, "chat_template_jinja": "/etc/passwd"}))
    assert text == "/etc/passwd"                               # the text itself, never the file's contents
    (tmp_path / "mine.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert "m['content']" in resolve_template(tok, None, load({**base, "chat_template_jinja": "mine.jinja"}))[1]
    with pytest.raises(ValueError, match="does not exist"):
        resolve_template(tok, None, load({**base, "chat_template_jinja": "missing.jinja"}))
    CASES.append("chat_template_jinja path only for .jinja")


def test_work_is_bounded():
    from ftkit.config import load
    from ftkit.errors import ConfigError, FtkitError
    from ftkit.prompts.chat_template import compile_template
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.process_time()
    bomb = "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"a{i}: &a{i} [" + ", ".join([f"*a{i-1}"] * 9) + "]\n" for i in range(1, 10)) + "base_model: x\nlearning_rate: 1\n"
    with pytest.raises(ConfigError, match="expands to more than"):
        load(bomb)
    for tpl in ("{{ 'a' * 2000000000 }}", "{{ 9 ** 9 ** 9 }}", "{% for m in messages %}{{ ('x' * 100000) * 100000 }}{% endfor %}"):
        with pytest.raises(FtkitError, match="constant of about"):
            compile_template(tpl)
    assert time.process_time() - t < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 200 * 1024      # KiB: under 200 MiB more
    CASES.append("alias bomb refused")
    CASES.append("constant-folding template bombs refused")


def test_no_pickle_no_shell_no_remote_code_by_default():
    from ftkit.config import load
    src = {p: p.read_text() for d in ("ftkit", "kernels") for p in (ROOT / d).rglob("*.py")}
    for p, text in src.items():
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{p}: {line.strip()}"
        assert not re.search(r"\bpickle\.loads?\(|shell=True|os\.system\(|os\.popen\(", text), p
    assert not load({"base_model": "smollm2-135m-instruct", "learning_rate": 1e-4, "datasets": [{"path": "d.jsonl"}]}).trust_remote_code
    CASES.append("no pickle / shell / remote code by default (source scan)")


def test_zz_record_trust():
    record("trust", cases=len(CASES), proven=CASES, test="tests/test_guarantees_trust.py")
