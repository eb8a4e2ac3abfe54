"""A real browser: JupyterLab serves a notebook with the config form and a short training run; headless Chromium
(Debian's package, driven by Playwright) checks that the form and the dashboard render and update, fills two fields,
presses "Create cell", and saves screenshots under tests/artifacts/."""
import json
import os
import pathlib
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = pytest.mark.timeout(900)


def _requirements():
    if not os.path.exists(CHROMIUM):
        return "Debian's chromium is not installed (`make browser-deps` installs it: apt-get install -y chromium)"
    for mod, pkg in (("playwright", "playwright"), ("jupyterlab", "jupyterlab")):
        try:
            __import__(mod)
        except ImportError:
            return f"{pkg} is not installed (it is in the dev extra: pip install -e '.[dev]')"
    return None


_missing = _requirements()
# outside CI a machine without Chromium skips with the reason; in CI (CI=true) the test fails instead, since it must run there
skip_reason = pytest.mark.skipif(_missing is not None and not os.environ.get("CI"), reason=_missing or "")

SETUP = """\
%load_ext ftkit
import ftkit, time, tempfile, torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments
from ftkit.dashboard import Dashboard
import ipywidgets
ipywidgets.Label("widgets ready")   # the probe: renders once the front end's widget manager is listening
"""
FORM = "form = ftkit.form('quickstart.yml')\nform"
TRAIN = """\
class Slow(TrainerCallback):      # a few seconds of training, so the browser sees the dashboard move
    def on_step_end(self, args, state, control, **kw): time.sleep(0.25)
torch.set_num_threads(1)   # leave a core to the browser on a 2-core CI machine
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
ids = [[(i + j) % 16 + 3 for j in range(16)] for i in range(32)]
ds = Dataset.from_dict({"input_ids": ids, "labels": ids, "attention_mask": [[1] * 16] * 32})
args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=60, per_device_train_batch_size=4, learning_rate=1e-2,
                         logging_steps=2, eval_strategy="steps", eval_steps=10, report_to=[], save_strategy="no",
                         use_cpu=True, disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=ds, eval_dataset=ds.select(range(8)), callbacks=[Slow()])
dash = Dashboard(title="browser test run").attach(trainer)
trainer.train()
"""


NB7_SETUP = "%load_ext ftkit\nimport ftkit, ipywidgets\nipywidgets.Label(\"widgets ready\")"
NB7_FORM = "form = ftkit.form('quickstart.yml')\nform"
NB7_FALLBACK = "form2 = ftkit.form('quickstart.yml', name='copied')\nform2.insert_cells = False   # as on Colab / VS Code\nform2"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    work = tmp_path_factory.mktemp("lab")
    home = tmp_path_factory.mktemp("home")
    shutil.copy(ROOT / "examples" / "quickstart.yml", work)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in (SETUP, FORM, TRAIN)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, work / "browser.ipynb")
    nb7 = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in (NB7_SETUP, NB7_FORM, NB7_FALLBACK)])
    nb7.metadata["kernelspec"] = nb.metadata["kernelspec"]
    nbformat.write(nb7, work / "nb7.ipynb")
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "HOME": str(home), "JUPYTER_CONFIG_DIR": str(home / ".jupyter"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces")}
    # the kernel must be this interpreter's (the venv's); kernelspec "python3" with argv[0] "python" resolves to it
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--ServerApp.port={port}", "--ServerApp.ip=127.0.0.1",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
           "--ServerApp.disable_check_xsrf=True", "--allow-root", "--LabApp.extension_manager=readonly", "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    log = open(work / "lab.log", "w")
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
            break
        except Exception:
            if proc.poll() is not None:
                raise RuntimeError("jupyter lab exited: " + (work / "lab.log").read_text()[-3000:])
            time.sleep(0.5)
    else:
        proc.terminate()
        raise RuntimeError("jupyter lab did not start: " + (work / "lab.log").read_text()[-3000:])
    yield base, token, work
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


def _chromium(p, tmp_path):
    "Debian's Chromium, headless, with a fresh profile folder per run (Playwright passes it as --user-data-dir)."
    return p.chromium.launch_persistent_context(
        str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, viewport={"width": 1400, "height": 1000},
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--no-first-run", "--disable-quic"])


def _run_probe(page, first_cell, key="Control+Enter", tries=4):
    """Run the first cell until its probe widget renders. On a loaded machine JupyterLab's widget manager can start
    listening after the kernel already sent the first widgets ("widget model not found" in the console, nothing drawn):
    running the cell again, as a user would, then renders it."""
    for _ in range(tries):
        first_cell.locator(".jp-InputPrompt").click()
        page.keyboard.press(key)
        try:
            page.wait_for_selector(".widget-label:has-text('widgets ready')", timeout=30_000)
            return
        except Exception:
            continue
    raise AssertionError("the probe widget never rendered: the front end's widget manager did not start")


@skip_reason
def test_form_and_dashboard_in_jupyterlab(tmp_path, request):
    if _missing:
        pytest.fail(f"the browser test must run in CI: {_missing}")
    lab = request.getfixturevalue("lab")
    from playwright.sync_api import sync_playwright
    base, token, work = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = _chromium(p, tmp_path)
        page = browser.new_page()
        page.set_default_timeout(120_000)
        console = []
        page.on("console", lambda m: console.append(m.text))
        try:
            page.goto(f"{base}/lab/tree/browser.ipynb?token={token}")
            # JupyterLab as it ships (no window.jupyterapp): run the three cells from the keyboard, as a user would
            page.wait_for_selector(".jp-Notebook .jp-Cell .cm-content")
            page.get_by_text("Python 3 (ipykernel) | Idle").wait_for()      # the status bar: kernel started
            cells = page.locator(".jp-Notebook .jp-Cell")
            _run_probe(page, cells.nth(0))                                   # setup + the widgets-ready probe
            # The form. Two full `make test` runs on a loaded 2-core machine saw its status drawn but no tabs, with
            # "widget model not found" in the browser console (section views whose children JupyterLab's widget
            # manager had not registered). Where that happens the form cell is run again once, as a user would, and
            # must then draw every tab.
            drawn = "() => document.querySelectorAll('.ftkit-form .lm-TabBar-tab').length >= 11"
            for attempt in range(2):
                cells.nth(1).locator(".jp-InputPrompt").click()
                page.keyboard.press("Control+Enter")
                try:
                    page.wait_for_function(drawn, timeout=60_000 if attempt == 0 else 120_000)
                    break
                except Exception:
                    if attempt: raise
            cells.nth(2).locator(".jp-InputPrompt").click()
            page.keyboard.press("Control+Enter")                            # the training run

            def shot(name):
                news = page.locator(".jp-Notification-Toast button:has-text('No')")   # JupyterLab's news prompt
                if news.count() and news.first.is_visible():
                    news.first.click()
                page.screenshot(path=str(ARTIFACTS / name))

            # the form renders: sections as tabs, fields with their values
            page.wait_for_selector(".ftkit-form .ftkit-form-status :text('valid config')")
            assert page.locator(".ftkit-form .lm-TabBar-tab").count() == 11
            shot("browser_form.png")

            # the dashboard renders and updates while training
            page.wait_for_selector(".ftkit-dashboard[data-status='training']")
            first = int(page.locator(".ftkit-dashboard").first.get_attribute("data-step"))
            page.wait_for_function(f"() => {{ const d = document.querySelector('.ftkit-dashboard'); "
                                   f"return d && +d.dataset.step >= {first} + 6; }}")
            assert page.locator(".ftkit-dashboard-widget .progress-bar, .ftkit-dashboard-widget [class*='progress']").count() >= 1   # the live widget's bar
            # the live view re-renders as steps come in, so the element may be replaced under us: scroll by script
            page.evaluate("() => document.querySelector('.ftkit-dashboard')?.scrollIntoView()")
            shot("browser_dashboard_training.png")
            page.wait_for_selector(".ftkit-dashboard[data-status='finished']", timeout=300_000)
            final = page.locator(".ftkit-dashboard[data-status='finished']").first
            assert final.locator("polyline").count() >= 2 and "eval loss" in final.inner_text()
            assert "train loss" in page.locator(".ftkit-summary").first.inner_text()
            final.scroll_into_view_if_needed()
            shot("browser_dashboard_finished.png")

            # fill two fields of the form (the kernel is idle again), then "Create cell"
            form = page.locator(".ftkit-form").first
            form.scroll_into_view_if_needed()
            form.locator(".lm-TabBar-tab", has_text="training").click()
            steps = form.locator(".ftkit-field-max_steps input")
            steps.fill("25"); steps.press("Tab")
            form.locator(".lm-TabBar-tab", has_text="logging").click()
            out = form.locator(".ftkit-field-output_dir input")
            out.fill("./outputs/from-browser"); out.press("Tab")
            form.locator(".lm-TabBar-tab", has_text="training").click()
            lr = form.locator(".ftkit-field-learning_rate input")
            lr.fill("0"); lr.press("Tab")                                   # an invalid value: the message appears by the field
            page.wait_for_selector(".ftkit-field-learning_rate .ftkit-msg")
            assert "greater than 0" in form.locator(".ftkit-field-learning_rate").inner_text()
            shot("browser_form_validation.png")
            lr.fill("0.001"); lr.press("Tab")
            page.wait_for_function("() => !document.querySelector('.ftkit-field-learning_rate .ftkit-msg')")
            form.locator(".ftkit-create-cell").click()
            page.wait_for_selector(".ftkit-form[data-inserted]", state="attached")
            assert form.get_attribute("data-inserted") == "keys"       # the path JupyterLab users get
            assert not form.locator(".ftkit-copy").is_visible()          # inserted: no copy box
            page.wait_for_function("() => [...document.querySelectorAll('.jp-Cell .cm-content')]"
                                   ".some(e => e.innerText.includes('%%finetune train') && e.innerText.includes('max_steps: 25'))")
            text = page.evaluate("() => [...document.querySelectorAll('.jp-Cell .cm-content')].map(e => e.innerText)"
                                 ".find(t => t.includes('%%finetune train'))")
            assert "output_dir: ./outputs/from-browser" in text and "learning_rate: 0.001" in text
            page.locator(".jp-Cell .cm-content", has_text="%%finetune train").first.scroll_into_view_if_needed()
            shot("browser_created_cell.png")
        finally:
            page.screenshot(path=str(ARTIFACTS / "browser_last.png"))
            (ARTIFACTS / "browser_console.log").write_text("\n".join(console))
            browser.close()


@skip_reason
def test_form_create_cell_in_notebook7_and_copy_fallback(tmp_path, request):
    "Notebook 7 (the notebook package on the same server): Create cell inserts the cell; where insertion is off, Copy."
    if _missing:
        pytest.fail(f"the browser test must run in CI: {_missing}")
    try:
        import notebook  # noqa: F401  (Notebook 7 serves /notebooks/ on the Jupyter server)
    except ImportError:
        pytest.fail("the notebook package (Notebook 7) is not installed (it is in the dev extra)")
    lab = request.getfixturevalue("lab")
    from playwright.sync_api import sync_playwright
    base, token, work = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = _chromium(p, tmp_path)
        browser.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
        page = browser.new_page()
        page.set_default_timeout(120_000)
        console = []
        page.on("console", lambda m: console.append(m.text))
        try:
            page.goto(f"{base}/notebooks/nb7.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook .jp-Cell .cm-content")
            assert "/notebooks/nb7.ipynb" in page.url             # Notebook 7's own page (JupyterLab lives under /lab)
            # run the first cell until the kernel has taken it (Notebook 7 has no status-bar text to wait for)
            first = page.locator(".jp-Cell").first
            for _ in range(30):
                first.locator(".jp-InputPrompt").click()
                page.keyboard.press("Control+Enter")
                try:
                    page.wait_for_function("() => /\\[[0-9]+\\]/.test(document.querySelector('.jp-Cell .jp-InputPrompt').innerText)", timeout=5000)
                    break
                except Exception:
                    continue
            _run_probe(page, first)                                          # the widgets-ready probe rendered
            # The two form cells. A full `make test` run once saw the training section drawn as Notebook's "Click to
            # show javascript error" box (the section's view failed in the front end's widget manager; the same test
            # alone and both browser tests together pass). Where a section is not drawn, the error text and the
            # console go to the test output and the two cells are run again once, as a user would; then it must draw.
            for attempt in range(2):
                page.locator(".jp-Cell").nth(1).locator(".jp-InputPrompt").click()
                for _ in range(2):
                    page.keyboard.press("Shift+Enter")
                    time.sleep(0.3)
                page.wait_for_selector(".ftkit-form >> nth=1")
                form, form2 = page.locator(".ftkit-form").nth(0), page.locator(".ftkit-form").nth(1)
                form.locator(".ftkit-form-status :text('valid config')").wait_for()
                # Lumino draws the tab bar in an animation frame: bring the form into view and wait for its tabs (a
                # full `make test` run on a loaded machine once timed out clicking a tab that was not drawn yet)
                form.scroll_into_view_if_needed()
                page.wait_for_function("() => document.querySelectorAll('.ftkit-form')[0]?.querySelectorAll('.lm-TabBar-tab').length >= 11")
                form.locator(".lm-TabBar-tab", has_text="training").click()
                steps = form.locator(".ftkit-field-max_steps input")
                try:
                    steps.wait_for(state="visible", timeout=60_000 if attempt == 0 else 120_000)
                    break
                except Exception:
                    errs = form.locator(".jupyter-widgets-error-widget, .jp-RenderedText[data-mime-type*='stderr']")
                    print(f"attempt {attempt + 1}: the training section was not drawn; error views: "
                          f"{errs.all_inner_texts()[:3]}; console: {console[-15:]}")
                    page.screenshot(path=str(ARTIFACTS / f"browser_nb7_section_error_{attempt + 1}.png"))
                    if attempt: raise
            steps.fill("7"); steps.press("Tab")
            form.locator(".ftkit-create-cell").click()
            page.wait_for_selector(".ftkit-form[data-inserted]", state="attached")
            assert form.get_attribute("data-inserted") == "keys", form.get_attribute("data-inserted")
            page.wait_for_function("() => [...document.querySelectorAll('.jp-Cell .cm-content')]"
                                   ".some(e => e.innerText.includes('%%finetune train') && e.innerText.includes('max_steps: 7'))")
            assert not form.locator(".ftkit-copy").is_visible()
            page.locator(".jp-Cell .cm-content", has_text="%%finetune train").first.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "browser_nb7_created_cell.png"))

            # where a front end cannot insert cells: the cell text and a Copy button that copies it
            n_cells = page.locator(".jp-Cell").count()
            form2.scroll_into_view_if_needed()
            form2.locator(".ftkit-create-cell").click()
            box = form2.locator(".ftkit-copy")
            box.wait_for(state="visible")
            text = box.locator("textarea").input_value()
            assert text.startswith("%%finetune train --name copied\n") and "lora_r: 16" in text
            box.locator(".ftkit-copy-button").click()
            page.wait_for_selector(".ftkit-copy[data-copied]")
            assert box.locator(".ftkit-copy-button").inner_text() == "Copied"
            assert page.evaluate("() => navigator.clipboard.readText()") == text
            assert page.locator(".jp-Cell").count() == n_cells                       # nothing was inserted
            box.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "browser_form_fallback.png"))
        finally:
            page.screenshot(path=str(ARTIFACTS / "browser_nb7_last.png"))
            browser.close()
