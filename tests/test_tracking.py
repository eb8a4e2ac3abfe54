"""ftkit.tracking: Axolotl's tracker keys drive transformers' own integrations. A tiny training run logs to TensorBoard,
an MLflow file:// store and W&B in offline mode at once; each store, read back with that library's own reader (W&B's
offline file with its own protobuf records), holds the same loss values as metrics.jsonl."""
import glob, importlib.util, json, os, struct
from pathlib import Path

import pytest

from ftkit.config import ConfigError, load as load_config, validate
from ftkit.launch import MetricsFile, read_metrics
from ftkit.train import train
from ftkit import tracking

from helpers import StubTok, counting_data, tiny_llama     # tests/helpers.py (the shared test helpers)


HAVE = {m: importlib.util.find_spec(m) is not None for m in ("tensorboard", "mlflow", "wandb", "comet_ml", "trackio")}


def _need(*mods):
    missing = [m for m in mods if not HAVE[m]]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (pip install 'ftkit[tracking]')")


def _cfg(out, **kw):
    base = {"learning_rate": 1e-2, "micro_batch_size": 4, "sequence_len": 32, "sample_packing": True, "max_steps": 6,
            "optimizer": "adamw_torch", "seed": 3, "output_dir": str(out), "logging_steps": 1, "save_strategy": "no",
            "dataloader_num_workers": 0,
            "datasets": [{"path": "unused.jsonl", "type": "chat_template"}]}
    base.update(kw)
    return load_config(base)


def _run(cfg):
    out = Path(cfg.output_dir)
    r = train(cfg, data=(counting_data(160), None), model=tiny_llama(vocab_size=64, attn="ftkit_varlen", seed=0),
              tokenizer=StubTok(), quiet=True, callbacks=[MetricsFile(out / "metrics.jsonl")])
    losses = {rec["step"]: rec["loss"] for rec in read_metrics(out / "metrics.jsonl") if rec.get("event") == "log" and "loss" in rec}
    assert sorted(losses) == list(range(1, 7)), losses
    return r, losses


def _tensorboard_losses(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    files = glob.glob(f"{logdir}/**/events.out.tfevents.*", recursive=True)
    assert files, f"no event files under {logdir}"
    ea = EventAccumulator(str(Path(files[0]).parent)); ea.Reload()
    return {e.step: e.value for e in ea.Scalars("train/loss")}


def _mlflow_losses(uri, experiment, run_name):
    from mlflow import MlflowClient
    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id])
    assert [r.info.run_name for r in runs] == [run_name] and runs[0].info.status == "FINISHED"
    return {m.step: m.value for m in c.get_metric_history(runs[0].info.run_id, "loss")}


def _wandb_records(path):
    "Records of a W&B offline run file (.wandb: LevelDB-style log of 32 KiB blocks, 7-byte header; W&B's protobufs)."
    from wandb.proto import wandb_internal_pb2 as pb
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    out, pos, buf, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7: pos += room; continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + n]; pos += 7 + n
        if kind in (1, 4):  # FULL or LAST
            r = pb.Record(); r.ParseFromString(buf); out.append(r); buf = b""
        if n == 0 and kind == 0: break
    return out


def _wandb_losses(run_dir):
    files = glob.glob(f"{run_dir}/wandb/offline-run-*/run-*.wandb")
    assert len(files) == 1, files
    recs = _wandb_records(files[0])
    hist = [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            for r in recs if r.WhichOneof("record_type") == "history"]
    run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
    return {h["train/global_step"]: h["train/loss"] for h in hist if "train/loss" in h}, run


def test_tensorboard_mlflow_wandb_offline_hold_the_metrics_jsonl_losses(tmp_path, monkeypatch):
    _need("tensorboard", "mlflow", "wandb")
    for v in ("WANDB_MODE", "WANDB_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "WANDB_PROJECT"):
        monkeypatch.delenv(v, raising=False)
    out = tmp_path / "run"
    uri = (tmp_path / "mlruns").as_uri()
    cfg = _cfg(out, use_tensorboard=True, mlflow_tracking_uri=uri, mlflow_experiment_name="ftkit-test",
               mlflow_run_name="tiny", wandb_project="ftkit-test", wandb_mode="offline", wandb_name="tiny")
    assert cfg.warnings == []
    assert tracking.training_kwargs(cfg) == {"report_to": ["wandb", "mlflow", "tensorboard"], "run_name": "tiny"}
    where = tracking.where(cfg)
    assert any("TensorBoard" in w and str(out.resolve()) in w for w in where) and any(uri in w for w in where)
    r, losses = _run(cfg)
    # the environment was the run's only: nothing stays behind in this process
    assert "WANDB_MODE" not in os.environ and "MLFLOW_TRACKING_URI" not in os.environ
    assert _tensorboard_losses(out / "runs") == pytest.approx(losses, rel=1e-6)
    assert _mlflow_losses(uri, "ftkit-test", "tiny") == pytest.approx(losses, rel=1e-9)
    wb, run = _wandb_losses(out)                       # WANDB_DIR defaults to the run's output_dir
    assert wb == pytest.approx(losses, rel=1e-9)
    assert run.project == "ftkit-test" and run.display_name == "tiny"
    import wandb
    assert wandb.run is None                           # the plugin finished the W&B run


def test_a_second_run_tracks_into_its_own_store(tmp_path, monkeypatch):
    "MLflow keeps its tracking URI in a module global: the next run with another store must not write into the first."
    _need("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uris = [(tmp_path / f"m{i}").as_uri() for i in range(2)]
    for i, uri in enumerate(uris):
        _run(_cfg(tmp_path / f"r{i}", mlflow_tracking_uri=uri, mlflow_experiment_name="e", mlflow_run_name=f"run{i}", max_steps=6))
    from mlflow import MlflowClient
    for i, uri in enumerate(uris):
        c = MlflowClient(tracking_uri=uri)
        assert [r.info.run_name for r in c.search_runs([c.get_experiment_by_name("e").experiment_id])] == [f"run{i}"]


def test_comet_offline_archive(tmp_path, monkeypatch):
    _need("comet_ml")
    monkeypatch.delenv("COMET_OFFLINE_DIRECTORY", raising=False)
    out = tmp_path / "run"
    _run(_cfg(out, comet_project_name="ftkit-test", comet_online=False))
    zips = glob.glob(str(out / "comet" / "*.zip"))
    assert len(zips) == 1, list((out).rglob("*"))
    import zipfile
    with zipfile.ZipFile(zips[0]) as z:
        msgs = [json.loads(l) for n in z.namelist() if n.endswith("messages.json") for l in z.read(n).decode().splitlines() if l.strip()]
    assert msgs


TRACKIO_RUN = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
import test_tracking as t
cfg = t._cfg(Path(sys.argv[1]) / "run", trackio_project_name="ftkit-test", trackio_run_name="tiny")
assert t.tracking.training_kwargs(cfg) == {"report_to": ["trackio"], "run_name": "tiny", "project": "ftkit-test"}
_, losses = t._run(cfg)
from trackio.sqlite_storage import SQLiteStorage
logs = SQLiteStorage.get_logs("ftkit-test", "tiny")
print(json.dumps({"jsonl": losses, "trackio": {l["step"]: l["train/loss"] for l in logs if "train/loss" in l}}))
"""


def test_trackio_local_project(tmp_path):
    "trackio fixes its folder when first imported: the run goes in a fresh process with TRACKIO_DIR in tmp_path."
    _need("trackio")
    import subprocess, sys
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio")}
    p = subprocess.run([sys.executable, "-c", TRACKIO_RUN, str(tmp_path), str(Path(__file__).parent)], env=env,
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    series = lambda d: [v for _, v in sorted((int(k), v) for k, v in d.items())]   # trackio counts its own steps from 0
    assert series(got["trackio"]) == pytest.approx(series(got["jsonl"]), rel=1e-6) and len(series(got["jsonl"])) == 6
    assert list((tmp_path / "trackio").glob("*.db"))


def test_validation_names_the_extra_and_checks_values(monkeypatch):
    base = {"learning_rate": 1e-4, "datasets": [{"path": "x.jsonl", "type": "alpaca"}]}
    monkeypatch.setattr(tracking, "installed", lambda t: t.name != "comet_ml")
    with pytest.raises(ConfigError) as e:
        load_config({**base, "comet_project_name": "p"})
    assert "comet_project_name" in str(e.value) and "pip install 'ftkit[comet]'" in str(e.value)
    monkeypatch.setattr(tracking, "installed", lambda t: t.name != "wandb")
    with pytest.raises(ConfigError, match=r"ftkit\[tracking\]"):
        load_config({**base, "use_wandb": True})
    monkeypatch.setattr(tracking, "installed", lambda t: True)
    cfg, problems, *_ = validate("learning_rate: 1e-4\ndatasets: [{path: x.jsonl, type: alpaca}]\nwandb_project: p\nwandb_mode: ofline\n")
    assert [(p.key, p.line, p.level) for p in problems] == [("wandb_mode", 4, "error")]
    cfg = load_config({**base, "mlflow_run_name": "x"})          # MLflow is off: the key would do nothing
    assert [w.key for w in cfg.warnings] == ["mlflow_run_name"]
    assert tracking.training_kwargs(cfg) == {"report_to": "none"}
    cfg = load_config({**base, "wandb_project": "p", "use_wandb": False})
    assert tracking.enabled(cfg) == [] and tracking.environment(cfg) == {}
