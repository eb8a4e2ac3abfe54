"""Quiet cells in a real IPython shell: `%%finetune debug` prepares data as one ftkit stage line; the datasets /
transformers progress bars and deprecation warnings stay out of the cell and go to the log file.
(tests/test_quickstart_notebook.py checks the same on the quickstart's debug, train and merge cells in a Jupyter kernel.)"""
import pathlib
import re

from IPython.utils.capture import capture_output

from helpers import notebook_shell

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOISE = re.compile(r"Generating train split|\bMap\b|Flattening the indices|Saving the dataset|Loading weights|FutureWarning|it/s|examples/s")


def test_debug_cell_is_one_stage_line_and_the_noise_goes_to_the_log(tmp_path):
    ip = notebook_shell(ROOT)
    body = (ROOT / "examples" / "quickstart.yml").read_text()
    out = tmp_path / "out"
    with capture_output() as c:     # a fresh cache, so datasets really generates, maps and saves
        r = ip.run_cell(f"%%finetune debug --name quiet --set dataset_prepared_path={tmp_path / 'prep'} --set output_dir={out}\n{body}")
    assert r.success
    shown = c.stdout + c.stderr + "\n".join(o.data.get("text/plain", "") + o.data.get("text/html", "") for o in c.outputs)
    assert not NOISE.findall(shown), NOISE.findall(shown)
    stage_lines = [l for l in c.stderr.splitlines() if "load data · tokenize · cache" in l]
    assert len(stage_lines) == 1 and stage_lines[0].startswith("✔"), c.stderr
    assert 'class="tr' in shown                                              # the debug view itself is there
    # library progress bars were switched off, not just hidden: nothing to keep; whatever was logged is in the log file
    log = out / "ftkit.log"
    assert not log.exists() or "## " in log.read_text()
    from datasets.utils.tqdm import are_progress_bars_disabled
    from transformers.utils import logging as tlog
    assert not are_progress_bars_disabled() and tlog.is_progress_bar_enabled()     # restored after the cell
