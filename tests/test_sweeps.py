"""ftkit.sweeps: Axolotl's sweep format over a tiny model: every variant trains in its own output_dir with its own
values, one table and one plot hold every run, and Ctrl-C stops at a run boundary with the finished runs kept."""
import json, os, signal, time
from pathlib import Path

import pytest
import yaml
from transformers import TrainerCallback

from ftkit.config import ConfigError
from ftkit.sweeps import SweepResult, plan, read_spec, sweep
from ftkit.train import train

from helpers import StubTok, counting_data, tiny_llama

BASE = {"learning_rate": 1e-2, "micro_batch_size": 4, "sequence_len": 32, "sample_packing": True, "max_steps": 4,
        "optimizer": "adamw_torch", "seed": 3, "logging_steps": 1, "save_strategy": "no", "dataloader_num_workers": 0,
        "datasets": [{"path": "unused.jsonl", "type": "chat_template"}]}

SWEEP = """
_:
  - {warmup_steps: 0, lr_scheduler: constant}
  - {warmup_steps: 2, lr_scheduler: cosine}
learning_rate: [0.01, 0.001]
"""


def _runner(extra_callbacks=()):
    def run(cfg):
        return train(cfg, data=(counting_data(160), None), model=tiny_llama(vocab_size=64, attn="ftkit_varlen", seed=0),
                     tokenizer=StubTok(), quiet=True, callbacks=list(extra_callbacks))
    return run


def test_grid_with_paired_keys_runs_every_variant_in_its_own_dir(tmp_path):
    (tmp_path / "sweep.yml").write_text(SWEEP)
    res = sweep({**BASE, "output_dir": str(tmp_path / "out")}, tmp_path / "sweep.yml", run=_runner(), quiet=True)
    assert isinstance(res, SweepResult) and [r.status for r in res.runs] == ["done"] * 4 and res.stopped is None
    seen = set()
    for r in res.runs:
        saved = yaml.safe_load((r.output_dir / "config.yml").read_text())      # each variant trained with its own values
        assert r.output_dir.parent == tmp_path / "out" and saved["output_dir"] == str(r.output_dir)
        assert {k: saved[k] for k in r.overrides} == r.overrides
        assert r.result.global_step == 4 and sorted(r.losses) == [1, 2, 3, 4]
        seen.add((saved["learning_rate"], saved["lr_scheduler"], saved["warmup_steps"]))
    assert seen == {(lr, s, w) for lr in (0.01, 0.001) for s, w in (("constant", 0), ("cosine", 2))}
    # the constant schedule's first step already uses the full rate; warmup's first step uses 0 (same data, same init)
    by = {(r.overrides["learning_rate"], r.overrides["lr_scheduler"]): r.result for r in res.runs}
    assert by[(0.01, "constant")].lrs[1] == pytest.approx(0.01) and by[(0.01, "cosine")].lrs[1] == 0
    # one table (also sweep.jsonl) and one plot with a curve per run
    rows = res.table()
    assert [row["run"] for row in rows] == [0, 1, 2, 3]
    assert all(row["final_loss"] == r.losses[4] and row["steps"] == 4 for row, r in zip(rows, res.runs))
    assert [json.loads(l)["run"] for l in (tmp_path / "out" / "sweep.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    svg = (tmp_path / "out" / "sweep_losses.svg").read_text()
    assert svg.count("class='ftkit-curve'") == 4 and svg == res.svg()
    assert res.best().status == "done" and "4/4 runs finished" in repr(res) and "<svg" in res._repr_html_()


class _CtrlCAt(TrainerCallback):
    "Sends the process a real SIGINT (what Ctrl-C does) at one step of the n-th run."
    def __init__(self, run_no, step): self.run_no, self.step, self.runs = run_no, step, 0
    def on_train_begin(self, args, state, control, **kw): self.runs += 1
    def on_step_end(self, args, state, control, **kw):
        if self.runs == self.run_no and state.global_step == self.step: os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_stops_at_the_run_boundary_and_keeps_finished_runs(tmp_path, capsys):
    res = sweep({**BASE, "output_dir": str(tmp_path / "out")}, {"learning_rate": [0.01, 0.005, 0.001]},
                run=_runner([_CtrlCAt(run_no=2, step=2)]))
    assert [r.status for r in res.runs] == ["done", "done", "skipped"] and res.stopped == "interrupted"
    assert res.runs[1].result.global_step == 4                 # the run in progress finished its steps
    assert all((r.output_dir / "config.yml").exists() for r in res.runs[:2]) and not res.runs[2].output_dir.exists()
    assert "stopping after this run" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # the sweep's handler is gone
    assert [json.loads(l)["status"] for l in (tmp_path / "out" / "sweep.jsonl").read_text().splitlines()] == ["done", "done", "skipped"]


def test_random_draws_and_every_variant_is_validated_before_training(tmp_path):
    base = {**BASE, "output_dir": str(tmp_path / "out")}
    runs = plan(base, {"learning_rate": [1e-2, 1e-3, 1e-4], "lora_r": [8, 16], "_method": "random", "_samples": 3, "_seed": 1})
    assert len(runs) == 3 and len({(r.cfg.learning_rate, r.cfg.lora_r) for r in runs}) == 3
    with pytest.raises(ConfigError) as e:
        sweep(base, {"learning_rate": [1e-2, "fast"]}, run=lambda cfg: pytest.fail("nothing may train"))
    assert "variant 1" in str(e.value)
    with pytest.raises(ConfigError, match="_samples"):
        read_spec({"learning_rate": [1e-2], "_method": "random"})


def test_cli_train_sweep_runs_each_variant_from_a_tiny_local_model(tmp_path, root, capsys):
    "`ftkit train CONFIG --sweep SWEEP.yml` on a tiny Llama saved with a local tokenizer (a real model folder, loaded by path)."
    from ftkit.cli import main
    from ftkit_test_tokenizers import llama3
    tok = llama3()
    model_dir = tmp_path / "tiny"
    tiny_llama(vocab_size=len(tok), attn="sdpa", seed=0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cfg = {**BASE, "base_model": str(model_dir), "output_dir": str(tmp_path / "out"), "max_steps": 2, "sequence_len": 128,
           "dataset_prepared_path": str(tmp_path / "prep"),
           "datasets": [{"path": str(root / "examples/data/reverse_words.jsonl"), "type": "chat_template"}]}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "s.yml").write_text("learning_rate: [0.01, 0.001]\n")
    assert main(["train", str(tmp_path / "c.yml"), "--sweep", str(tmp_path / "s.yml")]) == 0
    out = capsys.readouterr().out
    assert "2/2 runs finished" in out and "sweep_losses.svg" in out
    rows = [json.loads(l) for l in (tmp_path / "out" / "sweep.jsonl").read_text().splitlines()]
    assert [(r["learning_rate"], r["status"], r["steps"]) for r in rows] == [(0.01, "done", 2), (0.001, "done", 2)]
    for r in rows:                                       # each variant: its own folder, metrics.jsonl and saved config
        d = Path(r["output_dir"])
        assert yaml.safe_load((d / "config.yml").read_text())["learning_rate"] == r["learning_rate"]
        assert (d / "metrics.jsonl").exists()
    assert main(["train", str(tmp_path / "c.yml"), "--sweep", str(tmp_path / "s.yml"), "--launcher", "accelerate"]) != 0


def test_finetune_sweep_magic_keeps_every_run_and_each_dashboard_says_where_it_is_tracked(tmp_path, root):
    "`%%finetune sweep` in a real IPython shell: config, `---`, sweep values; run object `sw.sweep` holds every run."
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.testing.globalipapp import start_ipython
    from IPython.utils.capture import capture_output
    from ftkit_test_tokenizers import llama3
    ip = start_ipython() or InteractiveShell.instance()
    ip.display_formatter.active_types = ["text/plain", "text/html"]
    ip.display_formatter.formatters["text/html"].enabled = True
    ip.run_line_magic("load_ext", "ftkit")
    tok = llama3()
    model_dir = tmp_path / "tiny"
    tiny_llama(vocab_size=len(tok), attn="sdpa", seed=0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cfg = {**BASE, "base_model": str(model_dir), "output_dir": str(tmp_path / "out"), "max_steps": 2, "sequence_len": 128,
           "dataset_prepared_path": str(tmp_path / "prep"), "use_tensorboard": True,
           "datasets": [{"path": str(root / "examples/data/reverse_words.jsonl"), "type": "chat_template"}]}
    body = yaml.safe_dump(cfg) + "---\nlearning_rate: [0.01, 0.001]\n"
    with capture_output() as c:
        r = ip.run_cell(f"%%finetune sweep --name sw --dashboard text\n{body}")
    assert r.success, c.stdout[-2000:]
    res = ip.user_ns["sw"].sweep
    assert [x.status for x in res.runs] == ["done", "done"] and [x.cfg.learning_rate for x in res.runs] == [0.01, 0.001]
    for x in res.runs:                                   # each variant's dashboard names its own TensorBoard folder
        assert f"tracked: TensorBoard event files in {x.output_dir.resolve()}/runs" in c.stdout
        assert list((x.output_dir / "runs").rglob("events.out.tfevents.*"))
    html = "\n".join(o.data.get("text/html", "") for o in c.outputs)
    assert "ftkit-sweep" in html and html.count("class='ftkit-curve'") == 2
    with capture_output() as c:
        ip.run_cell("%%finetune sweep --name sw2\n" + yaml.safe_dump(cfg))
    assert "write the sweep values after a `---` line" in c.stdout + "\n".join(o.data.get("text/plain", "") for o in c.outputs)


def _saved_tiny_model(tmp_path, root):
    "A tiny Llama + local tokenizer saved as a model folder, and a base config over the bundled chat data."
    from ftkit_test_tokenizers import llama3
    tok = llama3()
    model_dir = tmp_path / "tiny"
    tiny_llama(vocab_size=len(tok), attn="sdpa", seed=0).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return {**BASE, "base_model": str(model_dir), "output_dir": str(tmp_path / "out"), "max_steps": 3, "sequence_len": 128,
            "logging_steps": 1, "dataset_prepared_path": str(tmp_path / "prep"), "dataloader_num_workers": 0,
            "datasets": [{"path": str(root / "examples/data/reverse_words.jsonl"), "type": "chat_template", "split": "train[:200]"}]}


def _check_side_by_side(res, n):
    assert [r.status for r in res.runs] == ["done"] * n, [(r.status, r.error) for r in res.runs]
    for r in res.runs:                                   # each variant: its own process, folder, config and metrics
        assert r.result.global_step == 3 and sorted(r.losses) == [1, 2, 3] and r.result.returncode == 0
        assert yaml.safe_load((r.output_dir / "config.yml").read_text())["learning_rate"] == r.overrides["learning_rate"]
    a, b = res.runs                                        # the two processes were alive at the same time (the runner
    assert a.launched < b.exited and b.launched < a.exited # started both before either ended; whether their few training
                                                           # steps overlap too is up to the OS scheduler on 2 cores)
    rows = [json.loads(l) for l in (res.root / "sweep.jsonl").read_text().splitlines()]
    assert [(x["status"], x["steps"]) for x in rows] == [("done", 3)] * n


def test_two_variants_run_at_once_as_two_cpu_processes(tmp_path, root):
    "devices=['', '']: two child `ftkit train` processes on the CPU at the same time (the path several GPUs take)."
    from ftkit.sweeps import sweep_devices
    assert sweep_devices(["", ""]) == ["", ""] and sweep_devices([]) == []
    res = sweep(_saved_tiny_model(tmp_path, root), {"learning_rate": [1e-2, 1e-3]}, devices=["", ""], quiet=True)
    _check_side_by_side(res, 2)
    assert [r.device for r in res.runs] == ["", ""] and not (res.runs[0].output_dir / "peak_memory.jsonl").exists()


@pytest.mark.gpu
def test_sweep_on_two_gpus_runs_one_variant_per_gpu(tmp_path, root):
    "With 2 GPUs visible, `ftkit train --sweep` runs the variants side by side, each child seeing one GPU."
    import torch
    if torch.cuda.device_count() < 2: pytest.skip("needs 2 GPUs")
    from ftkit.cli import main
    from ftkit.sweeps import sweep_devices
    assert sweep_devices() == [str(i) for i in range(torch.cuda.device_count())]
    cfg = _saved_tiny_model(tmp_path, root)
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg)); (tmp_path / "s.yml").write_text("learning_rate: [0.01, 0.001]\n")
    t0 = time.time()
    assert main(["train", str(tmp_path / "c.yml"), "--sweep", str(tmp_path / "s.yml")]) == 0
    wall = time.time() - t0
    from ftkit.sweeps import ChildResult
    rows = [json.loads(l) for l in (Path(cfg["output_dir"]) / "sweep.jsonl").read_text().splitlines()]
    assert sorted(r["device"] for r in rows) == ["0", "1"] and all(r["status"] == "done" for r in rows)   # one GPU each
    res = [ChildResult.read(r["output_dir"], 0) for r in rows]
    assert all(r.global_step == 3 for r in res)
    assert wall < sum(r["seconds"] for r in rows), (wall, rows)   # the two processes' lifetimes overlapped (one after the
                                                                  # other, the sweep would take at least their sum)
    for r in rows:                                       # each child trained on a GPU (its peak memory is recorded), alone
        peak = [json.loads(l) for l in (Path(r["output_dir"]) / "peak_memory.jsonl").read_text().splitlines()]
        assert [p["rank"] for p in peak] == [0] and peak[0]["peak_gib"] > 0
