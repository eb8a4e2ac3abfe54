"""Guarantee 6 (paths), nothing is written where the config does not say: output folders and dataset paths that cannot be
paths (empty, NUL or control characters, names longer than the file system holds) are refused at load with the key
named, before anything is written (they used to train into the current folder or end in a traceback after the model
loaded); folders ftkit derives from config or data values (a sweep variant's folder, the cache folder) go through
`ftkit.guard.child_path` and never leave their parent, whatever the value (`..`, absolute paths, NUL, 500 characters,
a symlink planted in the parent); a Hub repo id is never a path."""
import json
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from guarantees_util import record, rows

CASES = []
HOSTILE_OUTPUT = {"empty": "", "blank": "   ", "nul": "o\x00ut", "newline": "out\nrm -rf", "long_name": "o" * 300,
                  "long_path": "/".join(["d"] * 2100)}
BASE = {"base_model": "smollm2-135m-instruct", "adapter": "lora", "lora_r": 2, "lora_alpha": 4, "lora_target_modules": ["q_proj"],
        "datasets": [{"path": "data.jsonl", "type": "completion"}], "dataset_prepared_path": "prep", "sequence_len": 32,
        "micro_batch_size": 1, "max_steps": 1, "learning_rate": 1e-3, "output_dir": "out"}


def _run_cli(tmp_path, capsys, command, **changes):
    "`ftkit <command> cfg.yml` in-process in an empty folder holding only the config and its data; (exit, stderr, files after)."
    import ftkit.cli
    (tmp_path / "data.jsonl").write_text("\n".join(rows(4)) + "\n")
    cfg = json.loads(json.dumps(BASE))
    for k, v in changes.items():
        if k.startswith("ds_"): cfg["datasets"][0][k[3:]] = v
        else: cfg[k] = v
    (tmp_path / "cfg.yml").write_text(yaml.safe_dump(cfg))
    old = os.getcwd(); os.chdir(tmp_path)
    try: code = ftkit.cli.main([command, "cfg.yml"])        # an exception other than SystemExit fails the test: a traceback
    finally: os.chdir(old)
    return code, capsys.readouterr().err, sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize("key", ["output_dir", "dataset_prepared_path"])
@pytest.mark.parametrize("case", list(HOSTILE_OUTPUT))
def test_hostile_output_folders_are_refused_before_anything_is_written(tmp_path, capsys, key, case):
    code, err, files = _run_cli(tmp_path, capsys, "train", **{key: HOSTILE_OUTPUT[case]})
    assert code == 2 and key in err and "Traceback" not in err, err[-1500:]
    assert files == ["cfg.yml", "data.jsonl"], files           # no adapter, checkpoint, cache or lock in the current folder
    CASES.append(f"{key}: {case}")


@pytest.mark.parametrize("command,key,case,value", [
    ("train", "output_dir", "a_file", "data.jsonl"), ("train", "output_dir", "under_a_file", "data.jsonl/sub"),
    ("preprocess", "dataset_prepared_path", "a_file", "data.jsonl"), ("train", "output_dir", "unwritable", "/proc/ftkit-out"),
    ("preprocess", "dataset_prepared_path", "unwritable", "/proc/ftkit-prep")])
def test_output_folders_that_cannot_be_made_are_refused_with_the_key(tmp_path, capsys, command, key, case, value):
    "A file where the folder should be (refused at load) or a folder this user cannot make (refused by the lock, first write)."
    code, err, files = _run_cli(tmp_path, capsys, command, **{key: value})
    assert code == 2 and key in err and "Traceback" not in err, err[-1500:]
    assert files == ["cfg.yml", "data.jsonl"] and (tmp_path / "data.jsonl").is_file(), files
    CASES.append(f"{key}: {case}")


@pytest.mark.parametrize("case,value", [("nul", "da\x00ta.jsonl"), ("long_name", "d" * 300 + ".jsonl")])
def test_hostile_dataset_paths_are_refused_with_the_entry(tmp_path, capsys, case, value):
    code, err, files = _run_cli(tmp_path, capsys, "preprocess", ds_path=value)
    assert code == 2 and "datasets[0].path" in err and "Traceback" not in err, err[-1500:]
    assert files == ["cfg.yml", "data.jsonl"], files
    CASES.append(f"datasets[].path: {case}")


@pytest.mark.parametrize("repo", ["../../etc", "a/b/c", "/abs/repo", "me/x\x00y", "me/" + "x" * 100, "me/a--b"])
def test_hub_repo_ids_are_never_paths(repo):
    from ftkit.config import load
    from ftkit.errors import ConfigError
    with pytest.raises(ConfigError) as e:
        load({**BASE, "hub_model_id": repo})
    assert any(p.key == "hub_model_id" for p in e.value.problems), e.value
    CASES.append(f"hub_model_id {repo[:12]!r}")


SWEPT = ["../../escape", "/etc/cron.d/x", "a/../../b", ".hidden", "\x00nul", "x" * 500, "ünï/cødé", "..", ""]


def test_sweep_variant_folders_stay_inside_output_dir(tmp_path):
    "Swept values become folder names (slugs): whatever the value, each variant's folder is a child of output_dir."
    from ftkit.sweeps import plan
    root = tmp_path / "sweep-out"
    base = {**BASE, "datasets": [{"path": str(tmp_path / "d.jsonl"), "type": "completion"}], "output_dir": str(root)}
    runs = plan(base, {"wandb_name": SWEPT, "learning_rate": [1e-3, 2e-3]})
    outs = [Path(r.cfg.output_dir) for r in runs]
    assert len(outs) == 2 * len(SWEPT) and len(set(outs)) == len(outs)
    for p in outs:
        assert p.parent == root and len(p.name) <= 100 and not p.name.startswith("."), p
        assert p.resolve().is_relative_to(root.resolve())
    CASES.append(f"sweep variants with {len(SWEPT)} hostile swept values")


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.text(max_size=400))
def test_child_path_never_leaves_its_folder(tmp_path_factory, name):
    from ftkit.guard import child_path
    root = tmp_path_factory.getbasetemp() / "root"
    p = child_path(root, name)
    assert p.parent == root and 0 < len(p.name) <= 100 and not p.name.startswith(".") and "\x00" not in p.name
    assert p.resolve().parent == root.resolve()


def test_a_symlink_planted_in_the_folder_cannot_redirect_a_derived_path(tmp_path):
    from ftkit.guard import GuardError, child_path
    (tmp_path / "elsewhere").mkdir()
    root = tmp_path / "root"; root.mkdir()
    (root / "00-lr=1").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(GuardError, match="outside"):
        child_path(root, "00-lr=1")
    CASES.append("symlink planted where a derived folder goes")


def test_zz_record_paths():
    record("paths", cases=len(CASES), proven=CASES, test="tests/test_guarantees_paths.py")
