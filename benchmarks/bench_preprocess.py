"""Benchmark `ftkit.data.prepare` on a generated chat dataset with the SmolLM2 tokenizer.

    .venv/bin/python benchmarks/bench_preprocess.py [--rows 50000] [--procs 1 2] [--repeat 1] [--tokenizers-parallelism false] [--no-warmup]
                                                    [--axolotl VENV] [--out benchmarks/results/preprocess.json]

Each measurement runs in its own child process with a fresh `HF_HOME` (so neither datasets' map cache nor
ftkit's prepared-data cache can serve it) and `dataset_num_proc: N`. The timed part is `prepare` with the
cache write (load the jsonl, render chat templates, tokenize, labels, length/label filters, shuffle, write
Arrow once); loading the tokenizer is not timed. Before the timed call the child runs `prepare` once on 200 other
rows (one process, no cache; `warmup_seconds`): the one-time costs of a fresh process that are not data preparation
(importing `datasets`, which `prepare` imports lazily, and what `datasets.load_dataset` imports on first use, ~0.8 s
together here) stay out of `seconds`, and the measured file's caches are still fresh. `--no-warmup` times a cold
process as results measured before 2026-11-30 13:50 UTC did (`seconds_whole_process` covers everything either way). Prints rows/s and tokens/s, the CPU seconds the child and its
workers used (user + system: on a shared machine this is the honest figure when other jobs take cores) and the
1-minute load average before and after the run.

`--axolotl VENV` also runs `axolotl preprocess` from that virtual environment (e.g. the conformance harness's,
scripts/conformance/setup.sh) on the same rows, tokenizer (the embedded SmolLM2 tokenizer saved to a folder, which the ftkit runs load
too: Axolotl cannot read the GGUF) and settings, with its own fresh HF_HOME, timed the same way (wall and CPU of the whole command, start-up included).
"""
import argparse, json, os, platform, random, resource, subprocess, sys, tempfile, time
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

def make_tokenizer(tmp: Path) -> Path:
    "The embedded SmolLM2 tokenizer saved to a plain folder (both tools load it from there; Axolotl cannot read the GGUF)."
    tok_dir = tmp / "smollm2"
    subprocess.run([sys.executable, str(Path(__file__).parent.parent / "scripts" / "conformance" / "make_tokenizer.py"), str(tok_dir)],
                   check=True, capture_output=True)
    return tok_dir

def child(data: str, procs: int, prep: str, tok_dir: str, warmup: bool = True):
    "One measurement (run in a fresh process with its own HF_HOME): prints a JSON line."
    from transformers import AutoTokenizer
    from ftkit.data import prepare
    from ftkit.prompts.registry import as_config
    tok = AutoTokenizer.from_pretrained(tok_dir)
    warm_s = None
    if warmup:                        # other rows, another folder: the measured file's caches stay fresh
        w = Path(prep).parent / "warmup"; w.mkdir(parents=True, exist_ok=True)
        (w / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_rows(200, seed=1)))
        wcfg = as_config({"datasets": [{"path": str(w / "rows.jsonl"), "type": "chat_template", "chat_template": "chatml"}],
                          "sequence_len": 2048, "dataset_num_proc": 1, "dataset_prepared_path": str(w / "prep")})
        t0 = time.perf_counter(); prepare(wcfg, tok, quiet=True, use_cache=False); warm_s = round(time.perf_counter() - t0, 2)
    cfg = as_config({"datasets": [{"path": data, "type": "chat_template", "chat_template": "chatml"}], "sequence_len": 2048,
                     "dataset_num_proc": procs, "dataset_prepared_path": prep, "shuffle_merged_datasets": True})
    load0 = os.getloadavg()[0]
    c0, k0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter(); p = prepare(cfg, tok, quiet=True, use_cache=True); dt = time.perf_counter() - t0
    c1, k1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(getattr(b, f) - getattr(a, f) for a, b in ((c0, c1), (k0, k1)) for f in ("ru_utime", "ru_stime"))
    r = p.report
    whole = resource.getrusage(resource.RUSAGE_SELF)          # the whole process: imports and tokenizer loading included
    whole_cpu = whole.ru_utime + whole.ru_stime + (k1.ru_utime + k1.ru_stime)
    print(json.dumps({"procs": procs, "cpu_seconds_whole_process": round(whole_cpu, 2), "rows": r.rows_in, "samples": r.samples_out, "tokens": r.tokens, "seconds": round(dt, 2),
                      "cpu_seconds": round(cpu, 2), "rows_per_s": round(r.rows_in / dt), "tokens_per_s": round(r.tokens / dt),
                      "trainable_fraction": round(r.trainable_fraction, 3), "warmup_seconds": warm_s, "load_before": round(load0, 2),
                      "load_after": round(os.getloadavg()[0], 2)}))

def run_axolotl(venv: Path, data: Path, tmp: Path, tok_dir: Path, procs: int) -> dict:
    "`axolotl preprocess` on the same rows and tokenizer: wall and CPU seconds of the whole command."
    import yaml
    run = tmp / "axolotl"
    cfg = {"base_model": str(tok_dir), "datasets": [{"path": str(data), "ds_type": "json", "type": "chat_template"}],
           "chat_template": "chatml", "sequence_len": 2048, "micro_batch_size": 1, "gradient_accumulation_steps": 1,
           "learning_rate": 1e-4, "num_epochs": 1, "dataset_num_proc": procs, "dataset_prepared_path": str(run / "prep"),
           "output_dir": str(run / "out")}
    (run).mkdir(parents=True, exist_ok=True); (run / "cfg.yml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HOME": str(run / "hf"), "HF_DATASETS_CACHE": str(run / "hf" / "datasets"), "HF_HUB_OFFLINE": "1"}
    load0, k0 = os.getloadavg()[0], resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run([str(venv / "bin" / "axolotl"), "preprocess", str(run / "cfg.yml")], env=env, capture_output=True, text=True)
    dt, k1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode: sys.exit("axolotl preprocess failed:\n" + out.stderr[-3000:])
    cpu = (k1.ru_utime - k0.ru_utime) + (k1.ru_stime - k0.ru_stime)
    res = {"tool": "axolotl", "procs": procs, "seconds": round(dt, 2), "cpu_seconds": round(cpu, 2), "load_before": round(load0, 2),
           "load_after": round(os.getloadavg()[0], 2)}
    print(f"axolotl preprocess (dataset_num_proc={procs}): {dt:.1f}s ({cpu:.1f} CPU s, start-up included) "
          f"[load {res['load_before']} -> {res['load_after']}]", flush=True)
    return res

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=50000)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/preprocess.json")
    ap.add_argument("--axolotl", metavar="VENV", help="also time `axolotl preprocess` from this virtual environment")
    ap.add_argument("--tokenizer", metavar="DIR", help="a saved SmolLM2 tokenizer folder (scripts/conformance/make_tokenizer.py), "
                    "for machines without the embedded model package")
    ap.add_argument("--tokenizers-parallelism", choices=["true", "false"], help="TOKENIZERS_PARALLELISM for the ftkit runs")
    ap.add_argument("--no-warmup", action="store_true", help="time a cold process (imports included), as results measured before 2026-11-30 13:50 UTC")
    ap.add_argument("--child", nargs=4, metavar=("DATA", "PROCS", "PREP", "TOKENIZER"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child: return child(a.child[0], int(a.child[1]), a.child[2], a.child[3], warmup=not a.no_warmup)
    import datasets
    tmp = Path(tempfile.mkdtemp())
    data = tmp / "chat.jsonl"
    with open(data, "w") as f:
        for r in make_rows(a.rows): f.write(json.dumps(r) + "\n")
    tok_dir = Path(a.tokenizer) if a.tokenizer else make_tokenizer(tmp)
    results = []
    for k in range(a.repeat):
        for n in a.procs:
            run = tmp / f"run{k}_{n}"
            env = {**os.environ, "HF_HOME": str(run / "hf"), "HF_DATASETS_CACHE": str(run / "hf" / "datasets")}
            if a.tokenizers_parallelism: env["TOKENIZERS_PARALLELISM"] = a.tokenizers_parallelism
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "--child", str(data), str(n), str(run / "prep"), str(tok_dir)]
                                 + (["--no-warmup"] if a.no_warmup else []), env=env,
                                 capture_output=True, text=True)
            whole = time.perf_counter() - t0
            if out.returncode: sys.exit(out.stderr[-3000:])
            res = json.loads(out.stdout.strip().splitlines()[-1])
            res["seconds_whole_process"] = round(whole, 2)
            if a.tokenizers_parallelism: res["tokenizers_parallelism"] = a.tokenizers_parallelism
            results.append(res)
            print(f"num_proc={n}: {res['rows']} rows, {res['tokens']} tokens in {res['seconds']:.1f}s "
                  f"({res['cpu_seconds']:.1f} CPU s; whole process {whole:.1f}s, {res['cpu_seconds_whole_process']:.1f} CPU s) -> "
                  f"{res['rows_per_s']} rows/s, {res['tokens_per_s']} tokens/s [load {res['load_before']} -> {res['load_after']}]", flush=True)
    if a.axolotl: results.append(run_axolotl(Path(a.axolotl), data, tmp, tok_dir, a.procs[0]))
    meta = {"cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "machine": platform.machine(), "python": platform.python_version(),
            "datasets": datasets.__version__, "command": "python benchmarks/bench_preprocess.py " + " ".join(sys.argv[1:]),
            "results": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(meta, indent=1))
    print(f"saved {a.out}")

if __name__ == "__main__":
    main()
