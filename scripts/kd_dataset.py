"""Make a knowledge-distillation dataset: a teacher's top-k log-probabilities for every row of a config's datasets.

    python scripts/kd_dataset.py CONFIG TEACHER OUT.jsonl [--top-k 20] [--column logprobs] [--temperature 1.0]

CONFIG is the student's config (its tokenizer and each dataset entry's `type:` decide the tokens); TEACHER is a model
folder or Hub id sharing that tokenizer. OUT gets every source row with one more column in Axolotl's format (a list per
position of {"token": "token_id:ID", "logprob": x}), so the student's config reads it with the same `type:` plus
`logprobs_field: <column>` and `kd_trainer: true`. Rows the strategy cannot tokenize are skipped and counted.
"""
import argparse
import sys

from ftkit.data import load_source
from ftkit.distill import teacher_logprobs, write_jsonl
from ftkit.prompts.registry import RowError, resolve_type


def label_rows(cfg, tokenizer, teacher, *, column="logprobs", top_k=20, temperature=1.0, batch_size=8):
    "(rows with the teacher's column, rows skipped) for every entry of `cfg.datasets`."
    out, skipped = [], 0
    for i, entry in enumerate(cfg.datasets or []):
        raw, _ = load_source(entry, i)
        strategy = resolve_type(entry.type).build(tokenizer, entry, cfg)
        rows, ids = [], []
        for row in raw:
            res = strategy.tokenize_batch([row])[0]
            if isinstance(res, RowError) or len(res) != 1: skipped += 1; continue
            rows.append(row); ids.append(res[0]["input_ids"])
        cols = teacher_logprobs(teacher, ids, top_k=top_k, temperature=temperature, batch_size=batch_size)
        out += [{**r, column: c} for r, c in zip(rows, cols)]
    return out, skipped


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config"); ap.add_argument("teacher"); ap.add_argument("out")
    ap.add_argument("--top-k", type=int, default=20); ap.add_argument("--column", default="logprobs")
    ap.add_argument("--temperature", type=float, default=1.0); ap.add_argument("--batch-size", type=int, default=8)
    a = ap.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM
    from ftkit.config import load
    from ftkit.errors import FtkitError
    from ftkit.models import load_tokenizer
    try:
        cfg = load(a.config)
        tok = load_tokenizer(cfg, quiet=True)
    except FtkitError as e:
        print(e, file=sys.stderr); return 2
    teacher = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    if torch.cuda.is_available(): teacher = teacher.cuda()
    rows, skipped = label_rows(cfg, tok, teacher, column=a.column, top_k=a.top_k, temperature=a.temperature,
                               batch_size=a.batch_size)
    write_jsonl(rows, a.out)
    print(f"{len(rows)} rows with the teacher's top-{a.top_k} in column {a.column!r} -> {a.out} ({skipped} skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
