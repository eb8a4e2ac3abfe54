"""Guarantee 3, training faults: a NaN/inf gradient or loss stops `ftkit train` at that step with the step, the likely
cause and the last checkpoint, exit status 2, no NaN adapter saved; loss_watchdog_threshold/patience are honoured;
learning_rate .inf is refused at validation; running out of memory is explained with the config's numbers; a full disk
during a checkpoint save fails that save clearly and leaves the previous checkpoint complete (tmpfs, as root)."""
import os
import re
import resource
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from guarantees_util import child_env, ftkit_cmd, record, write_config

RESULTS = {}


def _train(cfg, tmp_path, timeout=600, preexec=None):
    return subprocess.run(ftkit_cmd("train", cfg), capture_output=True, text=True, env=child_env(tmp_path), cwd=tmp_path,
                          timeout=timeout, preexec_fn=preexec)


def test_nan_gradient_stops_the_run_at_that_step(tmp_path):
    "weight_decay 1e30 drives a LoRA weight to inf within a few steps: the first NaN gradient stops the run before it is used."
    cfg = write_config(tmp_path, max_steps=6, weight_decay=1e30)
    r = _train(cfg, tmp_path)
    err = r.stderr
    assert r.returncode == 2, r.stdout[-2000:] + err[-2000:]
    m = re.search(r"training stopped at step (\d+): the gradient of \S+ is NaN", err)
    assert m and "Traceback" not in err, err[-3000:]
    step = int(m.group(1))
    assert step > 1 and "weight_decay 1e+30" in err and f"last good checkpoint: {tmp_path / 'out' / f'checkpoint-{step - 1}'}" in err
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()          # no NaN adapter written as the result
    assert not (tmp_path / "out" / f"checkpoint-{step}").exists()
    RESULTS["nan"] = 1


def test_collapsed_run_does_not_report_success(tmp_path):
    "learning_rate 1e30: the loss sits at ln(vocab) with a zero gradient; the run stops with an error instead of exiting 0."
    cfg = write_config(tmp_path, max_steps=8, learning_rate=1e30, warmup_steps=0, lr_scheduler="constant")
    r = _train(cfg, tmp_path)
    err = r.stderr
    assert r.returncode == 2, r.stdout[-2000:] + err[-2000:]
    assert "the gradient norm was exactly 0 for 3 logged steps" in err and "learning_rate: 1e+30" in err, err[-3000:]
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    RESULTS["collapse"] = 1


def test_loss_watchdog(tmp_path):
    cfg = write_config(tmp_path, max_steps=6, loss_watchdog_threshold=0.5, loss_watchdog_patience=2)
    r = _train(cfg, tmp_path)
    assert r.returncode == 2 and "stayed above loss_watchdog_threshold 0.5 for 2 logged steps" in r.stderr, r.stderr[-2000:]
    assert "training stopped at step 2" in r.stderr
    RESULTS["watchdog"] = 1


def test_infinite_learning_rate_is_refused_at_validation(tmp_path):
    cfg = write_config(tmp_path)
    text = cfg.read_text().replace("learning_rate: 0.002", "learning_rate: .inf")
    assert ".inf" in text
    cfg.write_text(text)
    r = subprocess.run(ftkit_cmd("validate", cfg), capture_output=True, text=True, env=child_env(tmp_path))
    line = next(i for i, l in enumerate(text.splitlines(), 1) if l.startswith("learning_rate"))
    assert r.returncode == 2 and f"learning_rate (line {line}" in r.stderr and "finite number" in r.stderr, r.stderr
    RESULTS["inf_lr"] = 1


def test_out_of_memory_is_explained_with_the_configs_numbers(tmp_path):
    "The real allocator fails (address space capped at 6 GiB): the message gives micro_batch_size x sequence_len and the knobs."
    d = tmp_path
    long = " ".join(["word"] * 3000)
    (d / "data.jsonl").write_text("\n".join('{"text": "%s"}' % long for _ in range(64)) + "\n")
    cfg = write_config(d, max_steps=1, micro_batch_size=64, sequence_len=2048, excess_length_strategy="truncate")
    cap = lambda: resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
    r = _train(cfg, d, preexec=cap)
    err = r.stderr
    assert r.returncode == 2, r.stdout[-1500:] + err[-3000:]
    assert "out of memory" in err and "micro_batch_size 64 x sequence_len 2048" in err and "Traceback" not in err, err[-3000:]
    assert "micro_batch_size: 32 with gradient_accumulation_steps: 2" in err and "gradient_checkpointing: true" in err
    RESULTS["oom"] = 1


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    from ftkit.guard import is_complete
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=11m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("this machine does not allow mounting a tmpfs")
    try:
        cfg = write_config(tmp_path, max_steps=5, output_dir=str(mnt / "out"))
        r = _train(cfg, tmp_path)
        err = r.stderr
        assert r.returncode == 2, r.stdout[-1500:] + err[-3000:]
        assert "the disk is full: saving" in err and "Traceback" not in err, err[-3000:]
        cks = sorted((mnt / "out").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        assert cks and all(is_complete(c) for c in cks), cks            # the half-written one was removed
        assert f"previous checkpoint: {cks[-1]} is complete and usable" in err
        # usable: with space again, the same command resumes from it and finishes
        subprocess.run(["mount", "-o", "remount,size=200m", str(mnt)], check=True)
        r = _train(cfg, tmp_path)
        assert r.returncode == 0 and f"resuming from {cks[-1]}" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
        RESULTS["disk_full"] = 1
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_zz_record_faults():
    record("faults", cases=len(RESULTS), proven=sorted(RESULTS), test="tests/test_guarantees_faults.py")
