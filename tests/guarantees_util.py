"""Helpers of the guarantee tests (tests/test_guarantees_*.py): small configs on the embedded model, a fork server that
runs `ftkit.cli.main(argv)` in fresh child processes (the `ftkit` command without paying the torch/transformers import
for each of dozens of runs), process inspection, and the figures file that scripts/reliability_report.py renders."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "reliability" / "figures.json"
DATA = ROOT / "examples" / "data" / "reverse_words.jsonl"


def record(section: str, **figures):
    "Merge `figures` under `section` into reliability/figures.json (read by scripts/reliability_report.py)."
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    try:
        allf = json.loads(FIGURES.read_text())
    except (OSError, ValueError):
        allf = {}
    allf[section] = {**figures, "recorded": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    tmp = FIGURES.with_suffix(".tmp")
    tmp.write_text(json.dumps(allf, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, FIGURES)
    # RELIABILITY.md and the docs page always show the figures of the last run
    subprocess.run([sys.executable, str(ROOT / "scripts" / "reliability_report.py")], check=True, capture_output=True)


def rows(n: int, start: int = 0) -> list[str]:
    "n `completion` rows (about 12 tokens each) from the bundled word-reversal data: 'a b c: c b a'."
    lines = [json.loads(l)["messages"] for l in DATA.read_text().splitlines() if l.strip()]
    return [json.dumps({"text": f"{m[1]['content']}: {m[2]['content']}"}) for m in (lines[(start + i) % len(lines)] for i in range(n))]


def write_config(d: Path, *, n_rows: int = 6, max_steps: int = 8, out: str = "out", prep: str = "prep", **extra) -> Path:
    "A tiny LoRA run of the embedded SmolLM2 in folder d (one ~12-token row per step): returns the config path."
    d.mkdir(parents=True, exist_ok=True)
    data = d / "data.jsonl"
    if not data.exists():
        data.write_text("\n".join(rows(n_rows)) + "\n")
    cfg = {"base_model": "smollm2-135m-instruct", "adapter": "lora", "lora_r": 2, "lora_alpha": 4,
           "lora_target_modules": ["q_proj", "v_proj"], "datasets": [{"path": str(data), "type": "completion"}],
           "dataset_prepared_path": str(d / prep), "sequence_len": 32, "sample_packing": False, "micro_batch_size": 1,
           "max_steps": max_steps, "save_steps": 1, "learning_rate": 2e-3, "lr_scheduler": "cosine", "warmup_steps": 2,
           "optimizer": "adamw_torch", "logging_steps": 1, "seed": 7, "output_dir": str(d / out),
           "auto_resume_from_checkpoints": True}
    cfg.update(extra)
    import yaml
    p = d / "config.yml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def child_env(tmp: Path) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=str(tmp / "hf_datasets"), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


def ftkit_cmd(*args) -> list[str]:
    return [str(Path(sys.executable).parent / "ftkit"), *map(str, args)]


def children_of(pid: int) -> list[int]:
    "Live direct children of `pid` (from /proc)."
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(p.name))
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


_SERVER = r'''
import json, os, sys, traceback
import torch, transformers, peft, datasets, yaml                          # imported once, before any fork
import ftkit.cli, ftkit.train, ftkit.data, ftkit.models, ftkit.guard, ftkit.launch
import ftkit.prompts.chat_template
print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if "wait" in req:
        pid, status = os.waitpid(req["wait"], os.WNOHANG if req.get("nohang") else 0)
        code = None if pid == 0 else (os.waitstatus_to_exitcode(status))
        print(json.dumps({"pid": req["wait"], "done": pid != 0, "code": code}), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        try:
            os.chdir(req["cwd"])
            fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1); os.dup2(fd, 2)
            code = ftkit.cli.main(req["argv"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc(); code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code or 0)
    print(json.dumps({"pid": pid}), flush=True)
'''


class ForkServer:
    "A process that has imported ftkit, torch and transformers once and forks a child per `ftkit` command."

    def __init__(self, tmp: Path):
        self.tmp = Path(tmp)
        self.p = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True, env=child_env(self.tmp), cwd=str(self.tmp))
        line = self.p.stdout.readline()
        assert line and "ready" in line, f"fork server did not start: {line!r}"

    def _ask(self, req: dict) -> dict:
        self.p.stdin.write(json.dumps(req) + "\n"); self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def start(self, argv: list[str], log: Path, cwd: Path | None = None) -> int:
        return self._ask({"argv": [str(a) for a in argv], "log": str(log), "cwd": str(cwd or self.tmp)})["pid"]

    def poll(self, pid: int):
        r = self._ask({"wait": pid, "nohang": True})
        return r["code"] if r["done"] else None

    def wait(self, pid: int) -> int:
        return self._ask({"wait": pid})["code"]

    def close(self):
        try:
            self.p.stdin.close()
            self.p.wait(timeout=10)
        except Exception:
            self.p.kill(); self.p.wait()
