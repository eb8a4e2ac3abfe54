"""Guarantee 2, concurrency: one run per output_dir and one preparation per dataset cache at a time, enforced by OS file
locks (fcntl.flock) that vanish with their process. Real concurrent processes: the `ftkit` command, and `ftkit` commands
forked from a warm server (tests/guarantees_util.py) so that many rounds fit in CI time."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from guarantees_util import ForkServer, child_env, ftkit_cmd, record, write_config

HOLD = ("import sys, time; from ftkit.guard import lock_output_dir; lock_output_dir(sys.argv[1]); "
        "print('held', flush=True); time.sleep(120)")


def test_second_run_is_refused_with_the_holders_pid_and_a_killed_holder_leaves_no_lock(tmp_path):
    cfg = write_config(tmp_path, max_steps=1)
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = subprocess.run(ftkit_cmd("train", cfg), capture_output=True, text=True, env=child_env(tmp_path), cwd=tmp_path, timeout=300)
        assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
        assert f"in use by process {holder.pid}" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (out / "metrics.jsonl").exists() and not list(out.glob("checkpoint-*"))   # refused before writing
    finally:
        holder.send_signal(signal.SIGKILL); holder.wait()
    # the holder was SIGKILLed: its lock went with it, the next run trains
    r = subprocess.run(ftkit_cmd("train", cfg), capture_output=True, text=True, env=child_env(tmp_path), cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (out / "checkpoint-1" / "ftkit-complete.json").exists()
    record("locks_stale", cases=2, test="tests/test_guarantees_locks.py::test_second_run_is_refused_with_the_holders_pid_and_a_killed_holder_leaves_no_lock")


def test_concurrent_runs_and_preparations(tmp_path):
    "Rounds of two `ftkit train` on one output_dir and two `ftkit preprocess` on one cache, started at the same moment."
    t0 = time.time()
    server = ForkServer(tmp_path)
    train_rounds, prep_rounds = 3, 8
    try:
        for r in range(train_rounds):
            d = tmp_path / f"train{r}"
            cfg = write_config(d, max_steps=2)
            pids = [server.start(["train", cfg], d / f"log{i}.txt") for i in range(2)]
            codes = [server.wait(p) for p in pids]
            logs = [(d / f"log{i}.txt").read_text() for i in range(2)]
            assert sorted(codes) == [0, 2], (codes, [l[-1500:] for l in logs])
            win, lose = (0, 1) if codes[0] == 0 else (1, 0)
            assert f"in use by process {pids[win]}" in logs[lose], logs[lose][-1500:]
            # never interleaved: the metrics file is the winner's alone, one begin record, steps 1..2 once each
            recs = [json.loads(l) for l in (d / "out" / "metrics.jsonl").read_text().splitlines()]
            assert sum(1 for x in recs if x.get("event") == "begin") == 1
            assert [x["step"] for x in recs if "loss" in x] == [1, 2]
        for r in range(prep_rounds):
            d = tmp_path / f"prep{r}"
            cfg = write_config(d, n_rows=200)
            pids = [server.start(["preprocess", cfg], d / f"log{i}.txt") for i in range(2)]
            codes = [server.wait(p) for p in pids]
            logs = [(d / f"log{i}.txt").read_text() for i in range(2)]
            assert codes == [0, 0], [l[-1500:] for l in logs]
            assert not any("Traceback" in l for l in logs)
            caches = [c for c in (d / "prep").iterdir() if c.is_dir()]
            assert len(caches) == 1 and (caches[0] / "ftkit-complete.json").exists() and not list((d / "prep").glob(".tmp-*"))
            assert all("data: 200 rows in" in l for l in logs)
    finally:
        server.close()
    record("concurrency", train_rounds=train_rounds, preprocess_rounds=prep_rounds, cases=train_rounds + prep_rounds,
           seconds=round(time.time() - t0, 1), test="tests/test_guarantees_locks.py::test_concurrent_runs_and_preparations")
