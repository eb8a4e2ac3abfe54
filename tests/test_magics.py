"%%finetune and friends driven in a real IPython shell (the same magic machinery a Jupyter kernel runs)."
import pathlib

import pytest
from IPython.utils.capture import capture_output

from helpers import notebook_shell

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = (ROOT / "examples" / "quickstart.yml").read_text()


@pytest.fixture(scope="module")
def ip(tmp_path_factory):
    shell = notebook_shell(ROOT)
    shell.user_ns["_prep"] = str(tmp_path_factory.mktemp("prep"))
    return shell


def run(ip, line, body=""):
    "Run `%%finetune line` + body as a real cell; return (captured output, ExecutionResult)."
    with capture_output() as c:
        r = ip.run_cell(f"%%finetune {line}\n{body}")
    return c, r


def html_of(c):
    return "\n".join(o.data.get("text/html", "") for o in c.outputs)


def text_of(c):
    return "\n".join(o.data.get("text/plain", "") for o in c.outputs) + c.stdout


def test_load_ext_registers_the_magics(ip):
    for kind, name in [("cell", "finetune"), ("line", "finetune"), ("line", "finetune_env"), ("line", "finetune_chat"),
                       ("line", "finetune_form")]:
        assert ip.find_magic(name, kind) is not None, (kind, name)


def test_config_mistakes_are_shown_on_the_cell_lines_without_traceback(ip):
    body = "base_model: smollm2-135m-instruct\nadapter: lora\nlora_r: 0\nlearning_rat: 2e-4\nmicro_batch_size: two\n"
    c, r = run(ip, "validate", body)
    assert r.success and r.error_in_exec is None
    h = html_of(c)
    for line in (3, 4, 5):
        assert f"class='bad' data-line='{line}'" in h
    assert "Did you mean &#x27;learning_rate&#x27;?" in h
    assert "class='bad' data-line='1'" not in h
    assert "Traceback" not in c.stdout + c.stderr
    assert "problems in this cell" in text_of(c) or "problem" in text_of(c)


def test_yaml_syntax_error_points_at_its_line(ip):
    c, r = run(ip, "validate", "learning_rate: 1e-4\ndatasets:\n  - path: a.jsonl\n   type: chat_template\n")
    assert r.success and "YAML syntax error" in text_of(c)
    assert "class='bad' data-line='4'" in html_of(c)


def test_interpolation_set_and_escaped_braces(ip):
    ip.user_ns.update(lr=3e-4, data_file="examples/data/reverse_words.jsonl", mods=["q_proj", "v_proj"])
    body = ("datasets:\n  - path: {data_file}\n    type:\n      field_instruction: q\n      field_output: a\n"
            "      format: '{{instruction}} -> '\nlearning_rate: {lr}\nadapter: lora\nlora_target_modules: {mods}\n")
    c, r = run(ip, "plan --set micro_batch_size=4 --set gradient_accumulation_steps=3 --name interp", body)
    assert r.success, text_of(c)
    run_ = ip.user_ns["interp"]
    cfg = run_.config
    assert cfg.learning_rate == 3e-4 and cfg.datasets[0].path == "examples/data/reverse_words.jsonl"
    assert cfg.datasets[0].type.format == "{instruction} -> "          # escaped braces stay literal
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert run_.plan.effective_batch_size == 12 and "4 x 3 accumulation" in text_of(c)
    assert "ftkit train config.yml --micro_batch_size 4 --gradient_accumulation_steps 3" in html_of(c)


def test_bad_set_and_unknown_mode_are_messages(ip):
    c, r = run(ip, "validate --set learning_rate", "learning_rate: 1e-4\n")
    assert r.success and "--set key=value" in text_of(c)
    c, r = run(ip, "trian", "learning_rate: 1e-4\n")
    assert r.success and "Did you mean 'train'?" in text_of(c)
    c, r = run(ip, "validate --set micro_batch_size=0", QUICKSTART)
    assert r.success and "micro_batch_size" in text_of(c) and "greater than or equal to 1" in text_of(c)


def test_line_magic_without_config_is_a_message(ip):
    with capture_output() as c:
        r = ip.run_cell("%finetune validate --name nothing_here")
    assert r.success and "no config" in text_of(c)
    with capture_output() as c:
        r = ip.run_cell("%finetune plan --config examples/quickstart.yml --name from_file")
    assert r.success and ip.user_ns["from_file"].config.lora_r == 16 and "config is valid" in text_of(c)


def test_missing_data_file_is_a_message_not_a_traceback(ip):
    body = QUICKSTART.replace("examples/data/reverse_words.jsonl", "examples/data/nope.jsonl")
    c, r = run(ip, "preprocess --name missing --set dataset_prepared_path={_prep}", body)
    assert r.success, c.stdout
    assert "nope.jsonl" in text_of(c) and "Traceback" not in c.stdout + c.stderr


def test_debug_then_preprocess_reuses_tokenizer_and_data(ip):
    c, r = run(ip, "debug --name q --set dataset_prepared_path={_prep}", QUICKSTART)
    assert r.success, text_of(c)
    h = html_of(c)
    assert 'class="tr' in h and 'class="ms' in h     # trained and masked tokens both shown
    assert "trained tokens" in text_of(c)
    q = ip.user_ns["q"]
    tok, data = q.tokenizer, q.datasets
    n = len((ROOT / "examples" / "data" / "reverse_words.jsonl").read_text().splitlines())
    assert len(data.train) + len(data.eval) == n and len(data.eval) == round(0.05 * n)
    c, r = run(ip, "preprocess --name q --set dataset_prepared_path={_prep}", QUICKSTART)
    assert ip.user_ns["q"].tokenizer is tok and ip.user_ns["q"].datasets is data
    assert ip.user_ns["q"].stages == ["debug", "preprocess"]
    # a different config starts a fresh run object
    c, r = run(ip, "validate --name q --set dataset_prepared_path={_prep} --set sequence_len=128", QUICKSTART)
    assert ip.user_ns["q"].tokenizer is None and ip.user_ns["q"].stages == ["validate"]


def test_comment_only_body_reuses_the_run_config(ip):
    run(ip, "validate --name reuse --set max_steps=7", QUICKSTART)
    c, r = run(ip, "plan --name reuse", "# (empty: the config of `reuse`)\n")
    assert r.success and ip.user_ns["reuse"].config.max_steps == 7 and ip.user_ns["reuse"].stages == ["validate", "plan"]


def test_gpus_flag_only_for_train(ip):
    c, r = run(ip, "preprocess --gpus 2", QUICKSTART)
    assert r.success and "--gpus 2 is for `train`" in text_of(c)


def test_env_doctor(ip):
    with capture_output() as c:
        ip.run_line_magic("finetune_env", "")
    t = text_of(c)
    for lib in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "triton", "flash-attn"):
        assert lib in t
    assert "what ftkit can use here" in html_of(c)


def test_chat_without_a_run_is_a_message(ip):
    with capture_output() as c:
        ip.run_line_magic("finetune_chat", "--name no_such_run hello")
    assert "no run named 'no_such_run'" in text_of(c)


def test_infer_streams_the_reply_of_the_run_model(ip, tmp_path):
    "`%%finetune infer` on a run object holding a (tiny, random) model and the real tokenizer: the reply streams to stdout."
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from ftkit.config import load
    from ftkit.magics import FinetuneRun
    from ftkit.models import load_tokenizer
    cfg = load(QUICKSTART)
    tok = load_tokenizer(cfg, quiet=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256))
    ip.user_ns["tiny"] = FinetuneRun(config=cfg, tokenizer=tok, model=model)
    c, r = run(ip, "infer --name tiny --max-new-tokens 6", "moon house tree")
    assert r.success, c.stdout
    reply = ip.user_ns["tiny"].metrics["last_reply"]
    assert reply and reply in c.stdout
    with capture_output() as c2:
        ip.run_line_magic("finetune_chat", "--name tiny --max-new-tokens 4 hello there")
    assert len(ip.user_ns["tiny"].chat_history) == 2 and ip.user_ns["tiny"].chat_history[0]["content"] == "hello there"


def test_form_magic_starts_from_a_run_object(ip):
    run(ip, "validate --name formrun --set max_steps=3", QUICKSTART)
    with capture_output():
        f = ip.run_line_magic("finetune_form", "formrun")
    from ftkit.widgets import ConfigForm
    assert isinstance(f, ConfigForm) and f.config.max_steps == 3
