"examples/quickstart.ipynb executed headlessly in a real Jupyter kernel (nbclient + ipykernel), asserting on what it shows."
import json
import pathlib
import re
import shutil

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"


def _text(out) -> str:
    if out.output_type == "stream":
        return out.text
    data = out.get("data", {})
    return data.get("text/plain", "") + "\n" + data.get("text/html", "")


def _cell_text(cell) -> str:
    "Stream pieces joined as printed (a streamed reply arrives in many pieces), rich outputs on their own lines."
    out = ""
    for o in cell.get("outputs", []):
        out += o.text if o.output_type == "stream" else "\n" + _text(o) + "\n"
    return out


def _find(nb, source_start: str):
    hits = [c for c in nb.cells if c.cell_type == "code" and c.source.lstrip().startswith(source_start)]
    assert hits, f"no cell starts with {source_start!r}"
    return hits[0]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    work = tmp_path_factory.mktemp("quickstart")
    shutil.copy(ROOT / "examples" / "quickstart.ipynb", work)
    shutil.copy(ROOT / "examples" / "make_reverse_dataset.py", work)
    shutil.copytree(ROOT / "examples" / "data", work / "data")
    nb = nbformat.read(work / "quickstart.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(work)}})
    try:
        client.execute()
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, ARTIFACTS / "quickstart.executed.ipynb")
    return nb, work


def test_environment_and_plan(executed):
    nb, _ = executed
    env = _cell_text(_find(nb, "%finetune_env"))
    assert "transformers" in env and "what ftkit can use here" in env
    plan = _cell_text(_find(nb, "%%finetune plan"))
    assert "config is valid" in plan and "1 x 1 accumulation x 1 GPU(s) = 1" in plan and "packed rows" in plan
    assert "max_steps 60" in plan                                    # {steps} was interpolated


def test_debug_view_shows_masked_and_trained_tokens(executed):
    nb, _ = executed
    out = _cell_text(_find(nb, "%%finetune debug"))
    assert 'class="tr' in out and 'class="ms' in out                # trained and masked (-100) tokens
    assert "&lt;|im_end|&gt;" in out or "<|im_end|>" in out             # the end-of-turn token is visible
    m = re.search(r"trained tokens: (\d+) of (\d+)", out)
    assert m and 0 < int(m.group(1)) < int(m.group(2))


def test_training_dashboard_and_loss_went_down(executed):
    nb, work = executed
    cell = _find(nb, "%%finetune train")
    shown = [o for o in cell.outputs if o.output_type == "display_data" and "ftkit-dashboard" in o.get("data", {}).get("text/html", "")]
    assert len(shown) == 1
    data = shown[0]["data"]
    assert "data-status='finished'" in data["text/html"] and "polyline" in data["text/html"]
    summary = data["text/plain"]
    assert summary.startswith("finished: 60/60 steps")
    assert "last eval generation" in data["text/html"]              # eval_table_size: 1
    m = re.search(r"train loss ([\d.e+-]+) → ([\d.e+-]+)", summary)
    assert m and float(m.group(2)) < 0.5 * float(m.group(1)), summary
    printed = _cell_text(_find(nb, "print(f\"loss"))
    first, final = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", printed).groups())
    assert final < first
    assert (work / "outputs" / "quickstart" / "adapter_config.json").is_file()


def test_tuned_model_answers_the_heldout_prompt(executed):
    nb, work = executed
    heldout = json.loads((work / "data" / "reverse_words_heldout.jsonl").read_text().splitlines()[0])
    expected = heldout["messages"][2]["content"]
    reply = _cell_text(_find(nb, "%%finetune infer")).strip()
    assert sorted(set(reply.splitlines()[-1].split())) == sorted(set(expected.split())), reply   # the prompt's words
    score = float(re.search(r"held-out exact match: (\d+)%", _cell_text(_find(nb, "from ftkit.train import exact_match"))).group(1))
    assert score >= 70, score                                         # 20 unseen prompts, base model: 0%
    chat = _cell_text(_find(nb, "%finetune_chat")).strip()
    assert "tree house moon" in chat


def test_merge_and_evaluate(executed):
    nb, work = executed
    merged = work / "outputs" / "quickstart" / "merged"
    assert (merged / "config.json").is_file() and any(merged.glob("*.safetensors"))
    assert "merged" in _cell_text(_find(nb, "%%finetune merge"))
    ev = _cell_text(_find(nb, "%%finetune evaluate"))
    assert "perplexity" in ev


# what other libraries print when nobody quiets them: progress bars, their counters, deprecation warnings and their paths
LIBRARY_NOISE = re.compile(r"Generating train split|\bMap\b|Flattening the indices|Saving the dataset|tokenizing datasets|"
                           r"Loading weights|Writing model shards|Loading checkpoint shards|FutureWarning|DeprecationWarning|"
                           r"\d it/s|examples/s|site-packages")


def _visible(cell) -> str:
    "What a cell shows before anything is expanded: streams, text/plain, and HTML outside collapsed <details>."
    out = []
    for o in cell.get("outputs", []):
        if o.output_type == "stream":
            out.append(o.text)
        elif o.output_type == "error":
            out.append("\n".join(o.get("traceback", [])))
        else:
            d = o.get("data", {})
            out += [d.get("text/plain", ""), re.sub(r"<details.*?</details>", "", d.get("text/html", ""), flags=re.S)]
    return "\n".join(out)


def test_long_cells_show_one_ftkit_line_per_stage_and_no_library_noise(executed):
    nb, work = executed
    for start, stage in (("%%finetune debug", "load data · tokenize · cache"), ("%%finetune train", "train"),
                         ("%%finetune merge", "merge")):
        shown = _visible(_find(nb, start))
        assert not LIBRARY_NOISE.findall(shown), (start, LIBRARY_NOISE.findall(shown), shown[:3000])
        assert shown.count("ftkit-stage'") == 1 and f"✔ {stage}" in shown, (start, shown[:3000])
    # the captured messages are kept: in the collapsed details and in the run's log file
    log = (work / "outputs" / "quickstart" / "ftkit.log").read_text()
    assert "## " in log and ("FutureWarning" in log or "transformers" in log)


def test_runs_side_by_side(executed):
    nb, _ = executed
    out = _cell_text(_find(nb, "%finetune_runs"))
    assert "1 run(s)" in out and "quickstart" in out and "<polyline" in out     # the run trained above, its loss curve
