"""Write the word-reversal dataset used by the quickstart, `make demo` and the learning test.

Task: the user gives 3-5 common English words, the assistant answers with the same words in reverse order.
SmolLM2-135M-Instruct cannot do this out of the box (held-out exact match ~0), and LoRA learns it in ~60 steps.

    python examples/make_reverse_dataset.py            # writes examples/data/reverse_words{,_heldout}.jsonl

Rows use the chat `messages` format (a short system prompt keeps rows ~35 tokens). The held-out file shares no
word sequence with the training file. Deterministic: the same seed gives byte-identical files.
"""
import argparse
import json
import random
from pathlib import Path

SYSTEM = "Reverse the order of the words."
WORDS = """apple river stone cloud green table music window garden silver
tiger bread candle forest yellow ocean pencil summer rabbit mountain
coffee bottle planet winter orange doctor castle butter monkey island
letter rocket violin cookie shadow bridge flower dragon pepper marble
basket mirror jacket farmer spider lemon pillow carpet thunder button
horse chair glass paper water light night house money queen
tree bird fish moon star book door king ship road
snow rain wind fire sand gold milk salt rice corn""".split()


def reverse_rows(n: int, seed: int, min_words: int = 3, max_words: int = 5, exclude=frozenset()):
    rng = random.Random(seed)
    rows, seen = [], set(exclude)
    while len(rows) < n:
        k = rng.randint(min_words, max_words)
        words = tuple(rng.sample(WORDS, k))
        if words in seen:
            continue
        seen.add(words)
        rows.append({"messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": " ".join(words)},
            {"role": "assistant", "content": " ".join(reversed(words))},
        ]})
    return rows


def write(out_dir: Path, n_train: int = 1000, n_heldout: int = 100, seed: int = 0):
    out_dir.mkdir(parents=True, exist_ok=True)
    held = reverse_rows(n_heldout, seed + 1)
    held_keys = frozenset(tuple(r["messages"][1]["content"].split()) for r in held)
    train = reverse_rows(n_train, seed, exclude=held_keys)
    for name, rows in (("reverse_words.jsonl", train), ("reverse_words_heldout.jsonl", held)):
        with open(out_dir / name, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return out_dir / "reverse_words.jsonl", out_dir / "reverse_words_heldout.jsonl"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "data"))
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--heldout", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    for p in write(Path(a.out), a.train, a.heldout, a.seed):
        print(p)
