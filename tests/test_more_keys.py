"""Six Axolotl keys that ftkit used to accept and ignore, now acted on: loss_watchdog_threshold/patience stop a run
(exit 2, the last good checkpoint kept), save_first_step saves after step 1, gc_steps collects garbage every N steps,
lora_target_parameters puts LoRA on parameters, max_prompt_len cuts preference prompts (keeping their end) and
curriculum_sampling trains on the rows in dataset order. Real tiny models and real training on the CPU."""
import gc
import sys

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from ftkit.config import IGNORED_KEYS, load, validate
from ftkit.guard import TrainingFault
from ftkit.train import complete_checkpoints, train, train_main
from helpers import StubTok, counting_data, tiny_llama

KEYS = ("loss_watchdog_threshold", "loss_watchdog_patience", "save_first_step", "gc_steps", "lora_target_parameters",
        "max_prompt_len", "curriculum_sampling")


def _cfg(out, **kw):
    base = {"learning_rate": 1e-2, "micro_batch_size": 4, "sequence_len": 32, "sample_packing": False, "optimizer": "adamw_torch",
            "seed": 3, "output_dir": str(out), "logging_steps": 1, "save_strategy": "no",
            "datasets": [{"path": "unused.jsonl", "type": "chat_template"}]}
    return load({**base, **kw})


def _run(cfg, data=None, model=None, **kw):
    return train(cfg, data=data or (counting_data(40), None), model=model or tiny_llama(vocab_size=64, attn="ftkit_varlen"),
                 tokenizer=StubTok(), quiet=True, **kw)


def test_the_keys_are_acted_on_not_ignored():
    assert not [k for k in KEYS if k in IGNORED_KEYS]
    problems = validate({"learning_rate": 1e-4, "strict": True, "loss_watchdog_threshold": 5.0, "loss_watchdog_patience": 2,
                            "save_first_step": True, "gc_steps": 10, "curriculum_sampling": True})[1]
    assert not problems, problems                                        # strict: true accepts them


def test_loss_watchdog_stops_the_run_naming_key_threshold_steps_and_losses(tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(out, max_steps=8, loss_watchdog_threshold=0.5, loss_watchdog_patience=3, save_strategy="steps", save_steps=2)
    with pytest.raises(TrainingFault) as e:
        _run(cfg)
    msg = str(e.value)
    assert "training stopped at step 3: the loss stayed above loss_watchdog_threshold 0.5 for 3 logged steps" in msg, msg
    assert "(loss_watchdog_patience 3; step 1: " in msg and ", step 2: " in msg and ", step 3: " in msg
    assert f"last good checkpoint: {out / 'checkpoint-2'}" in msg           # the checkpoint before the stop is named and kept
    assert [p.name for p in complete_checkpoints(out)] == ["checkpoint-2"]
    assert not (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()


def test_loss_watchdog_makes_ftkit_train_exit_2(tmp_path, capsys):
    from guarantees_util import write_config
    cfg = write_config(tmp_path, max_steps=4, loss_watchdog_threshold=0.5, loss_watchdog_patience=2, strict=True)
    assert train_main(str(cfg), quiet=True) == 2
    err = capsys.readouterr().err
    assert "stayed above loss_watchdog_threshold 0.5 for 2 logged steps (loss_watchdog_patience 2; step 1:" in err, err[-2000:]
    assert "Traceback" not in err and f"last good checkpoint: {tmp_path / 'out' / 'checkpoint-1'}" in err


def test_loss_watchdog_patience_needs_a_threshold():
    problems = validate({"learning_rate": 1e-4, "loss_watchdog_patience": 2})[1]
    assert [(p.key, p.level) for p in problems] == [("loss_watchdog_patience", "warning")]
    with pytest.raises(Exception) as e:
        load({"learning_rate": 1e-4, "loss_watchdog_threshold": 1.0, "loss_watchdog_patience": 0})
    assert "loss_watchdog_patience" in str(e.value)
    with pytest.raises(Exception) as e:
        load({"learning_rate": 1e-4, "loss_watchdog_threshold": float("inf")})
    assert "loss_watchdog_threshold" in str(e.value) and "finite" in str(e.value)


@pytest.mark.parametrize("first", [False, True])
def test_save_first_step(tmp_path, first):
    out = tmp_path / "run"
    _run(_cfg(out, max_steps=3, save_strategy="steps", save_steps=100, save_first_step=first))
    want = ["checkpoint-1", "checkpoint-3"] if first else ["checkpoint-3"]      # the last step is always saved
    assert [p.name for p in complete_checkpoints(out)] == want


class _Steps(TrainerCallback):
    "Remembers the optimizer step that just ended (runs before ftkit's key callbacks)."
    step = 0
    def on_step_end(self, args, state, control, **kw): self.step = state.global_step


@pytest.mark.parametrize("every,want", [(None, []), (2, [2, 4, 6]), (-1, [5, 6])])
def test_gc_steps_collects_every_n_steps(tmp_path, monkeypatch, every, want):
    steps, calls, real = _Steps(), [], gc.collect
    def collect(*a, **k):
        if sys._getframe(1).f_globals.get("__name__") == "ftkit.train": calls.append(steps.step)
        return real(*a, **k)
    monkeypatch.setattr(gc, "collect", collect)
    # 36 training rows, 4 per batch: 9 steps per epoch; gc_steps -1: before the evaluation at step 5, and at step 6, where
    # max_steps ends the epoch (and the trainer evaluates once more), never at the steps in between
    kw = dict(val_set_size=0.1, eval_steps=5) if every == -1 else {}
    _run(_cfg(tmp_path / "run", max_steps=6, gc_steps=every, **kw), data=(counting_data(40), counting_data(8, seed=5)),
         callbacks=[steps])
    assert (sorted(set(calls)) if every == -1 else calls) == want


def test_gc_steps_below_minus_one_is_refused():
    with pytest.raises(Exception) as e:
        load({"learning_rate": 1e-4, "gc_steps": -2})
    assert "gc_steps" in str(e.value)


def test_lora_target_parameters_get_lora_and_train(tmp_path):
    from peft.tuners.lora.layer import ParamWrapper
    from ftkit.models import apply_adapter
    cfg = _cfg(tmp_path / "run", max_steps=4, adapter="lora", lora_r=4, lora_target_parameters=["mlp.down_proj.weight"])
    model = apply_adapter(cfg, tiny_llama(vocab_size=64, attn="ftkit_varlen"), quiet=True)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all(".mlp.down_proj.lora_" in n for n in lora), list(lora)    # only the named parameters get adapters
    assert isinstance(model.base_model.model.model.layers[0].mlp.down_proj, ParamWrapper)
    before = {n: p.detach().clone() for n, p in lora.items()}
    r = _run(cfg, model=model)
    assert r.global_step == 4
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p.detach(), before[n])]
    assert any("lora_B" in n for n in changed) and any("lora_A" in n for n in changed), changed   # they trained


def test_lora_target_parameters_reach_a_reward_model_head(tmp_path):
    "The reward-model path builds its own LoraConfig: the key reaches it too, and a wrong name is an error there as well."
    from ftkit.config import ConfigError
    from ftkit.rl import load_rl_model
    from helpers import save_tiny_model
    tok = save_tiny_model(tmp_path / "base")
    base = {"base_model": str(tmp_path / "base"), "reward_model": True, "adapter": "lora", "lora_r": 4}
    m = load_rl_model(_cfg(tmp_path / "rm", **base, lora_target_parameters=["mlp.down_proj.weight"]), tok, head="seqcls")
    lora = [n for n, p in m.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora and all(".mlp.down_proj.lora_" in n for n in lora), lora
    with pytest.raises(ConfigError, match="no parameter of the model is named mlp.nope.weight"):
        load_rl_model(_cfg(tmp_path / "rm2", **base, lora_target_parameters=["mlp.nope.weight"]), tok, head="seqcls")


def test_lora_target_parameters_errors():
    problems = validate({"learning_rate": 1e-4, "lora_target_parameters": ["mlp.experts.gate_up_proj"]})[1]
    assert [(p.key, p.level) for p in problems] == [("lora_target_parameters", "error")]       # no adapter
    from ftkit.errors import ConfigError
    from ftkit.models import apply_adapter
    with pytest.raises(ConfigError) as e:
        apply_adapter(load({"learning_rate": 1e-4, "adapter": "lora", "lora_target_parameters": "mlp.experts.gate_up_proj"}),
                      tiny_llama(vocab_size=64), quiet=True)
    p = e.value.problems[0]
    assert p.key == "lora_target_parameters" and "mlp.experts.gate_up_proj" in p.message and "model.layers." in p.hint


@pytest.mark.parametrize("rl", ["dpo", "kto"])
def test_max_prompt_len_keeps_the_end_of_long_prompts(tmp_path, rl):
    from ftkit.models import load_tokenizer
    from ftkit.rl import prepare_rl_data
    long = "word " * 60 + "so what is the question"
    rows = (f'{{"prompt": "{long}", "chosen": "yes", "rejected": "no"}}\n{{"prompt": "short one", "chosen": "a", "rejected": "b"}}\n'
            if rl == "dpo" else f'{{"prompt": "{long}", "completion": "yes", "label": true}}\n{{"prompt": "short one", "completion": "a", "label": false}}\n')
    (tmp_path / "p.jsonl").write_text(rows)
    cfg = lambda **kw: load({"base_model": "smollm2-135m-instruct", "learning_rate": 1e-4, "rl": rl, "shuffle_merged_datasets": False,
                             "datasets": [{"path": str(tmp_path / "p.jsonl"), "type": "passthrough"}], **kw})
    tok = load_tokenizer(cfg(), quiet=True)
    full, cut = prepare_rl_data(cfg(), tok).train, prepare_rl_data(cfg(max_prompt_len=10), tok).train
    assert len(full[0]["prompt_ids"]) > 60 and cut[0]["prompt_ids"] == full[0]["prompt_ids"][-10:]
    assert tok.decode(cut[0]["prompt_ids"]).endswith("so what is the question")
    assert cut[1] == full[1]                                             # a short prompt is untouched, and so are the answers
    assert all(c[k] == f[k] for c, f in zip(cut, full) for k in c if k != "prompt_ids")


def test_max_prompt_len_for_sft_says_it_applies_to_rl_methods():
    problems = validate({"learning_rate": 1e-4, "max_prompt_len": 64})[1]
    assert [(p.key, p.level) for p in problems] == [("max_prompt_len", "warning")]
    assert "rl: dpo, ipo, orpo, simpo, kto" in problems[0].message and "supervised fine-tuning" in problems[0].message


class _SeenRows(TrainerCallback):
    "Hooks the model: the rows of every training forward pass, by the token after each BOS (row i starts 1, 4 + i)."
    def __init__(self, model):
        self.rows = []
        model.register_forward_pre_hook(self._hook, with_kwargs=True)
    def _hook(self, module, args, kwargs):
        if not module.training: return
        ids = kwargs["input_ids"].flatten().tolist()
        self.rows += [ids[j + 1] - 4 for j in range(len(ids) - 1) if ids[j] == 1]


def _numbered(n):
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        k = int(torch.randint(3, 10, (1,), generator=g))
        ids = [1, 4 + i] + [4 + (i + j) % 60 for j in range(1, k)] + [2]
        rows.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return Dataset.from_list(rows)


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("curriculum", [False, True])
def test_curriculum_sampling_trains_in_dataset_order(tmp_path, packing, curriculum):
    n = 24
    model = tiny_llama(vocab_size=64, attn="ftkit_varlen")
    seen = _SeenRows(model)
    r = _run(_cfg(tmp_path / "run", num_epochs=2, sample_packing=packing, curriculum_sampling=curriculum),
             data=(_numbered(n), None), model=model)
    assert r.global_step > 0 and sorted(seen.rows[:n]) == list(range(n))          # every row once per epoch
    if curriculum: assert seen.rows == list(range(n)) * 2, seen.rows               # dataset order, both epochs
    else: assert seen.rows[:n] != list(range(n))                                   # shuffled without it
