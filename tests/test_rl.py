"Preference / RL training on the CPU: real tokenizer, tiny random-weight Llama models (learning a pattern, not language)."
import json, os, random, textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from ftkit.config import load
from ftkit.rl import RLDataError, RewardFuncError, build, prepare_rl_data, preference_margins, sequence_logps, debug_rl
from ftkit.train import build_trainer, train


def train_rl(cfg, model=None, tokenizer=None, save=True):
    "RL methods train through the one training path (ftkit.train.train)."
    return train(cfg, model=model, tokenizer=tokenizer, save=save, quiet=True)


def build_rl_trainer(cfg, model=None, tokenizer=None):
    s = build_trainer(cfg, model=model, tokenizer=tokenizer, quiet=True)
    return s.trainer, s.data

TOPICS = ["apples", "rivers", "music", "stars", "bread", "trains", "cats", "snow", "books", "tea", "clocks", "maps",
          "ships", "bees", "lamps", "roads", "coins", "shoes", "kites", "drums", "chairs", "ovens", "forks", "bells"]


@pytest.fixture(scope="session")
def tok():
    from ftkit.models import load_tokenizer
    return load_tokenizer(load({"learning_rate": 1e-5}), quiet=True)


def tiny_model(tok, head="causal", seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaForTokenClassification
    torch.manual_seed(seed)
    c = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=True,
                    num_labels=1 if head == "seqcls" else 2)
    cls = {"causal": LlamaForCausalLM, "seqcls": LlamaForSequenceClassification, "tokcls": LlamaForTokenClassification}[head]
    return cls(c)


def pairs(topics):
    "chosen answers are polite and mention the topic; rejected answers are curt."
    return [{"question": f"Tell me about {t}.", "chosen": f"Sure! {t.capitalize()} are lovely, thank you for asking.",
             "rejected": "No. Go away."} for t in topics]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def base_cfg(tmp_path, **kw):
    d = dict(learning_rate=5e-3, micro_batch_size=4, gradient_accumulation_steps=1, sequence_len=128, lr_scheduler="constant",
             optimizer="adamw_torch", output_dir=str(tmp_path / "out"), seed=0, bf16=False, logging_steps=1)
    d.update(kw)
    return load(d)


def _losses(tr, key="loss"):
    return [h[key] for h in tr.state.log_history if key in h]


def test_dpo_raises_heldout_margin(tok, tmp_path):
    train_t, held_t = TOPICS[:16], TOPICS[16:]
    p = write_jsonl(tmp_path / "pref.jsonl", pairs(train_t))
    cfg = base_cfg(tmp_path, rl="dpo", rl_beta=0.1, max_steps=12, datasets=[{"path": p, "type": "chatml.intel"}])
    held = [build(tok, {"type": "chatml.intel"}, cfg, "chatml.intel").tokenize(r)[0] for r in pairs(held_t)]
    model = tiny_model(tok)
    before = sum(preference_margins(model, held)) / len(held)
    res = train_rl(cfg, model=model, tokenizer=tok, save=False)
    after = sum(preference_margins(model, held)) / len(held)
    print(f"DPO held-out margin {before:.2f} -> {after:.2f}")
    assert after > before + 20.0     # summed log-prob margin (chosen is longer, so it starts far below)


def test_ipo_and_simpo_build(tok, tmp_path):
    p = write_jsonl(tmp_path / "pref.jsonl", pairs(TOPICS[:8]))
    for extra in (dict(rl="ipo"), dict(rl="simpo", simpo_gamma=0.5, cpo_alpha=1.0)):
        cfg = base_cfg(tmp_path, max_steps=2, datasets=[{"path": p, "type": "chatml.intel"}], **extra)
        tr, data = build_rl_trainer(cfg, model=tiny_model(tok), tokenizer=tok)
        if extra["rl"] == "ipo": assert tr.args.loss_type == ["ipo"]
        else: assert tr.args.loss_type == "simpo" and tr.args.simpo_gamma == 0.5
        tr.train()


def test_orpo_lowers_loss(tok, tmp_path):
    rows = [{"chosen": [{"role": "user", "content": f"Tell me about {t}."}, {"role": "assistant", "content": f"Sure! {t} are lovely."}],
             "rejected": [{"role": "user", "content": f"Tell me about {t}."}, {"role": "assistant", "content": "No. Go away."}]}
            for t in TOPICS[:16]]
    p = write_jsonl(tmp_path / "orpo.jsonl", rows)
    cfg = base_cfg(tmp_path, rl="orpo", orpo_alpha=0.1, max_steps=24, chat_template="chatml",
                   datasets=[{"path": p, "type": "chat_template.argilla"}])
    res = train_rl(cfg, model=tiny_model(tok), tokenizer=tok, save=False)
    ls = _losses(res.trainer)
    print("ORPO loss", ls[0], "->", ls[-1])
    assert sum(ls[-4:]) / 4 < 0.7 * sum(ls[:4]) / 4


def test_kto_lowers_loss(tok, tmp_path):
    rows = []
    for t in TOPICS[:16]:
        rows.append({"prompt": f"Tell me about {t}.", "completion": f"Sure! {t} are lovely.", "label": True})
        rows.append({"prompt": f"Tell me about {t}.", "completion": "No. Go away.", "label": False})
    p = write_jsonl(tmp_path / "kto.jsonl", rows)
    cfg = base_cfg(tmp_path, rl="kto", rl_beta=0.1, max_steps=24, datasets=[{"path": p, "type": "chatml.prompt_pairs"}])
    res = train_rl(cfg, model=tiny_model(tok), tokenizer=tok, save=False)
    ls = _losses(res.trainer)
    print("KTO loss", ls[0], "->", ls[-1])
    assert sum(ls[-4:]) / 4 < 0.8 * sum(ls[:4]) / 4


def test_reward_model_ranks_heldout(tok, tmp_path):
    rows = [{"input": f"Tell me about {t}.", "chosen": f"Sure! {t} are lovely, thanks.", "rejected": "No. Go away."} for t in TOPICS[:16]]
    p = write_jsonl(tmp_path / "rm.jsonl", rows)
    cfg = base_cfg(tmp_path, reward_model=True, max_steps=30, chat_template="chatml",
                   datasets=[{"path": p, "type": "bradley_terry.chat_template"}])
    model = tiny_model(tok, "seqcls")
    res = train_rl(cfg, model=model, tokenizer=tok, save=False)
    held = [build(tok, {"type": "bradley_terry.chat_template"}, cfg).tokenize(
        {"input": f"Tell me about {t}.", "chosen": f"Sure! {t} are lovely, thanks.", "rejected": "No. Go away."})[0] for t in TOPICS[16:]]
    model.eval()
    with torch.no_grad():
        score = lambda ids: float(model(input_ids=torch.tensor([ids])).logits[0, 0])
        wins = [score(r["prompt_ids"] + r["chosen_ids"]) > score(r["prompt_ids"] + r["rejected_ids"]) for r in held]
    print("reward model held-out accuracy", sum(wins) / len(wins))
    assert sum(wins) / len(wins) > 0.5 and sum(wins) >= len(wins) - 1


def test_process_reward_model_trains(tok, tmp_path):
    rows = [{"prompt": f"Is {a} larger than {b}?", "completions": [f"Compare {a} and {b}.", "Yes." if a > b else "No."],
             "labels": [True, True]} for a in range(2, 8) for b in range(2, 8) if a != b][:16]
    rows += [{"prompt": r["prompt"], "completions": [r["completions"][0], "Maybe."], "labels": [True, False]} for r in rows]
    p = write_jsonl(tmp_path / "prm.jsonl", rows)
    cfg = base_cfg(tmp_path, process_reward_model=True, max_steps=20,
                   datasets=[{"path": p, "type": "stepwise_supervised", "step_separator": "\n"}])
    res = train_rl(cfg, model=tiny_model(tok, "tokcls"), tokenizer=tok, save=False)
    ls = _losses(res.trainer)
    assert ls[-1] < ls[0]


def test_grpo_raises_reward(tok, tmp_path, monkeypatch):
    (tmp_path / "ftk_rewards.py").write_text(textwrap.dedent('''
        def vowel_reward(completions, **kwargs):
            "Share of vowels among the characters of the completion."
            out = []
            for c in completions:
                text = c if isinstance(c, str) else c[-1]["content"]
                out.append(sum(ch in "aeiou" for ch in text.lower()) / max(len(text), 1))
            return out
    '''))
    monkeypatch.chdir(tmp_path)
    p = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [{"role": "user", "content": f"Say something about {t}."}]} for t in TOPICS])
    cfg = base_cfg(tmp_path, rl="grpo", max_steps=12, learning_rate=5e-2, micro_batch_size=8, chat_template="chatml",
                   trl={"reward_funcs": ["./ftk_rewards.py:vowel_reward"], "num_generations": 8, "max_completion_length": 6,
                        "temperature": 1.0}, datasets=[{"path": p}])
    res = train_rl(cfg, model=tiny_model(tok), tokenizer=tok, save=False)
    rw = [h["reward"] for h in res.trainer.state.log_history if "reward" in h]
    first, last = sum(rw[:3]) / 3, sum(rw[-3:]) / 3
    print(f"GRPO mean reward {first:.3f} -> {last:.3f}")
    assert last > first + 0.08


def test_bad_rows_and_reward_modules_fail_before_training(tok, tmp_path, monkeypatch):
    rows = pairs(TOPICS[:4])
    del rows[2]["rejected"]
    p = write_jsonl(tmp_path / "bad.jsonl", rows)
    cfg = base_cfg(tmp_path, rl="dpo", max_steps=1, datasets=[{"path": p, "type": "chatml.intel"}])
    with pytest.raises(RLDataError) as e:
        prepare_rl_data(cfg, tok)
    msg = str(e.value)
    assert "bad.jsonl row 2" in msg and "'rejected'" in msg and "field_rejected" in msg
    (tmp_path / "ftk_bad_rewards.py").write_text("def scalar(completions, **kw):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    gp = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hi"}, {"prompt": "yo"}])
    for funcs, needle in ((["ftk_missing_mod.f"], "ftk_missing_mod"), (["./ftk_bad_rewards.py:scalar"], "ftk_bad_rewards.py:scalar"),
                          (["./ftk_bad_rewards.py:nope"], "no function 'nope'"),
                          (["ftk_bad_rewards.scalar"], "./ftk_bad_rewards.py:scalar")):
        g = base_cfg(tmp_path, rl="grpo", max_steps=1, trl={"reward_funcs": funcs}, datasets=[{"path": gp}])
        with pytest.raises(RewardFuncError) as e:
            build_rl_trainer(g, model=object(), tokenizer=tok)
        assert "trl.reward_funcs[0]" in str(e.value) and needle in str(e.value), str(e.value)


MSGS = lambda a: [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": a}]
PAIR_ROWS = {
    "argilla": {"system": "S.", "instruction": "Hi?", "chosen_response": "Good", "rejected_response": "Bad"},
    "argilla_chat": {"chosen": MSGS("Good"), "rejected": MSGS("Bad")},
    "icr": {"input": "Hi?", "chosen": "Good", "rejected": "Bad"},
    "intel": {"question": "Hi?", "chosen": "Good", "rejected": "Bad"},
    "prompt_pairs": {"prompt": "Hi?", "chosen": "Good", "rejected": "Bad"},
    "ultra": {"prompt": "Hi?", "chosen": MSGS("Good"), "rejected": MSGS("Bad")},
}


@pytest.mark.parametrize("fam", ["chatml", "llama3"])
@pytest.mark.parametrize("fn", sorted(PAIR_ROWS))
def test_every_pair_preset(tok, fam, fn):
    cfg = load({"rl": "dpo", "learning_rate": 1e-5, "datasets": [{"path": "x.jsonl", "type": f"{fam}.{fn}"}]})
    out = build(tok, cfg.datasets[0], cfg).tokenize(PAIR_ROWS[fn])[0]
    end = "<|im_end|>" if fam == "chatml" else "<|eot_id|>"
    assert tok.decode(out["chosen_ids"]).endswith("Good" + end) or tok.decode(out["chosen_ids"]).startswith("Good")
    assert "Hi?" in tok.decode(out["prompt_ids"]) and "Good" not in tok.decode(out["prompt_ids"])
    assert ("S." in tok.decode(out["prompt_ids"])) == (fn == "argilla")


@pytest.mark.parametrize("t,row", [
    ("chatml.argilla", {"instruction": "Hi?", "completion": "Good", "label": True}),
    ("chatml.argilla_chat", {"chosen": [{"role": "user", "content": "Hi?"}], "completion": [{"role": "assistant", "content": "Good"}], "label": 1}),
    ("llama3.argilla_chat", {"completion": MSGS("Good"), "label": "true"}),
    ("chatml.intel", {"question": "Hi?", "completion": "Good", "label": False}),
    ("chatml.ultra", {"prompt": "Hi?", "completion": "Good", "label": "false"}),
    ("chat_template.default", {"messages": [{"role": "user", "content": "Hi?"}], "completion": {"role": "assistant", "content": "Good"}, "label": True}),
    ({"field_prompt": "q", "field_completion": "a", "field_label": "ok", "prompt_format": "Q: {prompt}\nA:", "completion_format": " {completion}"},
     {"q": "Hi?", "a": "Good", "ok": True}),
])
def test_kto_types(tok, t, row):
    cfg = load({"rl": "kto", "learning_rate": 1e-5, "chat_template": "chatml", "datasets": [{"path": "x.jsonl", "type": t}]})
    out = build(tok, cfg.datasets[0], cfg).tokenize(row)[0]
    assert tok.decode(out["completion_ids"]).lstrip().startswith("Good") and "Hi?" in tok.decode(out["prompt_ids"])
    assert isinstance(out["label"], bool)


def test_debug_view_and_config_types(tok, tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", pairs(TOPICS[:3]))
    cfg = base_cfg(tmp_path, rl="dpo", datasets=[{"path": p, "type": "chatml.intel"}])
    data = prepare_rl_data(cfg, tok)
    txt = debug_rl(data.train[0], tok)
    lines = txt.splitlines()
    assert lines[0].startswith("INPUT PROMPT: <|im_start|>(-100,") and any(l.startswith("CHOSEN RESPONSE: Sure(") for l in lines)
    assert "REJECTED RESPONSE: No(" in txt and "<|im_end|>(2, 2)" in txt
    for t in ("chat_template.default", "chat_template.argilla", "bradley_terry.chat_template", "stepwise_supervised", "llama3.ultra"):
        load({"learning_rate": 1e-5, "rl": "orpo" if "argilla" in t else None, "reward_model": True if "bradley" in t else None,
              "process_reward_model": True if "stepwise" in t else None, "datasets": [{"path": "x.jsonl", "type": t}]})


def test_grpo_transform_module(tok, tmp_path, monkeypatch):
    "type: module.fn builds the prompt column (Axolotl's transform convention); the log names what was imported."
    (tmp_path / "ftk_gsm.py").write_text(textwrap.dedent('''
        def transform(cfg, *args, **kwargs):
            def fn(example, tokenizer=None):
                return {"prompt": [{"role": "user", "content": example["question"]}], "answer": example["answer"].split("####")[-1].strip()}
            return fn, {"remove_columns": ["question"]}
    '''))
    monkeypatch.chdir(tmp_path)
    p = write_jsonl(tmp_path / "q.jsonl", [{"question": "1+1?", "answer": "so #### 2"}, {"question": "2+2?", "answer": "#### 4"}])
    cfg = base_cfg(tmp_path, rl="grpo", trl={"reward_funcs": ["./ftk_gsm.py:transform"]}, datasets=[{"path": p, "type": "./ftk_gsm.py:transform"}])
    data = prepare_rl_data(cfg, tok)
    assert data.mode == "grpo" and data.train[0]["prompt"][0]["role"] == "user" and "question" not in data.train[0]
    assert sorted(r["answer"] for r in data.train) == ["2", "4"]
