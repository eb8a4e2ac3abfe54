"The config form: every schema field has a widget; YAML -> form -> YAML returns the same config; editing validates."
import pathlib

import pytest

from ftkit.config import SECTIONS, DatasetEntry, SpecialTokens, TRLSettings, load
from ftkit.widgets import ConfigForm, FieldWidget, form, relevant


def _shell():
    "The process's IPython shell (IPython's test shell, started once per process)."
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.testing.globalipapp import start_ipython
    return start_ipython() or InteractiveShell.instance()

ROOT = pathlib.Path(__file__).resolve().parents[1]

RICH = """
base_model: smollm2-135m-instruct
special_tokens:
  eos_token: <|im_end|>
chat_template: chatml
adapter: qlora
load_in_4bit: true
lora_r: 8
lora_alpha: 16.5
lora_dropout: 0.05
lora_target_modules: [q_proj, v_proj]
peft_layer_replication: [[0, 2], [1, 3]]
datasets:
  - path: a.jsonl
    type: chat_template
    roles_to_train: [assistant, tool]
    message_property_mappings: {role: from, content: value}
    train_on_eos: all
  - path: b.jsonl
    type:
      field_instruction: q
      field_output: a
      format: "Q: {instruction}\\nA: "
      no_input_format: "Q: {instruction}\\nA: "
val_set_size: 10
sequence_len: 1024
sample_packing: true
micro_batch_size: 2
gradient_accumulation_steps: 4
num_epochs: 2
learning_rate: 0.0002
optimizer: adamw_torch
lr_scheduler: linear
gradient_checkpointing: offload
bf16: true
tf32: false
flash_attention: true
output_dir: ./out
save_steps: 0.25
use_wandb: true
wandb_project: p
fsdp_config: {fsdp_offload_params: true, fsdp_state_dict_type: FULL_STATE_DICT}
fsdp_version: 2
"""

DPO = """
base_model: smollm2-135m-instruct
rl: dpo
rl_beta: 0.1
dpo_label_smoothing: 0.1
trl:
  beta: 0.1
  max_completion_length: 64
datasets:
  - path: prefs.jsonl
    type: chatml.intel
learning_rate: 5.0e-7
"""


@pytest.fixture(scope="module")
def quick():
    return form(ROOT / "examples" / "quickstart.yml")


def test_every_schema_field_has_a_widget(quick):
    paths = dict(quick.all_fields())
    n = 0
    for sname, model in SECTIONS.items():
        for k in model.model_fields:
            if k == "section":
                continue
            assert k in quick.sections[sname].fields, k
            assert isinstance(paths[k], FieldWidget)
            n += 1
    for k in DatasetEntry.model_fields:
        if k != "section":
            assert f"datasets[0].{k}" in paths, k
    for model, prefix in ((SpecialTokens, "special_tokens"), (TRLSettings, "trl")):
        for k in model.model_fields:
            if k != "section":
                assert f"{prefix}.{k}" in paths, k
    assert n > 200


def test_widget_types_follow_annotations(quick):
    import ipywidgets as w
    f = quick.field
    assert isinstance(f("optimizer").widget, w.Dropdown) and "adamw_torch" in [v for _, v in f("optimizer").widget.options]
    assert isinstance(f("train_on_inputs").widget, w.Checkbox)
    lr = f("lora_r").widget
    assert isinstance(lr, w.BoundedIntText) and lr.min == 1
    d = f("lora_dropout").widget
    assert isinstance(d, w.BoundedFloatText) and d.min == 0 and d.max == 1
    assert isinstance(f("output_dir").widget, w.Text)
    assert isinstance(f("fsdp_config").widget, w.Textarea)
    assert "Peak learning rate." in f("learning_rate").message.value          # help from the description
    assert quick.sections["training"].advanced.selected_index is None        # advanced fields start folded


@pytest.mark.parametrize("src", ["examples/quickstart.yml", "examples/axolotl_style.yml", RICH, DPO])
def test_yaml_form_yaml_round_trip(src):
    source = ROOT / src if src.endswith(".yml") else src
    before = load(source) if src.endswith(".yml") else load(src)
    g = form(source)
    after = load(g.to_yaml())
    assert after.to_dict() == before.to_dict(), g.to_yaml()
    # and from a config object and from a %%finetune cell's text
    assert load(form(before).to_yaml()).to_dict() == before.to_dict()
    cell = form(before).cell_text("train")
    assert cell.startswith("%%finetune train\n")
    assert load(form(cell).to_yaml()).to_dict() == before.to_dict()


def test_untouched_defaults_are_not_written(quick):
    d = form(ROOT / "examples" / "quickstart.yml").to_dict()
    assert set(d) == set(load(ROOT / "examples" / "quickstart.yml").to_dict())
    assert "weight_decay" in d and "tf32" not in d and "gradient_checkpointing" not in d


def test_method_relevance_hides_fields():
    g = form(DPO)
    assert g.field("dpo_label_smoothing").row.layout.display is None
    assert g.field("kto_desirable_weight").row.layout.display == "none"
    assert g.field("lora_r").row.layout.display == "none"                     # no adapter -> no LoRA fields
    g.field("adapter").widget.value = "lora"
    assert g.field("lora_r").row.layout.display is None
    g.field("rl").widget.value = None
    assert g.field("rl_beta").row.layout.display == "none" and g.field("trl").row.layout.display == "none"
    assert relevant("sample_packing_bin_size", {"sample_packing": True}) and not relevant("sample_packing_bin_size", {})


def test_validation_messages_next_to_fields():
    g = form(ROOT / "examples" / "quickstart.yml")
    g.field("micro_batch_size").widget.value = 3
    g.field("batch_size").widget.value = 7
    msg = g.field("batch_size").message.value
    assert "batch_size 7 != micro_batch_size 3" in msg and "problem" in g.status.value
    g.field("batch_size").widget.value = 3
    assert "ftkit-msg" not in g.field("batch_size").message.value and "valid config" in g.status.value
    g.field("datasets[0].path").widget.value = ""
    assert "needs `path`" in g.field("datasets[0].path").message.value


def test_create_cell_sets_next_input_in_a_real_shell():
    ip = _shell()
    g = form(ROOT / "examples" / "quickstart.yml", name="run2")
    g.field("max_steps").widget.value = 9
    g.mode.value = "debug"
    g.create_button.click()
    text = ip.rl_next_input
    assert text.startswith("%%finetune debug --name run2\n") and "max_steps: 9" in text
    assert g.cell_preview.value == text


def test_unknown_keys_are_kept_and_reported():
    g = form("learning_rate: 1e-4\nlearning_rat: 2\ndatasets:\n  - path: a.jsonl\n    type: chat_template\n")
    assert g.unknown == ["learning_rat"] and "learning_rat: 2" in g.to_yaml()
    assert "problem" in g.status.value and "unknown key" in g.status.value
