"""Several machines, one job: two "nodes" on this machine (127.0.0.1), each its own process with one CPU worker
(gloo) joined by torchrun's rendezvous: node 0 is `ftkit train ... --nnodes 2 --node-rank 0 --rdzv-endpoint
127.0.0.1:PORT`, node 1 the same from Python (`ftkit.finetune(cfg, gpus=1, nnodes=2, node_rank=1, rdzv_endpoint=...)`).

Two nodes with gradient_accumulation_steps 1 and one process with 2 see the same samples in every optimizer step,
so their losses agree (float32 summation order only: the tolerance of tests/test_launch.py). The job resumes as a
whole: a second launch with auto_resume_from_checkpoints continues from the checkpoint rank 0 picked, and its steps
equal the uninterrupted run's. Two jobs never share an output_dir: every rank of the second job stops with the
message naming the holder.
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from pathlib import Path

from test_launch import FTKIT, losses, tiny_model_dir, write_config  # noqa: F401  (tiny_model_dir is a fixture)


ROOT_ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
ROOT_ARTIFACTS.mkdir(exist_ok=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(cfg):
    "Node 0 from the command line, node 1 from Python (`ftkit.finetune(..., nnodes=2)`), as two machines would, both awaited."
    ep = f"127.0.0.1:{free_port()}"
    node1 = f"import ftkit; ftkit.finetune({str(cfg)!r}, gpus=1, nnodes=2, node_rank=1, rdzv_endpoint={ep!r})"
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in ([FTKIT, "train", str(cfg), "--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", ep, "--num-processes", "1"],
                         [sys.executable, "-c", node1])]
    outs = [p.communicate(timeout=600) for p in procs]
    return [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def two_nodes_checked(cfg, out):
    """`two_nodes`, with every node's exit 0 required. A launch that failed before it trained or saved anything (the
    output folder's checkpoints and metrics unchanged: a start-up / rendezvous failure, seen once in a full `make test`
    run and never alone) is tried once more; its messages are kept in tests/artifacts/ and printed. Any failure after
    training began fails the test with every node's full messages."""
    def state():
        m = out / "metrics.jsonl"
        return sorted(p.name for p in out.glob("checkpoint-*")), (m.read_text() if m.exists() else "")
    for attempt in range(2):
        before = state()
        res = two_nodes(cfg)
        if all(rc == 0 for rc, _, _ in res): return res
        msg = "\n\n".join(f"node {i}: exit {rc}\n{e[-6000:]}" for i, (rc, _, e) in enumerate(res) if rc != 0)
        (ROOT_ARTIFACTS / f"multi_node_failure_{attempt + 1}.txt").write_text(msg)
        print(f"attempt {attempt + 1} failed:\n{msg}")
        if attempt or state() != before: pytest.fail(msg, pytrace=False)


@pytest.mark.slow
def test_two_nodes_equal_one_process_and_resume_as_one_job(tmp_path, tiny_model_dir):
    from ftkit.launch import MetricsFile
    from ftkit.train import train
    ref = tmp_path / "ref"
    train(str(write_config(tmp_path, tiny_model_dir, ref, max_steps=4)), callbacks=[MetricsFile(ref / "metrics.jsonl")], quiet=True)
    want, _ = losses(ref)
    out = tmp_path / "nodes"
    cfg = write_config(tmp_path, tiny_model_dir, out, gradient_accumulation_steps=1, max_steps=4, save_strategy="steps", save_steps=2)
    res = two_nodes_checked(cfg, out)
    assert "--node_rank 0 --master_addr 127.0.0.1" in res[0][1], "the nodes joined through torchrun's static rendezvous"
    got, recs = losses(out)
    begin = [r for r in recs if r["event"] == "begin"]
    assert len(begin) == 1 and begin[0]["world_size"] == 2, "one job of 2 processes; rank 0 alone writes"
    assert begin[0]["sharding"] == "ddp" and begin[0]["rank0_param_elements"] >= begin[0]["rank0_trainable_elements"] > 0
    assert got == pytest.approx(want, rel=2e-3, abs=2e-3), (got, want)
    assert (out / "checkpoint-2" / "ftkit-complete.json").exists() and (out / "checkpoint-2" / "rng_state_1.pth").exists()
    # a job that died after checkpoint-2: the whole job resumes from rank 0's choice and continues as the uninterrupted run
    import shutil
    shutil.rmtree(out / "checkpoint-4")
    cfg2 = write_config(tmp_path, tiny_model_dir, out, gradient_accumulation_steps=1, max_steps=4, save_strategy="no",
                        auto_resume_from_checkpoints=True)
    res = two_nodes_checked(cfg2, out)
    got2, recs2 = losses(out)
    steps = [r["step"] for r in recs2 if r.get("event") == "log" and "loss" in r]
    assert steps == [3, 4] and got2 == pytest.approx(want[2:], rel=2e-3, abs=2e-3), (steps, got2, want)


LOCKED = r'''
import os, sys, torch.distributed as dist
from ftkit.guard import LockedError, lock_output_dir_job
dist.init_process_group("gloo")
rank = dist.get_rank()
try: line = f"RANK {rank} GOT THE FOLDER"; lock_output_dir_job(sys.argv[1], quiet=True)
except LockedError as e: line = f"RANK {rank} REFUSED " + str(e).splitlines()[0]
with open(os.path.join(sys.argv[2], f"rank{rank}.txt"), "w") as f: f.write(line + "\n")   # one file per rank: no interleaved stdout
dist.destroy_process_group()
'''


def rank_lines(tmp_path, job: str, out) -> tuple[list[str], str]:
    "Run the LOCKED worker as a 2-process job; each rank's line comes from its own file."
    d = tmp_path / job
    d.mkdir()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                        str(tmp_path / "w.py"), str(out), str(d)], capture_output=True, text=True, timeout=300)
    return [f.read_text().strip() for f in sorted(d.glob("rank*.txt"))], r.stdout + r.stderr[-2000:]


def test_a_second_job_on_a_used_output_dir_stops_on_every_rank(tmp_path):
    "Another job holds output_dir: rank 0 finds the lock taken, and rank 1 learns it through the process group."
    from ftkit.guard import lock_output_dir
    out = tmp_path / "out"
    held = lock_output_dir(out)                          # the running job
    (tmp_path / "w.py").write_text(LOCKED)
    lines, log = rank_lines(tmp_path, "second", out)
    assert len(lines) == 2 and all("REFUSED" in l and f"process {os.getpid()}" in l for l in lines), (lines, log)
    assert lines[1].startswith("RANK 1 REFUSED (rank 1 of 2)"), lines
    held.release()
    lines, log = rank_lines(tmp_path, "free", out)
    assert lines == ["RANK 0 GOT THE FOLDER", "RANK 1 GOT THE FOLDER"], (lines, log)


def test_node_arguments_are_checked_before_anything_runs(tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path, tiny_model_dir, tmp_path / "o")
    for extra, needle in ((["--nnodes", "2"], "needs --rdzv-endpoint HOST:PORT"),
                          (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"], "outside 0..1"),
                          (["--nnodes", "2", "--launcher", "python", "--rdzv-endpoint", "h:1"], "--launcher python runs one process")):
        r = subprocess.run([FTKIT, "train", str(cfg), *extra], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr[-1500:])
    assert not (tmp_path / "o").exists() and not (tmp_path / "prepared").exists(), "nothing was prepared or written"


def test_the_magic_takes_the_node_arguments(tmp_path, tiny_model_dir, capsys):
    "`%%finetune train --nnodes 2 ...` goes through the same checks (and would start this machine's torchrun)."
    from helpers import notebook_shell
    shell = notebook_shell(tmp_path)
    cfg = write_config(tmp_path, tiny_model_dir, tmp_path / "m")
    r = shell.run_cell(f"%%finetune train --nnodes 2 --node-rank 0 --config {cfg}\nmax_steps: 1\n")
    assert r.success
    out = capsys.readouterr().out
    assert "needs --rdzv-endpoint HOST:PORT" in out and "Traceback" not in out, out[-1500:]
    assert not (tmp_path / "m").exists()
