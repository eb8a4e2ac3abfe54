"""Three Axolotl model/tokenizer keys that ftkit used to accept and ignore, now acted on: base_model_config (the model
config read from another folder, weights from base_model), added_tokens_overrides (reserved added tokens renamed in a
copy of the tokenizer, the vocabulary size kept) and fix_untrained_tokens (never-trained embedding / LM-head rows that
the data uses set to the mean of the trained rows). Real tiny models, real tokenizers, real training on the CPU."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ftkit.config import IGNORED_KEYS, ConfigError, validate
from ftkit.models import load_model, load_tokenizer, model_source
from helpers import make_cfg, save_tiny_model, tiny_llama


# ---- base_model_config ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    save_tiny_model(d)
    return d


def test_base_model_config_is_acted_on():
    assert "base_model_config" not in IGNORED_KEYS
    assert not validate({"learning_rate": 1e-4, "strict": True, "base_model_config": "org/name"})[1]


def test_base_model_config_gives_the_config_weights_from_base_model(tiny_dir, tmp_path):
    conf = json.loads((tiny_dir / "config.json").read_text())
    assert conf["rms_norm_eps"] != 1e-3
    other = tmp_path / "conf"; other.mkdir()
    (other / "config.json").write_text(json.dumps({**conf, "rms_norm_eps": 1e-3, "tie_word_embeddings": False}))
    cfg = make_cfg(base_model=str(tiny_dir), base_model_config=str(other))
    tok = load_tokenizer(cfg, quiet=True)                    # `other` holds no tokenizer: base_model's is used
    model = load_model(cfg, tok, quiet=True)
    assert model.config.rms_norm_eps == 1e-3
    weights = load_file(str(tiny_dir / "model.safetensors"))
    assert torch.equal(model.get_input_embeddings().weight.float(), weights["model.embed_tokens.weight"].float())
    plain = load_model(make_cfg(base_model=str(tiny_dir)), tok, quiet=True)
    assert plain.config.rms_norm_eps == conf["rms_norm_eps"]  # unset: base_model's own config


def test_base_model_config_for_a_folder_without_config(tiny_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_dir, bare)
    shutil.move(bare / "config.json", tmp_path / "config.json")
    with pytest.raises(ConfigError, match="config.json"):
        model_source(make_cfg(base_model=str(bare)))
    model = load_model(make_cfg(base_model=str(bare), base_model_config=str(tmp_path)), quiet=True)
    assert model.config.vocab_size == json.loads((tmp_path / "config.json").read_text())["vocab_size"]


def test_base_model_config_mistakes_are_config_errors(tiny_dir, tmp_path):
    for bad, words in [(str(tmp_path), "has no config.json"), (str(tiny_dir / "config.json"), "not a folder"),
                       ("./no/such/folder", "not a folder")]:
        with pytest.raises(ConfigError, match=words) as e:
            model_source(make_cfg(base_model=str(tiny_dir), base_model_config=bad))
        assert e.value.problems[0].key == "base_model_config"


# ---- added_tokens_overrides -------------------------------------------------------------------------------------

def test_added_tokens_overrides_renames_in_a_copy(tiny_dir, tmp_path):
    assert "added_tokens_overrides" not in IGNORED_KEYS
    before = {p.name: p.read_bytes() for p in tiny_dir.iterdir()}
    plain = load_tokenizer(make_cfg(base_model=str(tiny_dir)), quiet=True)
    tok = load_tokenizer(make_cfg(base_model=str(tiny_dir), added_tokens_overrides={4: "<|tool|>", 5: "<|eot|>"}), quiet=True)
    assert len(tok) == len(plain) and tok.ftkit_added_tokens == 0          # renamed, not added
    assert tok.encode("<|tool|>") == [4] and tok.decode([4, 5]) == "<|tool|><|eot|>"
    assert tok.convert_ids_to_tokens(4) == "<|tool|>" and "<reponame>" not in tok.get_vocab()
    assert any("4 '<reponame>' -> '<|tool|>'" in n for n in tok.ftkit_notes)
    assert {p.name: p.read_bytes() for p in tiny_dir.iterdir()} == before  # the user's files are untouched
    out = tmp_path / "out"
    from ftkit.train import train
    from helpers import counting_data
    train(make_cfg(base_model=str(tiny_dir), added_tokens_overrides={4: "<|tool|>"}, output_dir=str(out), max_steps=1,
                   micro_batch_size=2, sequence_len=32, sample_packing=False, optimizer="adamw_torch", save_strategy="no",
                   datasets=[{"path": "unused.jsonl", "type": "chat_template"}]),
          data=(counting_data(8), None), quiet=True)
    from transformers import AutoTokenizer
    saved = AutoTokenizer.from_pretrained(out)
    assert saved.encode("<|tool|>") == [4] and len(saved) == len(plain)


def test_added_tokens_overrides_mistakes(tiny_dir):
    for over, words in [({500: "<x>"}, "not an added token"), ({4: "<|im_end|>"}, "already token 2")]:
        with pytest.raises(ConfigError, match=words) as e:
            load_tokenizer(make_cfg(base_model=str(tiny_dir), added_tokens_overrides=over), quiet=True)
        assert e.value.problems[0].key == "added_tokens_overrides"
    problems = validate({"learning_rate": 1e-4, "added_tokens_overrides": {4: "<a>", 5: "<a>"}})[1]
    assert [p.key for p in problems if p.level == "error"] == ["added_tokens_overrides"]


# ---- fix_untrained_tokens ---------------------------------------------------------------------------------------

ZEROED = [5, 6, 7, 40000]           # 5..7 are in counting_data's rows (ids 1..63); 40000 is not
FIXED = [2, 5, 6, 7]                # and row 2 (the pad row, EOS here) is zero from initialisation: the rows end with it


@pytest.fixture(scope="module")
def zeroed_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM
    d = tmp_path_factory.mktemp("zeroed")
    save_tiny_model(d)
    m = AutoModelForCausalLM.from_pretrained(d)
    with torch.no_grad():
        m.get_input_embeddings().weight[ZEROED] = 0
        m.get_output_embeddings().weight[ZEROED] = 0
    m.save_pretrained(d)
    return d


def _setup(d, out, **kw):
    from ftkit.train import build_trainer
    from helpers import counting_data
    cfg = make_cfg(base_model=str(d), output_dir=str(out), max_steps=2, micro_batch_size=2, sequence_len=32, sample_packing=False,
                   optimizer="adamw_torch", save_strategy="no", datasets=[{"path": "unused.jsonl", "type": "chat_template"}], **kw)
    return cfg, build_trainer(cfg, data=(counting_data(8), None), quiet=True)


def test_fix_untrained_tokens_sets_the_used_rows_to_the_mean(zeroed_dir, tmp_path):
    assert "fix_untrained_tokens" not in IGNORED_KEYS
    weights = load_file(str(zeroed_dir / "model.safetensors"))
    e0, h0 = weights["model.embed_tokens.weight"].float(), weights["lm_head.weight"].float()
    _, s = _setup(zeroed_dir, tmp_path / "a", fix_untrained_tokens=True)
    e, h = s.model.get_input_embeddings().weight.detach().float(), s.model.get_output_embeddings().weight.detach().float()
    trained = e0.norm(dim=1) > 0
    for i in FIXED:
        assert torch.allclose(e[i], e0[trained].mean(0), atol=1e-6) and torch.allclose(h[i], h0[trained].mean(0), atol=1e-6)
    assert not e[40000].any() and not h[40000].any()                      # untrained but not in the data: left alone
    keep = torch.ones(len(e0), dtype=torch.bool); keep[FIXED] = False
    assert torch.equal(e[keep], e0[keep]) and torch.equal(h[keep], h0[keep])
    assert s.model.ftkit_fixed_tokens == FIXED
    _, s = _setup(zeroed_dir, tmp_path / "b", fix_untrained_tokens=[40000])   # listed: fixed though not in the data
    assert s.model.ftkit_fixed_tokens == FIXED + [40000]


def test_fix_untrained_tokens_unset_changes_nothing(zeroed_dir, tmp_path):
    _, s = _setup(zeroed_dir, tmp_path / "c")
    assert not s.model.get_input_embeddings().weight[[5, 6, 7]].any() and not hasattr(s.model, "ftkit_fixed_tokens")


def test_fix_untrained_tokens_in_the_run_record(zeroed_dir, tmp_path):
    from ftkit.train import train
    from helpers import counting_data
    out = tmp_path / "run"
    cfg = make_cfg(base_model=str(zeroed_dir), output_dir=str(out), max_steps=2, micro_batch_size=2, sequence_len=32,
                   sample_packing=False, optimizer="adamw_torch", save_strategy="no", fix_untrained_tokens=True,
                   datasets=[{"path": "unused.jsonl", "type": "chat_template"}])
    res = train(cfg, data=(counting_data(8), None), quiet=True)
    assert "# untrained tokens fixed: [2, 5, 6, 7]" in (out / "config.yml").read_text()
    assert all(torch.isfinite(torch.tensor(v)) for k, v in res.metrics.items() if "loss" in k)


def test_fix_untrained_tokens_mistakes(zeroed_dir, tmp_path):
    with pytest.raises(ConfigError, match="outside") as e:
        _setup(zeroed_dir, tmp_path / "d", fix_untrained_tokens=[10 ** 6])
    assert e.value.problems[0].key == "fix_untrained_tokens"
    problems = validate({"learning_rate": 1e-4, "fix_untrained_tokens": True, "rl": "dpo"})[1]
    assert ("fix_untrained_tokens", "warning") in [(p.key, p.level) for p in problems]
    assert not validate({"learning_rate": 1e-4, "strict": True, "fix_untrained_tokens": [5]})[1]
