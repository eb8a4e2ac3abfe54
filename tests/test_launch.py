"""Multi-process training on the CPU (gloo): the same launch path the GPUs use.

A tiny random-weight Llama with the real SmolLM2 tokenizer trains on the bundled word-reversal
data. One process with gradient_accumulation_steps 2 and two processes with 1 see the same
samples in every optimizer step (accelerate gives rank r every r-th micro-batch), so their loss
curves must agree; only rank 0 writes the outputs.
"""
import json
import pathlib
import subprocess
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
FTKIT = str(pathlib.Path(sys.executable).parent / "ftkit")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from helpers import save_tiny_model
    d = tmp_path_factory.mktemp("tiny")
    save_tiny_model(d)
    data = d / "train.jsonl"
    rows = (ROOT / "examples" / "data" / "reverse_words.jsonl").read_text().splitlines()[:96]
    data.write_text("\n".join(rows) + "\n")
    return d


def write_config(tmp, model_dir, out, **kw):
    cfg = {"base_model": str(model_dir), "datasets": [{"path": str(model_dir / "train.jsonl"), "type": "chat_template"}],
           "dataset_prepared_path": str(tmp / "prepared"), "sequence_len": 96, "micro_batch_size": 2,
           "gradient_accumulation_steps": 2, "max_steps": 6, "learning_rate": 3e-3, "lr_scheduler": "constant",
           "optimizer": "adamw_torch", "logging_steps": 1, "seed": 7, "output_dir": str(out), "save_strategy": "no",
           "shuffle_merged_datasets": False, **kw}
    p = tmp / f"{out.name}.yml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def losses(out):
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r.get("event") == "log" and "loss" in r], recs


def test_cli_torchrun_two_processes_agree_with_one(tmp_path, tiny_model_dir):
    one = tmp_path / "one"
    r1 = subprocess.run([FTKIT, "train", str(write_config(tmp_path, tiny_model_dir, one))], capture_output=True, text=True)
    assert r1.returncode == 0, r1.stderr[-3000:]
    two = tmp_path / "two"
    r2 = subprocess.run([FTKIT, "train", str(write_config(tmp_path, tiny_model_dir, two)), "--launcher", "torchrun",
                         "--num-processes", "2", "--gradient-accumulation-steps", "1", "--", "--master_port", "29611"],
                        capture_output=True, text=True)
    assert r2.returncode == 0, r2.stderr[-3000:]
    l1, _ = losses(one)
    l2, recs2 = losses(two)
    assert len(l1) == len(l2) == 6
    assert l1 == pytest.approx(l2, rel=2e-3, abs=2e-3), (l1, l2)
    begin = [r for r in recs2 if r["event"] == "begin"]
    assert len(begin) == 1 and begin[0]["world_size"] == 2, "rank 0 alone writes the metrics"
    assert (two / "adapter_model.safetensors").exists() or (two / "model.safetensors").exists()
    assert "launching:" in r2.stdout and "torch.distributed.run" in r2.stdout


NOTEBOOK = r'''
import sys, json, pathlib
import ftkit
from ftkit.config import load
from ftkit.launch import launch_train, parent_problems
cfg = load(CONFIG, gradient_accumulation_steps=1)
seen = []
records = launch_train(cfg, 2, on_record=seen.append)
print("LOSSES", json.dumps([r["loss"] for r in records if r.get("event") == "log" and "loss" in r]))
print("STREAMED", sum(1 for r in seen if r.get("event") == "log" and "loss" in r))
print("CLEAN", parent_problems() == [] and "cuda" not in repr(sys.modules.get("torch", "")) or parent_problems())
'''

INFER = r'''
from ftkit.infer import generate
out = generate(cfg, "quick brown fox", max_new_tokens=4)   # the adapter the workers saved, loaded in this kernel
print("GENERATED", type(out).__name__)
'''


def test_notebook_launch_two_processes(tmp_path, tiny_model_dir):
    "From a real Jupyter kernel: launch 2 workers, stream metrics back, keep the kernel clean, then run inference."
    from nbclient import NotebookClient
    ref = tmp_path / "ref"
    r1 = subprocess.run([FTKIT, "train", str(write_config(tmp_path, tiny_model_dir, ref))], capture_output=True, text=True)
    assert r1.returncode == 0, r1.stderr[-3000:]
    cfg_path = write_config(tmp_path, tiny_model_dir, tmp_path / "nb")
    import nbformat                    # here, not at the top: test_context_parallel imports write_config on GPU hosts without it
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f"CONFIG = {str(cfg_path)!r}\n" + NOTEBOOK), nbformat.v4.new_code_cell(INFER)]
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells for o in c.outputs if o.get("output_type") == "stream")
    got = json.loads(text.split("LOSSES ")[1].splitlines()[0])
    want, _ = losses(ref)
    assert got == pytest.approx(want, rel=2e-3, abs=2e-3), (got, want)
    assert int(text.split("STREAMED ")[1].split()[0]) == 6, "every log record reached the notebook while it trained"
    assert "CLEAN True" in text
    assert "GENERATED str" in text and f"inference: model {tmp_path / 'nb'}" in text


def test_merge_sharded_fsdp_checkpoint(tmp_path):
    """A SHARDED_STATE_DICT checkpoint (torch.distributed.checkpoint format, as FSDP writes it under
    checkpoint-N/pytorch_model_fsdp_0/) becomes one model.safetensors with the same tensors, via the CLI."""
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from helpers import tiny_llama
    m = tiny_llama()
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    shard_dir = tmp_path / "out" / "checkpoint-4" / "pytorch_model_fsdp_0"
    dcp.save({"model": sd}, checkpoint_id=str(shard_dir))
    assert (shard_dir / ".metadata").exists()
    cfg = tmp_path / "c.yml"
    cfg.write_text(yaml.safe_dump({"learning_rate": 1e-4, "output_dir": str(tmp_path / "out")}))
    r = subprocess.run([FTKIT, "merge-sharded-fsdp-weights", str(cfg), "--checkpoint-dir", str(tmp_path / "out" / "checkpoint-4")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    merged = load_file(str(tmp_path / "out" / "merged" / "model.safetensors"))
    assert set(merged) == set(sd)
    assert all(torch.equal(merged[k], sd[k]) for k in sd)
    bad = subprocess.run([FTKIT, "merge-sharded-fsdp-weights", str(cfg), "--checkpoint-dir", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "no FSDP sharded checkpoint" in bad.stderr and "Traceback" not in bad.stderr
