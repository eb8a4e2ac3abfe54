"""Guarantee 1, kill anywhere, lose nothing: `ftkit train` (embedded SmolLM2 + LoRA, 8 tiny steps, a checkpoint after each)
is SIGKILLed at 27 points of one run's life (config, data preparation and cache write, model load, inside steps, inside
checkpoint saves, inside the final save); after each kill the next `ftkit train` of the same config
(`auto_resume_from_checkpoints: true`) resumes from the last complete checkpoint. The run that finally completes must have
the same losses, learning rates, gradient norms and adapter weights as an uninterrupted run of the same seed, bit for bit
(tolerance: exact), leave no temporary or incomplete folders, and a rerun from the final checkpoint must train no extra
step. A second test kills tokenization with 2 worker processes and checks that no worker outlives the run."""
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from guarantees_util import ForkServer, alive, child_env, children_of, ftkit_cmd, record, write_config

pytestmark = pytest.mark.slow
MAX = 8
MARKER = "ftkit-complete.json"


class Triggers:
    "Conditions on the run folder and the run's log, polled every few milliseconds."

    def __init__(self, d: Path, log: Path):
        self.d, self.log, self.out, self.prep = d, log, d / "out", d / "prep"
        self.first = {}

    def text(self):
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def ck(self, k):
        return self.out / f"checkpoint-{k}"

    # --- factories: each returns a zero-argument predicate
    def log_has(self, s):
        return lambda: s in self.text()

    def step_logged(self, k):
        return lambda: f"step {k:>5}/{MAX}" in self.text()

    def hf_cache(self, *patterns):
        "A file of the `datasets` library's own cache (HF_DATASETS_CACHE of the run) matching one of the patterns."
        return lambda: any(any((self.d.parent / "hf_datasets").rglob(p)) for p in patterns)

    def hf_builder_done(self):
        "datasets' json builder finished (its dataset_info.json in the final folder): ftkit's tokenizing begins, in memory."
        return lambda: any(not f.parent.name.endswith(".incomplete")
                           for f in (self.d.parent / "hf_datasets").rglob("dataset_info.json"))

    def tmp_cache(self, pattern="*"):
        return lambda: any(self.prep.glob(f".tmp-*/{pattern}" if pattern != "*" else ".tmp-*"))

    def cache_complete(self):
        return lambda: any(self.prep.glob(f"*/{MARKER}"))

    def ck_dir_open(self, k):
        return lambda: self.ck(k).is_dir() and not (self.ck(k) / MARKER).exists()

    def ck_file_open(self, k, name):
        return lambda: (self.ck(k) / name).exists() and not (self.ck(k) / MARKER).exists()

    def after(self, pred, delay):
        "pred became true at least `delay` seconds ago."
        key = object()
        def f():
            if pred():
                self.first.setdefault(key, time.time())
                return time.time() - self.first[key] >= delay
            return False
        return f

    def marker(self, k, delay=0.0):
        return self.after(lambda: (self.ck(k) / MARKER).exists(), delay)

    def file(self, rel):
        return lambda: (self.out / rel).exists()


def kill_points(t: Triggers):
    "(phase, what, predicate) in the order one run's life reaches them; each kill leaves the state the next one starts from."
    return [
        ("startup", "plan printed (config loaded and validated)", t.log_has("dataset cache")),
        ("data", "reading the dataset file (datasets' json builder writing)", t.hf_cache("*")),
        ("data", "tokenizing rows (in memory, as soon as datasets' json builder finished)", t.hf_builder_done()),
        ("data", "cache write: temporary folder created", t.tmp_cache()),
        ("data", "cache published, before the model loads", t.cache_complete()),
        ("model", "loading the model (0.3 s after the cache was published)", t.after(t.cache_complete(), 0.3)),
        ("model", "LoRA adapters applied", t.log_has("trainable parameters")),
        ("model", "trainer built, before step 1", t.log_has("steps:")),
        ("step", "inside step 1 (0.3 s after the trainer started)", t.after(t.log_has("steps:"), 0.3)),
        ("save", "inside save of checkpoint-1: folder created", t.ck_dir_open(1)),
        ("save", "inside save of checkpoint-1: adapter written", t.ck_file_open(1, "adapter_model.safetensors")),
        ("save", "inside save of checkpoint-1: optimizer written", t.ck_file_open(1, "optimizer.pt")),
        ("save", "checkpoint-1 complete (marker just written)", t.marker(1)),
        ("step", "after optimizer step 2, before its checkpoint", t.step_logged(2)),
        ("save", "inside save of checkpoint-2: trainer state written", t.ck_file_open(2, "trainer_state.json")),
        ("save", "inside save of checkpoint-2: RNG state written", t.ck_file_open(2, "rng_state.pth")),
        ("step", "inside step 3 (0.05 s after checkpoint-2: a step takes ~0.2 s)", t.marker(2, 0.05)),
        ("step", "after optimizer step 3, before its checkpoint", t.step_logged(3)),
        ("save", "inside save of checkpoint-3: tokenizer written", t.ck_file_open(3, "tokenizer.json")),
        ("save", "inside save of checkpoint-4: folder created", t.ck_dir_open(4)),
        ("step", "inside step 6 (0.1 s after checkpoint-5)", t.marker(5, 0.1)),
        ("save", "inside save of checkpoint-6 (epoch end): adapter written", t.ck_file_open(6, "adapter_model.safetensors")),
        ("step", "after optimizer step 7 (second epoch), before its checkpoint", t.step_logged(7)),
        ("save", "inside save of the final checkpoint-8: optimizer written", t.ck_file_open(8, "optimizer.pt")),
        ("save", "final checkpoint-8 complete, before the final outputs", t.marker(8)),
        ("final", "writing the final adapter to output_dir", t.file("adapter_model.safetensors")),
        ("final", "final outputs written, before the process exits", t.log_has("done:")),
    ]


def run_until(server, cfg, log, pred, timeout=240):
    "Start `ftkit train cfg`; SIGKILL it when pred() holds. ('killed', orphans) or ('exited', code)."
    pid = server.start(["train", cfg], log)
    seen, t0, i = set(), time.time(), 0
    while True:
        if i % 8 == 0:
            seen |= set(children_of(pid))
            code = server.poll(pid)
            if code is not None:
                return "exited", code
        i += 1
        if pred():
            seen |= set(children_of(pid))
            os.kill(pid, signal.SIGKILL)
            server.wait(pid)
            deadline = time.time() + 5
            while any(alive(k) for k in seen) and time.time() < deadline:
                time.sleep(0.05)
            return "killed", [k for k in seen if alive(k)]
        if time.time() - t0 > timeout:
            os.kill(pid, signal.SIGKILL); server.wait(pid)
            raise AssertionError(f"timeout waiting for the kill point; log:\n{log.read_text()[-3000:]}")
        time.sleep(0.002)


def history(out: Path, step=MAX):
    st = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
    return [(h["step"], h["loss"], h["learning_rate"], h["grad_norm"]) for h in st["log_history"] if "loss" in h]


def test_kill_anywhere_lose_nothing(tmp_path):
    from safetensors.torch import load_file
    t0 = time.time()
    server = ForkServer(tmp_path)
    try:
        ref_dir, kill_dir = tmp_path / "reference", tmp_path / "killed"
        # save_total_limit 3: older checkpoints are deleted only after the new one is complete
        ref_cfg, cfg = write_config(ref_dir, max_steps=MAX, save_total_limit=3), write_config(kill_dir, max_steps=MAX, save_total_limit=3)
        # the uninterrupted run of the same config and seed
        pid = server.start(["train", ref_cfg], ref_dir / "log.txt")
        assert server.wait(pid) == 0, (ref_dir / "log.txt").read_text()[-3000:]
        ref = history(ref_dir / "out")
        assert [h[0] for h in ref] == list(range(1, MAX + 1))
        shutil.rmtree(tmp_path / "hf_datasets", ignore_errors=True)       # the killed lineage starts with nothing cached

        points, survived, orphans_total = [], 0, 0
        for i, (phase, what, _) in enumerate(kill_points(Triggers(kill_dir, kill_dir / "log.txt"))):
            t = Triggers(kill_dir, kill_dir / f"log-{i:02d}.txt")
            pred = kill_points(t)[i][2]
            status, info = run_until(server, cfg, t.log, pred)
            assert status == "killed", f"kill point {i} ({what}) was never reached: exit {info}\n{t.text()[-3000:]}"
            assert info == [], f"kill point {i} ({what}): processes outlived the run: {info}"
            points.append({"phase": phase, "what": what})
            if i:
                survived += 1       # the previous kill was survived: this run started from its leftovers and got here
        # the last run: resumes from the final checkpoint, trains no extra step, exits 0
        log = kill_dir / "log-final.txt"
        pid = server.start(["train", cfg], log)
        code = server.wait(pid)
        text = log.read_text()
        assert code == 0, text[-3000:]
        survived += 1
        assert "nothing is left to train" in text and f"step {MAX + 1:>5}" not in text
        assert not (kill_dir / "out" / f"checkpoint-{MAX + 1}").exists()
        # no leftovers: temporary caches, incomplete or set-aside checkpoints
        out, prep = kill_dir / "out", kill_dir / "prep"
        assert not list(prep.glob(".tmp-*")) and not list(out.glob(".tmp-*"))
        assert not list(out.glob("*.incomplete"))
        assert all((c / MARKER).exists() for c in out.glob("checkpoint-*"))
        assert sorted(c.name for c in out.glob("checkpoint-*")) == [f"checkpoint-{k}" for k in (MAX - 2, MAX - 1, MAX)]
        # the same curve and schedule as the uninterrupted run, bit for bit
        got = history(out)
        assert got == ref, f"resumed history differs:\n{got}\nvs\n{ref}"
        a, b = load_file(out / "adapter_model.safetensors"), load_file(ref_dir / "out" / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
        record("kills", tried=len(points), survived=survived, points=points, steps=MAX, tolerance="exact (bit-identical losses, "
               "learning rates, gradient norms and adapter weights)", seconds=round(time.time() - t0, 1),
               test="tests/test_guarantees_kills.py::test_kill_anywhere_lose_nothing")
    finally:
        server.close()


def test_killed_tokenization_leaves_no_workers(tmp_path):
    "`ftkit train` (the real command) with 2 tokenization workers, SIGKILLed while they work: no worker outlives it; a rerun finishes."
    t0 = time.time()
    cfg = write_config(tmp_path, n_rows=2400, max_steps=1, dataset_num_proc=2)
    log = tmp_path / "log.txt"
    env = child_env(tmp_path)
    with open(log, "w") as f:
        p = subprocess.Popen(ftkit_cmd("train", cfg), stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    workers, deadline = [], time.time() + 180
    while time.time() < deadline and p.poll() is None:
        workers = children_of(p.pid)          # the tokenization pool: nothing else forks before it
        if len(workers) >= 2:
            break
        time.sleep(0.01)
    assert len(workers) >= 2, f"never saw 2 tokenization workers; log:\n{log.read_text()[-2000:]}"
    p.send_signal(signal.SIGKILL); p.wait()
    t = time.time() + 5
    while any(alive(w) for w in workers) and time.time() < t:
        time.sleep(0.05)
    orphans = [w for w in workers if alive(w)]
    for w in orphans:                      # do not leave them behind even when the test fails
        os.kill(w, signal.SIGKILL)
    assert orphans == [], f"{len(orphans)} tokenization workers outlived the killed run"
    r = subprocess.run(ftkit_cmd("train", cfg), capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert not list((tmp_path / "prep").glob(".tmp-*"))
    record("kills_tokenization_workers", tried=1, survived=1, workers_killed_with_parent=len(workers), orphans=0,
           seconds=round(time.time() - t0, 1), test="tests/test_guarantees_kills.py::test_killed_tokenization_leaves_no_workers")
