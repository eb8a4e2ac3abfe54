"""ftkit.plugins: a plugin declares its own config keys (`Plugin.config_keys`, a pydantic model). With the plugin listed the keys
validate (a wrong value names the key and its YAML line) and reach the plugin's hooks as `settings`; without it they are
unknown keys; a plugin cannot take an ftkit key."""
import textwrap

import pytest

from ftkit.config import ConfigError, load as load_config, validate
from ftkit.plugins import load_plugins

PLUGIN = '''
from typing import Literal
from pydantic import BaseModel, Field
from ftkit.plugins import Plugin
SEEN = []
class Keys(BaseModel):
    model_config = {"extra": "forbid"}
    reward_scale: float = Field(1.0, gt=0, description="Scale of the plugin's reward.")
    reward_mode: Literal["sum", "mean"] = "mean"
class RewardPlugin(Plugin):
    config_keys = Keys
    def after_config_load(self, cfg): SEEN.append(self.settings)
class Greedy(Plugin):
    config_keys = type("K", (BaseModel,), {"__annotations__": {"learning_rate": float}, "learning_rate": 1.0})
'''


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "keys_plugin_mod.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib, sys
    sys.modules.pop("keys_plugin_mod", None)
    return importlib.import_module("keys_plugin_mod")


BASE = "learning_rate: 1.0e-4\ndatasets:\n  - {path: d.jsonl, type: alpaca}\n"


def test_plugin_keys_validate_and_reach_the_plugin(plugin_module):
    cfg = load_config(BASE + "plugins: [keys_plugin_mod.RewardPlugin]\nreward_scale: 2.5\nreward_mode: sum\n")
    assert not [w for w in cfg.warnings if w.key.startswith("reward")]
    ps = load_plugins(cfg, builtins=False)
    assert plugin_module.SEEN == [plugin_module.Keys(reward_scale=2.5, reward_mode="sum")]
    assert list(ps)[0].settings.reward_scale == 2.5
    defaults = load_config(BASE + "plugins: [keys_plugin_mod.RewardPlugin]\n")     # unset keys take the plugin's defaults
    load_plugins(defaults, builtins=False)
    assert plugin_module.SEEN[-1] == plugin_module.Keys()


def test_bad_plugin_key_values_name_the_key_and_line(plugin_module):
    _, problems, _, _ = validate(BASE + "plugins: [keys_plugin_mod.RewardPlugin]\nreward_scale: -1\nreward_mode: max\n")
    errs = sorted((p.key, p.line) for p in problems if p.level == "error")
    assert errs == [("reward_mode", 6), ("reward_scale", 5)]
    assert all("keys_plugin_mod.RewardPlugin" in p.message for p in problems if p.level == "error")


def test_without_the_plugin_the_keys_are_unknown_and_ftkit_keys_stay_ftkits(plugin_module):
    with pytest.raises(ConfigError, match="reward_scale"):
        load_config(BASE + "reward_scale: 2.5\n")
    _, problems, _, _ = validate(BASE + "plugins: [keys_plugin_mod.Greedy]\n")
    assert any(p.key == "plugins" and "learning_rate" in p.message and p.level == "error" for p in problems)
