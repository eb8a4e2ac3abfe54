"""Peak memory of ftkit.streaming over corpora of 1x and 20x the size: the stream holds one record batch, one row and
the rest of one document, so the peak must not grow with the corpus.

    python benchmarks/bench_streaming_memory.py [--docs 10000] [--scale 20] [--format jsonl|parquet] [--out FILE]

Each measurement runs in a fresh process (peak RSS is per process): it imports what a training run imports, notes the
RSS, streams every row of the corpus through the real tokenizer (tests/ftkit_test_tokenizers' llama3-style byte BPE),
and reports the peak RSS and the growth over the baseline."""
import argparse, json, os, random, resource, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the quick brown fox jumps over a lazy dog while models learn exact labels from packed rows of tokens "
         "streaming corpora never fit in memory so each document is read once").split()


def make_corpus(folder: Path, docs: int, fmt: str, shards: int = 4, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    per = docs // shards
    for s in range(shards):
        texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for _ in range(per)]
        if fmt == "jsonl":
            with open(folder / f"shard-{s:03d}.jsonl", "w") as f:
                for t in texts: f.write(json.dumps({"text": t}) + "\n")
        else:
            import pyarrow as pa, pyarrow.parquet as pq
            pq.write_table(pa.table({"text": texts}), folder / f"shard-{s:03d}.parquet", row_group_size=1000)
    return sum(f.stat().st_size for f in folder.iterdir())


CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[2])
import torch, transformers                     # what a training process has loaded anyway
from ftkit.streaming import PackedStream, corpus_files
from ftkit_test_tokenizers import llama3
tok = llama3()
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # MiB (Linux: KiB)
base = rss(); t = time.time()
ps = PackedStream(corpus_files(sys.argv[1]), tok, seq_len=2048)
rows = sum(1 for _ in ps)
print(json.dumps({"rows": rows, "baseline_mib": round(base, 1), "peak_mib": round(rss(), 1), "seconds": round(time.time() - t, 1)}))
"""


def measure(folder: Path) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(ROOT / "tests")], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if p.returncode: raise SystemExit(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=10_000)
    ap.add_argument("--scale", type=int, default=20)
    ap.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    a = ap.parse_args(argv)
    res = {}
    with tempfile.TemporaryDirectory() as d:
        for name, n in (("1x", a.docs), (f"{a.scale}x", a.docs * a.scale)):
            size = make_corpus(Path(d) / name, n, a.format)
            m = measure(Path(d) / name)
            res[name] = {"docs": n, "corpus_mib": round(size / 2**20, 1), **m, "growth_mib": round(m["peak_mib"] - m["baseline_mib"], 1)}
            print(f"{name:>4}: {n:>8,} docs, {res[name]['corpus_mib']:>7.1f} MiB {a.format}, {m['rows']:>7,} rows of 2048 tokens, "
                  f"peak RSS {m['peak_mib']:.1f} MiB (baseline {m['baseline_mib']:.1f}, growth {res[name]['growth_mib']:.1f}) in {m['seconds']}s",
                  flush=True)
    if a.out: Path(a.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
