"""ftkit.hub against a fake Hub on 127.0.0.1 (tests/fake_hub.py, HF_ENDPOINT): `ftkit train` with hub_model_id pushes
checkpoints and the final adapter through transformers' own push, `ftkit merge-lora --push` uploads the merged model,
and nothing at all is sent when no repo is named. The CLI runs in a subprocess: huggingface_hub reads HF_ENDPOINT when
it is imported, and the test process itself is offline (HF_HUB_OFFLINE=1)."""
import os, shutil, subprocess, sys
from pathlib import Path

import pytest
import yaml

from fake_hub import FakeHub
from test_tracking import tiny_llama

FTKIT = str(Path(sys.executable).parent / "ftkit")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from ftkit_test_tokenizers import llama3
    d = tmp_path_factory.mktemp("tiny")
    tok = llama3()
    tiny_llama(vocab_size=len(tok), attn="sdpa", seed=0).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _config(tmp_path, model_dir, root, **kw):
    cfg = {"base_model": str(model_dir), "adapter": "lora", "lora_r": 4, "lora_target_linear": True,
           "datasets": [{"path": str(root / "examples/data/reverse_words.jsonl"), "type": "chat_template"}],
           "dataset_prepared_path": str(tmp_path / "prep"), "sequence_len": 128, "sample_packing": True, "max_steps": 2,
           "learning_rate": 1e-3, "optimizer": "adamw_torch", "logging_steps": 1, "output_dir": str(tmp_path / "out"),
           "dataloader_num_workers": 0, **kw}
    p = tmp_path / "c.yml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _ftkit(hub, *argv):
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_fake_token",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}
    p = subprocess.run([FTKIT, *argv], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p.stdout


def test_train_pushes_checkpoints_and_the_final_adapter(tmp_path, tiny_model, root):
    cfg = _config(tmp_path, tiny_model, root, hub_model_id="tester/tiny-lora", hub_strategy="checkpoint", save_steps=1)
    with FakeHub() as hub:
        out = _ftkit(hub, "train", str(cfg))
    assert hub.unknown == []
    repo = hub.repos["tester/tiny-lora"]
    assert repo["private"] is True                                        # Axolotl's default: a private repo
    assert hub.calls[0] == ("POST", "/api/repos/create")                  # created when training starts
    assert repo["commits"][-1] == "ftkit: end of training (2 steps)" and len(repo["commits"]) >= 2   # checkpoints, then the end
    files = repo["files"]
    local = tmp_path / "out"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "config.yml", "README.md"):
        assert files[name] == (local / name).read_bytes(), name          # what arrived is what was saved
    assert any(f.startswith("last-checkpoint/") for f in files)           # hub_strategy: checkpoint
    assert "pushed" in out and "tester/tiny-lora" in out


def test_merge_lora_push_uploads_the_merged_model(tmp_path, tiny_model, root):
    cfg = _config(tmp_path, tiny_model, root, save_strategy="no")
    with FakeHub() as hub:
        _ftkit(hub, "train", str(cfg))
        assert hub.calls == []                                            # no repo named: nothing is sent
        out = _ftkit(hub, "merge-lora", str(cfg), "--push", "tester/tiny-merged")
    repo = hub.repos["tester/tiny-merged"]
    merged = tmp_path / "out" / "merged"
    assert repo["files"]["model.safetensors"] == (merged / "model.safetensors").read_bytes()
    assert set(repo["files"]) == {str(p.relative_to(merged)) for p in merged.rglob("*") if p.is_file()}
    assert repo["commits"] == ["ftkit: merged model"] and "pushed" in out


def test_hub_keys_are_checked(tmp_path):
    from ftkit.config import ConfigError, load
    base = {"learning_rate": 1e-4, "datasets": [{"path": "x.jsonl", "type": "alpaca"}]}
    with pytest.raises(ConfigError, match="hub_strategy"):
        load({**base, "hub_model_id": "a/b", "hub_strategy": "sometimes"})
    with pytest.raises(ConfigError, match="push_to_hub: true needs hub_model_id"):
        load({**base, "push_to_hub": True})
    from ftkit.hub import training_kwargs
    assert training_kwargs(load({**base, "hub_model_id": "a/b", "push_to_hub": False})) == {}


def test_preprocess_pushes_the_prepared_data_once(tmp_path, tiny_model, root):
    "`push_dataset_to_hub`: a fresh `ftkit preprocess` uploads the cache folder to a private dataset repo (readable back with"
    " datasets.load_from_disk); a second run, served from the cache, uploads nothing."
    import datasets
    cfg = _config(tmp_path, tiny_model, root, push_dataset_to_hub="tester/prepared")
    with FakeHub() as hub:
        out = _ftkit(hub, "preprocess", str(cfg))
        repo = hub.repos["tester/prepared"]
        assert repo["type"] == "dataset" and repo["private"] and len(repo["commits"]) == 1 and "pushed the prepared data" in out
        key = {f.split("/")[0] for f in repo["files"]}
        assert len(key) == 1 and {f.split("/", 1)[1] for f in repo["files"]} >= {"report.json", "inputs.json", "train/dataset_info.json"}
        (k,) = key
        for f, data in repo["files"].items():                 # what arrived is the cache, byte for byte
            assert (tmp_path / "prep" / f).read_bytes() == data
        got = tmp_path / "got"
        for f, data in repo["files"].items():
            (got / f).parent.mkdir(parents=True, exist_ok=True); (got / f).write_bytes(data)
        assert datasets.load_from_disk(str(got / k / "train"))[:3] == datasets.load_from_disk(str(tmp_path / "prep" / k / "train"))[:3]
        n = len(hub.calls)
        _ftkit(hub, "preprocess", str(cfg))
        assert not [c for c in hub.calls[n:] if c[0] == "POST"] and len(repo["commits"]) == 1
    from ftkit.config import ConfigError, load
    with pytest.raises(ConfigError, match="push_dataset_to_hub"):
        load({"learning_rate": 1e-4, "datasets": [{"path": "x.jsonl", "type": "alpaca"}], "push_dataset_to_hub": "../x"})
