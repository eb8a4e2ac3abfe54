"""A third-party ftkit plugin, as a package would ship it: `RecordingPlugin` records every hook call with the objects it
received. The test puts this folder on sys.path; its `.dist-info` declares the entry point `recording` in the group
`ftkit.plugins`, so ftkit finds it exactly as it finds an installed package's plugin."""
import os

from transformers import TrainerCallback

from ftkit.plugins import Plugin

CALLS = []          # (hook, objects) in call order; the test clears it


class SeenInTraining(TrainerCallback):
    "A callback the plugin adds: notes that training began and whether the plugin's environment was set then."
    def on_train_begin(self, args, state, control, **kw):
        CALLS.append(("callback.on_train_begin", {"env": os.environ.get("FTKIT_TEST_PLUGIN")}))


class RecordingPlugin(Plugin):
    def after_config_load(self, cfg): CALLS.append(("after_config_load", {"cfg": cfg}))
    def before_model_load(self, cfg): CALLS.append(("before_model_load", {"cfg": cfg}))

    def after_model_load(self, cfg, model):
        CALLS.append(("after_model_load", {"cfg": cfg, "model": model}))
        model.ftkit_test_plugin_saw_base = True          # the same object flows on

    def after_adapters(self, cfg, model):
        CALLS.append(("after_adapters", {"cfg": cfg, "model": model}))

    def environment(self, cfg):
        CALLS.append(("environment", {"cfg": cfg}))
        return {"FTKIT_TEST_PLUGIN": "on"}

    def callbacks(self, cfg):
        CALLS.append(("callbacks", {"cfg": cfg}))
        return [SeenInTraining()]

    def before_training(self, cfg, trainer):
        CALLS.append(("before_training", {"cfg": cfg, "trainer": trainer, "env": os.environ.get("FTKIT_TEST_PLUGIN")}))

    def after_training(self, cfg, trainer, result):
        CALLS.append(("after_training", {"cfg": cfg, "trainer": trainer, "result": result}))
