"""ftkit.streaming in training: `pretraining_dataset` over a local jsonl corpus trains a tiny local model on packed rows
read lazily; a run stopped at a checkpoint and resumed continues with exactly the rows (and so exactly the losses) of an
uninterrupted run: the data position in the checkpoint neither repeats nor skips a document. Memory stays flat as the
corpus grows (benchmarks/bench_streaming_memory.py, 1x and 20x)."""
import json, random, subprocess, sys
from pathlib import Path

import pytest
import yaml
from transformers import TrainerCallback

from ftkit.config import ConfigError, load as load_config
from ftkit.streaming import PackedStream, corpus_files
from ftkit.train import train

from test_tracking import tiny_llama

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ftkit_test_tokenizers import llama3
    d = tmp_path_factory.mktemp("stream")
    tok = llama3()
    tiny_llama(vocab_size=len(tok), attn="ftkit_varlen", seed=0).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    rng = random.Random(0)
    (d / "corpus").mkdir()
    for s in range(2):
        with open(d / "corpus" / f"part-{s}.jsonl", "w") as f:
            for i in range(150):
                f.write(json.dumps({"text": f"doc {s}-{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))}) + "\n")
    return d, tok


def _cfg(d, out, **kw):
    return load_config({"base_model": str(d / "model"), "pretraining_dataset": [{"path": str(d / "corpus"), "text_column": "text"}],
                        "sequence_len": 64, "micro_batch_size": 2, "max_steps": 6, "learning_rate": 1e-2, "optimizer": "adamw_torch",
                        "logging_steps": 1, "save_steps": 3, "seed": 1, "output_dir": str(out), "dataloader_num_workers": 0, **kw})


class StopAt(TrainerCallback):
    def __init__(self, step): self.step = step
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step: control.should_training_stop = True


def test_streamed_run_resumes_at_the_saved_data_position(setup, tmp_path):
    d, tok = setup
    full = train(_cfg(d, tmp_path / "full"), quiet=True)
    assert full.global_step == 6 and sorted(full.losses) == [1, 2, 3, 4, 5, 6]
    # the rows a step trains on: a fresh stream over the same corpus, 2 rows (micro_batch_size) per step
    rows = list(PackedStream(corpus_files(d / "corpus"), tok, 64))
    assert all(sum(len(s["input_ids"]) for s in r) == 64 for r in rows) and len(rows) > 12
    pos = json.loads((tmp_path / "full" / "checkpoint-3" / "data_position.json").read_text())
    ref = PackedStream(corpus_files(d / "corpus"), tok, 64)
    for _ in zip(range(6), ref): pass
    assert pos["rows"] == 6 and {k: pos[k] for k in ("file", "doc", "carry")} == ref.state_after(6)
    # stop after checkpoint-3, then resume: steps 4-6 see the same rows as the uninterrupted run (same losses)
    part = train(_cfg(d, tmp_path / "cut"), quiet=True, callbacks=[StopAt(3)])
    assert part.global_step == 3
    resumed = train(_cfg(d, tmp_path / "cut", resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3")), quiet=True)
    assert resumed.global_step == 6 and sorted(resumed.losses) == [4, 5, 6]
    assert [resumed.losses[s] for s in (4, 5, 6)] == pytest.approx([full.losses[s] for s in (4, 5, 6)], rel=1e-5)
    # without the saved position the stream would restart at the first document: a different loss at step 4
    again = train(_cfg(d, tmp_path / "restart", max_steps=1), quiet=True)
    assert again.losses[1] == pytest.approx(full.losses[1], rel=1e-5) and abs(full.losses[4] - full.losses[1]) > 1e-4


def test_stream_keys_are_checked(setup, tmp_path):
    d, _ = setup
    with pytest.raises(ConfigError, match="needs max_steps"):
        load_config({"learning_rate": 1e-4, "pretraining_dataset": [{"path": str(d / "corpus")}]})
    with pytest.raises(ConfigError, match="not a local file or folder"):
        load_config({"learning_rate": 1e-4, "max_steps": 3, "pretraining_dataset": [{"path": "allenai/c4"}]})
    with pytest.raises(ConfigError, match="not both in one run"):
        load_config({"learning_rate": 1e-4, "max_steps": 3, "streaming": True,
                     "datasets": [{"path": "x.jsonl", "type": "alpaca"}, {"path": "y.jsonl", "type": "completion"}]})
    with pytest.raises(ConfigError, match="preference / RL methods"):
        load_config({"learning_rate": 1e-4, "max_steps": 3, "streaming": True, "rl": "dpo",
                     "datasets": [{"path": "x.jsonl", "type": "chatml.intel"}]})
    cfg = load_config({"learning_rate": 1e-4, "max_steps": 3, "streaming": True,
                       "datasets": [{"path": str(d / "corpus"), "type": "completion"}]})
    assert not [w for w in cfg.warnings if w.key == "streaming"]          # no longer an accepted-but-ignored key


def test_memory_stays_flat_from_1x_to_20x_corpus(root):
    p = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_streaming_memory.py"), "--docs", "2000", "--scale", "20"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    print(p.stdout)
    lines = {l.split(":")[0].strip(): l for l in p.stdout.splitlines() if "peak RSS" in l}
    peak = {k: float(l.split("peak RSS ")[1].split(" MiB")[0]) for k, l in lines.items()}
    assert abs(peak["20x"] - peak["1x"]) < 16, peak          # well under one parquet row group / read-ahead window


def test_streamed_chat_rows_have_prepared_labels_and_resume(setup, tmp_path):
    "`streaming: true` over chat_template rows: each packed sample equals the prepared (cached) sample of its row, a row"
    " never exceeds sequence_len, and a run resumed at checkpoint-3 repeats the uninterrupted run's steps 4-6."
    from ftkit.data import prepare
    from ftkit.streaming import stream_data
    from ftkit.prompts.registry import resolve_type
    d, tok = setup
    rng = random.Random(1)
    (d / "chat").mkdir(exist_ok=True)
    with open(d / "chat" / "c.jsonl", "w") as f:
        for i in range(120):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{i}: {q}"},
                                             {"role": "assistant", "content": " ".join(reversed(q.split()))}]}) + "\n")
    base = {"base_model": str(d / "model"), "sequence_len": 160, "micro_batch_size": 2, "learning_rate": 1e-2,
            "datasets": [{"path": str(d / "chat" / "c.jsonl"), "type": "chat_template", "chat_template": "llama3"}],
            "dataset_prepared_path": str(tmp_path / "prep")}
    def cfg(out, **kw):
        return load_config({**base, "streaming": True, "max_steps": 6, "optimizer": "adamw_torch", "logging_steps": 1, "save_steps": 3,
                            "seed": 1, "output_dir": str(out), "dataloader_num_workers": 0, **kw})
    c = cfg(tmp_path / "x")
    sd = stream_data(c, tok, lambda i: resolve_type(c.datasets[i].type).build(tok, c.datasets[i], c))
    rows = list(sd.train)
    prepared = prepare(load_config({**base, "shuffle_merged_datasets": False}), tok, quiet=True)
    want = [(list(r["input_ids"]), list(r["labels"])) for r in prepared.train]
    assert [(s["input_ids"], s["labels"]) for r in rows for s in r] == want       # same samples, same labels, same order
    assert all(sum(len(s["input_ids"]) for s in r) <= 160 for r in rows) and any(len(r) > 1 for r in rows) and len(rows) >= 12
    # the trainer's batches keep every sample boundary (accelerate's batch dispatching would slice cu_seq_lens to the batch size)
    from ftkit.train import build_trainer
    s = build_trainer(cfg(tmp_path / "probe"), quiet=True)
    first = next(iter(s.trainer.get_train_dataloader()))
    expected = s.trainer.packed_collator(rows[:2])["cu_seq_lens_q"]
    assert first["cu_seq_lens_q"].tolist() == expected.tolist() and len(expected) >= 1 + len(rows[0]) + len(rows[1])
    full = train(cfg(tmp_path / "full"), quiet=True)
    part = train(cfg(tmp_path / "cut"), quiet=True, callbacks=[StopAt(3)])
    assert part.global_step == 3 and (tmp_path / "cut" / "checkpoint-3" / "data_position.json").exists()
    resumed = train(cfg(tmp_path / "cut", resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3")), quiet=True)
    assert sorted(resumed.losses) == [4, 5, 6]
    assert [resumed.losses[s] for s in (4, 5, 6)] == pytest.approx([full.losses[s] for s in (4, 5, 6)], rel=1e-5)
