"The training dashboard on real Trainer runs: a real SIGINT stops cleanly with a resumable checkpoint; in a real Jupyter kernel the live widget becomes a static HTML record."
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY = textwrap.dedent("""
    import tempfile, torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments
    def tiny_trainer(out, steps=12, callbacks=(), **kw):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
        ids = [[(i + j) % 16 + 3 for j in range(16)] for i in range(32)]
        ds = Dataset.from_dict({"input_ids": ids, "labels": ids, "attention_mask": [[1] * 16] * 32})
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
                                 logging_steps=2, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, **kw)
        return Trainer(model=model, args=args, train_dataset=ds, eval_dataset=ds.select(range(8)), callbacks=list(callbacks))
""")
exec(TINY)  # the same helper here and in the kernel


def test_real_sigint_saves_checkpoint_and_resume_finishes(tmp_path):
    from transformers import TrainerCallback
    from ftkit.dashboard import Dashboard

    class CtrlC(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 5:
                os.kill(os.getpid(), signal.SIGINT)   # what "interrupt kernel" sends

    before = signal.getsignal(signal.SIGINT)
    dash = Dashboard(mode="text")
    t = tiny_trainer(str(tmp_path), steps=14, callbacks=[CtrlC()])
    dash.attach(t)
    t.train()                                           # returns normally: no KeyboardInterrupt escapes
    assert dash.interrupted and dash.history.step == 6
    ckpt = tmp_path / "checkpoint-6"
    assert (ckpt / "trainer_state.json").is_file() and (ckpt / "optimizer.pt").is_file()
    summary = dash.view.lines[-1]
    assert "checkpoint saved" in summary and f"resume_from_checkpoint={ckpt}" in summary
    assert signal.getsignal(signal.SIGINT) is before

    # resuming from the printed checkpoint continues at step 6 and finishes
    dash2 = Dashboard(mode="text")
    t2 = tiny_trainer(str(tmp_path), steps=14)
    dash2.attach(t2)
    t2.train(resume_from_checkpoint=str(ckpt))
    assert dash2.history.status == "finished" and dash2.history.step == 14 and dash2.history.first_step >= 6


def test_second_sigint_stops_at_once(tmp_path):
    from transformers import TrainerCallback
    from ftkit.dashboard import Dashboard

    class DoubleCtrlC(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    dash = Dashboard(mode="text")
    t = tiny_trainer(str(tmp_path), steps=40, callbacks=[DoubleCtrlC()])
    dash.attach(t)
    with pytest.raises(KeyboardInterrupt):
        t.train()
    dash.close("interrupted")
    assert signal.getsignal(signal.SIGINT) is before


def test_plain_python_gets_text_lines(tmp_path):
    code = TINY + textwrap.dedent(f"""
        from ftkit.dashboard import Dashboard
        d = Dashboard()
        t = tiny_trainer({str(tmp_path)!r}, eval_strategy="steps", eval_steps=6)
        d.attach(t); t.train()
        print("VIEW", d.view.kind)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "VIEW text" in lines
    steps = [l for l in lines if l.startswith("step ")]
    assert steps and "eval_loss" in steps[-1] and "tok/s" in steps[-1]
    assert any(l.startswith("finished: 12/12 steps") for l in lines)


def _run_nb(cells, cwd, timeout=300):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def test_in_a_jupyter_kernel_widget_then_static_record(tmp_path):
    nb = _run_nb([TINY, textwrap.dedent(f"""
        from ftkit.dashboard import Dashboard
        dash = Dashboard(title="kernel run")
        t = tiny_trainer({str(tmp_path)!r}, eval_strategy="steps", eval_steps=6)
        dash.attach(t); t.train()
        print("VIEW", dash.view.kind, len(dash.history.loss))
    """)], ROOT)
    outs = nb.cells[1].outputs
    stream = "".join(o.get("text", "") for o in outs if o.output_type == "stream")
    assert "VIEW widget 6" in stream
    shown = [o for o in outs if o.output_type == "display_data"]
    assert len(shown) == 1                                        # one dashboard, updated in place
    data = shown[0]["data"]
    assert "application/vnd.jupyter.widget-view+json" not in data  # the live widget was replaced ...
    h = data["text/html"]                                         # ... by a static HTML record
    assert "data-status='finished'" in h and "ftkit-summary" in h and "polyline" in h and "eval loss" in h
    assert data["text/plain"].startswith("finished: 12/12 steps")


def test_interrupt_kernel_stops_cleanly_with_checkpoint(tmp_path):
    "The real thing: a Jupyter kernel trains, the client sends 'interrupt kernel', the cell ends normally with a checkpoint."
    import time
    from jupyter_client.manager import start_new_kernel
    km, kc = start_new_kernel(kernel_name="python3", cwd=str(ROOT))
    try:
        def run(code, timeout=240):
            msg_id = kc.execute(code)
            out, status = [], None
            while True:
                msg = kc.get_iopub_msg(timeout=timeout)
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                t, c = msg["msg_type"], msg["content"]
                if t == "stream":
                    out.append(c["text"])
                elif t == "error":
                    out.append("ERROR " + c["ename"])
                elif t == "status" and c["execution_state"] == "idle":
                    return "".join(out)
        run(TINY)
        code = textwrap.dedent(f"""
            import time
            from transformers import TrainerCallback
            from ftkit.dashboard import Dashboard
            class Slow(TrainerCallback):
                def on_step_end(self, args, state, control, **kw):
                    if state.global_step == 3: print("STEP3", flush=True)
                    time.sleep(0.2)
            dash = Dashboard(mode="text")
            t = tiny_trainer({str(tmp_path)!r}, steps=500, callbacks=[Slow()])
            dash.attach(t); t.train()
            print("RETURNED", dash.interrupted, dash.history.step)
        """)
        msg_id = kc.execute(code)
        out = []
        deadline = time.time() + 240
        interrupted = False
        while time.time() < deadline:
            msg = kc.get_iopub_msg(timeout=240)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            t, c = msg["msg_type"], msg["content"]
            if t == "stream":
                out.append(c["text"])
                if "STEP3" in c["text"] and not interrupted:
                    km.interrupt_kernel(); interrupted = True
            elif t == "error":
                out.append("ERROR " + c["ename"])
            elif t == "status" and c["execution_state"] == "idle":
                break
        text = "".join(out)
        assert interrupted and "ERROR" not in text, text                   # no KeyboardInterrupt traceback
        step = int(text.split("RETURNED True ")[1].split()[0])
        assert step < 500 and (tmp_path / f"checkpoint-{step}" / "trainer_state.json").is_file()
        assert f"resume_from_checkpoint={tmp_path}/checkpoint-{step}" in text
        # the kernel is usable afterwards and Ctrl-C is back to normal
        assert "default_int_handler" in run("import signal; print(signal.getsignal(signal.SIGINT))")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
