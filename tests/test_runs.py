"""Runs side by side (ftkit.compare.runs, %finetune_runs) on runs trained in this test, and the two-config debug view
(`%%finetune debug --against`), in a real IPython shell."""
import pathlib

import pytest
from IPython.utils.capture import capture_output

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart.yml"


def _shell():
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.testing.globalipapp import start_ipython
    return start_ipython() or InteractiveShell.instance()


@pytest.fixture(scope="module")
def ip():
    shell = _shell()
    shell.display_formatter.active_types = ["text/plain", "text/html"]
    shell.display_formatter.formatters["text/html"].enabled = True
    shell.run_line_magic("load_ext", "ftkit")
    shell.run_line_magic("cd", str(ROOT))
    return shell


def tiny_model(dest):
    "A tiny random Llama with the embedded model's tokenizer (and chat template): the quickstart's data, in seconds."
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from ftkit.config import load
    from ftkit.models import load_tokenizer
    tok = load_tokenizer(load(QUICKSTART), quiet=True)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    "Two real runs of the quickstart config (3 steps each, a tiny random model, CPU) that differ in learning rate, as `ftkit train` makes them."
    from ftkit.cli import main
    root = tmp_path_factory.mktemp("sweep")
    prep = tmp_path_factory.mktemp("prep")
    model = tiny_model(tmp_path_factory.mktemp("tiny"))
    for name, lr in (("base", "3e-2"), ("lr-low", "1e-6")):
        rc = main(["train", str(QUICKSTART), "--base-model", str(model), "--max-steps", "3", "--logging-steps", "1",
                   "--eval-steps", "3", "--sequence-len", "128", "--learning-rate", lr, "--warmup-steps", "0",
                   "--output-dir", str(root / name), "--dataset-prepared-path", str(prep)])
        assert rc == 0
    return root


def test_runs_lists_trained_runs_with_diff_losses_speed_and_chart(sweep):
    import ftkit
    rs = ftkit.runs(sweep)
    assert [r.name for r in rs] == ["base", "lr-low"]                       # oldest first
    assert rs.diff(1) == {"learning_rate": (0.03, 1e-06)}                    # output_dir is the name, not a change
    for r in rs:
        assert r.steps == 3 and len(r.losses) == 3 and r.final_loss is not None
        assert r.final_eval_loss is not None and r.tokens_per_s > 0 and 0 < r.duration < 600
    # the same seed: the same first batch and initial loss; after 3 steps the higher learning rate evaluates lower
    assert abs(rs[0].first_loss - rs[1].first_loss) < 1e-4
    assert rs[0].final_eval_loss < rs[1].final_eval_loss - 0.02
    text, page = str(rs), rs._repr_html_()
    assert "learning_rate: 0.03 → 1e-06" in text and "baseline" in text
    assert page.count("<polyline") == 2 and page.count("<circle") == 2          # two loss curves, one eval point each


def test_finetune_runs_magic(ip, sweep):
    with capture_output() as c:
        ip.run_line_magic("finetune_runs", str(sweep))
    html = "\n".join(o.data.get("text/html", "") for o in c.outputs)
    assert "2 run(s)" in html and "lr-low" in html and "<svg" in html
    with capture_output() as c:
        ip.run_line_magic("finetune_runs", str(sweep / "nothing-here"))
    assert "no runs under" in "\n".join(o.data.get("text/plain", "") for o in c.outputs)


def test_debug_against_another_config_highlights_differing_labels(ip, tmp_path):
    other = tmp_path / "other.yml"
    other.write_text(QUICKSTART.read_text().replace("roles_to_train: [assistant]", "roles_to_train: [user, assistant]"))
    with capture_output() as c:
        r = ip.run_cell(f"%%finetune debug --name cmp --against {other}\n" + QUICKSTART.read_text())
    assert r.success
    html = "\n".join(o.data.get("text/html", "") for o in c.outputs)
    text = "\n".join(o.data.get("text/plain", "") for o in c.outputs)
    assert "datasets[0].roles_to_train" in text and "token(s) differ" in text
    assert 'class="ms df' in html and 'class="tr df' in html                  # masked here, trained there: underlined
    # against a run object in the notebook
    ip.run_cell("%%finetune validate --name other_run\n" + other.read_text())
    with capture_output() as c:
        r = ip.run_cell("%%finetune debug --name cmp --against other_run\n# (the config of cmp)")
    assert r.success and "token(s) differ" in "\n".join(o.data.get("text/plain", "") for o in c.outputs)
    with capture_output() as c:
        ip.run_cell("%%finetune debug --name cmp --against nowhere.yml\n# (the config of cmp)")
    assert "neither a config file nor a run object" in "\n".join(o.data.get("text/plain", "") + o.data.get("text/html", "") for o in c.outputs)
