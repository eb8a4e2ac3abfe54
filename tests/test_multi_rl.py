"""Preference and reward training on several processes (CPU, gloo) is one job, like SFT.

One process with micro_batch_size 2 and gradient_accumulation_steps 2, and two processes with
gradient_accumulation_steps 1, see the same micro-batches in the first optimizer step (accelerate gives
rank r every r-th micro-batch of the same seeded order), so the first step's loss and gradient norm
must agree. They differ only in the order of float32 additions (an all-reduce mean of two per-rank
gradients against the sum of two accumulated, halved micro-batch gradients): about 1e-7 relative. The
tolerance 1e-4 keeps a wide margin above that and far below what a different sample, a different
batch or a second independent training would change (the loss moves by > 1e-2, world_size reads 1).

Also: the records say world_size 2 and come from rank 0 alone; a launch whose processes would each
train alone, or a launch started inside a launched worker, is an error.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
FTKIT = str(pathlib.Path(sys.executable).parent / "ftkit")
TOPICS = ["apples", "rivers", "music", "stars", "bread", "trains", "cats", "snow", "books", "tea", "clocks", "maps",
          "ships", "bees", "lamps", "roads"]
METHODS = ("dpo", "kto", "reward")

WORKER = r'''
import sys
from pathlib import Path
from ftkit.launch import MetricsFile
from ftkit.config import load
from ftkit.train import train
for path in sys.argv[1:]:                      # what `python -m ftkit.cli train CONFIG --launcher python` runs, per config
    cfg = load(path)
    train(cfg, callbacks=[MetricsFile(Path(cfg.output_dir) / "metrics.jsonl")])
'''


@pytest.fixture(scope="module")
def rl_dir(tmp_path_factory):
    from helpers import save_tiny_model
    d = tmp_path_factory.mktemp("rl")
    save_tiny_model(d / "model")
    rows = lambda f: "".join(json.dumps(r) + "\n" for t in TOPICS for r in f(t))
    (d / "pref.jsonl").write_text(rows(lambda t: [{"question": f"Tell me about {t}.", "chosen": f"Sure! {t} are lovely, thanks.",
                                                   "rejected": "No. Go away."}]))
    (d / "kto.jsonl").write_text(rows(lambda t: [{"prompt": f"Tell me about {t}.", "completion": f"Sure! {t} are lovely.", "label": True},
                                                 {"prompt": f"Tell me about {t}.", "completion": "No. Go away.", "label": False}]))
    (d / "rm.jsonl").write_text(rows(lambda t: [{"input": f"Tell me about {t}.", "chosen": f"Sure! {t} are lovely, thanks.",
                                                 "rejected": "No. Go away."}]))
    return d


def config(d, method, out, **kw):
    data = {"dpo": {"rl": "dpo", "rl_beta": 0.1, "datasets": [{"path": str(d / "pref.jsonl"), "type": "chatml.intel"}]},
            "kto": {"rl": "kto", "rl_beta": 0.1, "datasets": [{"path": str(d / "kto.jsonl"), "type": "chatml.prompt_pairs"}]},
            "reward": {"reward_model": True, "chat_template": "chatml",
                       "datasets": [{"path": str(d / "rm.jsonl"), "type": "bradley_terry.chat_template"}]}}[method]
    cfg = {"base_model": str(d / "model"), "adapter": "lora", "lora_r": 4, "lora_target_linear": True, "sequence_len": 96,
           "micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 1, "learning_rate": 1e-3,
           "lr_scheduler": "constant", "optimizer": "adamw_torch", "logging_steps": 1, "seed": 7, "save_strategy": "no",
           "output_dir": str(out), **data, **kw}
    p = out.parent / f"{out.name}.yml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def first_step(recs):
    return next(r for r in recs if r.get("event") == "log" and "loss" in r and "grad_norm" in r)


@pytest.mark.slow
def test_rl_two_processes_are_one_job(tmp_path, rl_dir):
    "DPO, KTO and a reward model: 1 process (accumulation 2) vs 2 processes (torchrun, gloo) with the same global batch."
    from ftkit.launch import MetricsFile
    from ftkit.train import train
    for m in METHODS:                           # the 1-process references, in this process
        out = tmp_path / f"{m}-1"
        train(str(config(rl_dir, m, out)), callbacks=[MetricsFile(out / "metrics.jsonl")], quiet=True)
    (tmp_path / "worker.py").write_text(WORKER)
    cfgs = [str(config(rl_dir, m, tmp_path / f"{m}-2", gradient_accumulation_steps=1, save_strategy="steps", save_steps=1))
            for m in METHODS]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                        str(tmp_path / "worker.py"), *cfgs], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    for m in METHODS:
        one, two = records(tmp_path / f"{m}-1"), records(tmp_path / f"{m}-2")
        begins = [x for x in two if x["event"] == "begin"]
        assert len(begins) == 1 and begins[0]["world_size"] == 2, f"{m}: rank 0 alone writes, and sees a job of 2"
        assert begins[0]["sharding"] == "ddp", begins[0]
        assert sum(x["event"] == "end" for x in two) == 1
        a, b = first_step(one), first_step(two)
        print(f"{m}: loss {a['loss']:.6f} / {b['loss']:.6f}, grad_norm {a['grad_norm']:.6f} / {b['grad_norm']:.6f}")
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6), m
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), m
        assert a["grad_norm"] > 0
        assert (tmp_path / f"{m}-2" / "adapter_model.safetensors").exists()
        ck = tmp_path / f"{m}-2" / "checkpoint-1"       # TRL's save, marked complete after both ranks wrote their files
        assert (ck / "ftkit-complete.json").exists() and "rng_state_1.pth" in (ck / "ftkit-complete.json").read_text(), m


def test_a_launch_inside_a_worker_is_refused(tmp_path, rl_dir):
    "`ftkit train --num-processes 2` (or finetune(gpus=2)) run inside a launched worker would multiply the job: exit 2, a message."
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    r = subprocess.run([FTKIT, "train", str(config(rl_dir, "dpo", tmp_path / "x")), "--num-processes", "2"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "inside a process that a launcher already started" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x").exists(), "nothing ran"
    code = ("import ftkit, sys\nfrom ftkit.guard import JobError\n"
            f"try: ftkit.finetune({str(config(rl_dir, 'dpo', tmp_path / 'y'))!r}, gpus=2)\n"
            "except JobError as e: print('REFUSED', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "REFUSED" in r.stdout and "rank 1 of 2" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def test_processes_that_are_not_one_job_are_refused(tmp_path):
    """A launcher announced 2 processes but the training arguments were built for one process (world_size 1): training
    refuses instead of running 2 independent copies that write the same output_dir."""
    code = r'''
import os
from transformers import TrainingArguments
from ftkit.guard import JobError, check_one_job
args = TrainingArguments(output_dir=os.environ["OUT"], use_cpu=True)     # built without a process group
os.environ.update(WORLD_SIZE="2", RANK="0")                             # ... in a process a launcher counted as 1 of 2
try: check_one_job(args.world_size)
except JobError as e: print("REFUSED", e)
'''
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "OUT": str(tmp_path)},
                       timeout=300)
    assert "REFUSED" in r.stdout and "would each train alone" in r.stdout and "world size 1" in r.stdout, r.stdout + r.stderr[-2000:]
