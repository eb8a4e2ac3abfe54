"""`dataset_num_proc: 2` (issue 15, item 7): the workers encode with threads of their own and give byte-identical
rows to one process; the parent never starts the tokenizer's (Rust) thread pool before `map` forks its workers.
On Linux ftkit forks the workers itself (`_map_forked`); `datasets`' pool is the path where that does not apply:
both give the same rows, a worker's error is raised in the parent as it was raised, and a worker that dies, or a
parent interrupted, leaves no worker and no partial file behind."""
import json, os, subprocess, sys
from pathlib import Path
import pytest
import ftkit_test_tokenizers as T
from helpers import make_cfg

def rows(n):
    out = []
    for i in range(n):
        msgs = [{"role": "user", "content": f"Question {i}? " + "word " * (i % 7)},
                {"role": "assistant", "content": f"Answer {i}." + " more" * (i % 5)}]
        if i % 3 == 0: msgs += [{"role": "user", "content": "And then?"}, {"role": "assistant", "content": "Then " * (i % 4) + "done."}]
        out.append({"messages": msgs if i % 97 else []})          # some empty conversations: dropped, counted
    out[5]["messages"][1]["content"] = "long " * 400                # too long for sequence_len: dropped
    return out

def test_two_workers_with_threads_give_the_same_rows(tmp_path, monkeypatch):
    import ftkit.data as D
    import ftkit.prompts.chat_template as CT
    tok = T.llama3()
    p = tmp_path / "chat.jsonl"; p.write_text("\n".join(json.dumps(r) for r in rows(2400)) + "\n")
    cfg = lambda n: make_cfg(datasets=[{"path": str(p), "type": "chat_template", "chat_template": "llama3"}], sequence_len=256,
                             dataset_num_proc=n, dataset_prepared_path=str(tmp_path / f"prep{n}"), shuffle_merged_datasets=True)
    one = D.prepare(cfg(1), tok, quiet=True)
    # 2 threads per worker even on a 2-core machine (where the cores per worker give 1), and a record of the pools
    # the workers start: the thread path must really run in the forked workers
    monkeypatch.setattr(D, "_encode_threads", lambda n: 2 if n > 1 else 1)
    orig, seen = CT._encode_pool, tmp_path / "pools"
    seen.mkdir()
    def spy(threads):
        (seen / f"{os.getpid()}-{threads}").touch(); return orig(threads)
    monkeypatch.setattr(CT, "_encode_pool", spy)
    forked = []
    orig_forked = D._map_forked
    monkeypatch.setattr(D, "_map_forked", lambda *a, **k: forked.append(1) or orig_forked(*a, **k))
    two = D.prepare(cfg(2), tok, quiet=True)
    assert forked == ([1] if sys.platform.startswith("linux") else [])     # ftkit's own workers, where fork is there
    pools = [f.name.split("-") for f in seen.iterdir()]
    assert pools and all(pid != str(os.getpid()) and t == "2" for pid, t in pools)   # in the workers, not here
    assert len({pid for pid, _ in pools}) == 2
    a, b = one.train.with_format("arrow")[:], two.train.with_format("arrow")[:]
    assert a.equals(b) and a.schema == b.schema                    # every column, every row, in the same (shuffled) order
    assert one.report.dropped == two.report.dropped == {"empty_conversation": 25, "too_long": 1}
    assert (one.report.tokens, one.report.trained_tokens) == (two.report.tokens, two.report.trained_tokens)

def _prepared(tmp_path, n, name, rows_=None, **kw):
    p = tmp_path / "chat.jsonl"
    if not p.exists(): p.write_text("\n".join(json.dumps(r) for r in (rows_ or rows(2400))) + "\n")
    cfg = make_cfg(datasets=[{"path": str(p), "type": "chat_template", "chat_template": "llama3"}], sequence_len=256,
                   dataset_num_proc=n, dataset_prepared_path=str(tmp_path / name), shuffle_merged_datasets=True, **kw)
    import ftkit.data as D
    return D.prepare(cfg, T.llama3(), quiet=True)

def test_datasets_pool_where_fork_does_not_apply_gives_the_same_rows(tmp_path, monkeypatch):
    import ftkit.data as D
    ours = _prepared(tmp_path, 2, "ours")
    assert len(_leftovers(tmp_path)) == (2 if sys.platform.startswith("linux") else 0)   # one file per worker, kept as datasets keeps its own
    monkeypatch.setattr(D, "_can_fork", lambda raw, n: False)             # e.g. macOS, or rows built in memory
    monkeypatch.setattr(D, "_map_forked", lambda *a, **k: pytest.fail("not on this path"))
    pool = _prepared(tmp_path, 2, "pool")
    a, b = ours.train.with_format("arrow")[:], pool.train.with_format("arrow")[:]
    assert a.equals(b) and a.schema == b.schema
    assert ours.report.dropped == pool.report.dropped and ours.report.examples == pool.report.examples

def test_row_numbers_count_from_the_whole_entry(tmp_path):
    rs = [{"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]} for i in range(2400)]
    rs[1700]["messages"] = []                                              # in the second worker's share
    with pytest.raises(Exception) as e:
        _prepared(tmp_path, 2, "strict", rs, strict=True)
    assert "chat.jsonl row 1700" in str(e.value) and "empty_conversation" in str(e.value)
    rs[1700]["messages"] = [{"role": "user", "content": "x " * 400}, {"role": "assistant", "content": "y"}]
    (tmp_path / "chat.jsonl").unlink()
    rep = _prepared(tmp_path, 2, "drop", rs).report
    assert rep.dropped == {"too_long": 1} and rep.examples["too_long"].startswith("datasets[0] chat.jsonl row 1700:")

def _children() -> list[int]:
    "This process's live child processes (zombies included)."
    me, out = str(os.getpid()), []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try: st = (d / "stat").read_text()
            except OSError: continue
            if st.rsplit(")", 1)[1].split()[1] == me: out.append(int(d.name))
    return out

def _leftovers(tmp_path):
    "The workers' Arrow files next to the loaded rows (datasets' cache folder of chat.jsonl)."
    import ftkit.data as D
    from ftkit.config import DatasetEntry
    raw, _ = D.load_source(DatasetEntry(path=str(tmp_path / "chat.jsonl"), type="chat_template"))
    return sorted(p.name for p in Path(raw.cache_files[0]["filename"]).parent.glob("cache-ftkit-*"))

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ftkit forks its own workers on Linux")

@linux_only
@pytest.mark.parametrize("kind", ["data_error", "bug"])
def test_a_workers_error_is_raised_here_as_it_was_raised_there(tmp_path, monkeypatch, kind):
    import ftkit.data as D
    orig = D._batch_table
    def batch_table(batch, idxs, **kw):
        if 1500 in idxs:
            if kind == "data_error": raise D.DataError("a picture is missing", "datasets[0] chat.jsonl row 1500", "add it")
            raise KeyError("labels")
        return orig(batch, idxs, **kw)
    monkeypatch.setattr(D, "_batch_table", batch_table)
    before = set(_children())
    with pytest.raises((D.DataError, KeyError)) as e:
        _prepared(tmp_path, 2, "prep")
    if kind == "data_error":
        assert type(e.value) is D.DataError and (e.value.what, e.value.where, e.value.fix) == (
            "a picture is missing", "datasets[0] chat.jsonl row 1500", "add it")
    else:
        assert type(e.value) is KeyError and "raised in tokenization worker 1 for datasets[0]" in e.value.__notes__[0]
    assert set(_children()) <= before and _leftovers(tmp_path) == []

@linux_only
def test_a_worker_that_dies_is_a_clear_error_and_stops_the_others(tmp_path, monkeypatch):
    import signal, time
    import ftkit.data as D
    orig = D._batch_table
    def batch_table(batch, idxs, **kw):
        if 1500 in idxs: os.kill(os.getpid(), signal.SIGKILL)              # as the out-of-memory killer would
        if 0 in idxs: time.sleep(60)                                      # the other worker: stopped, not waited for
        return orig(batch, idxs, **kw)
    monkeypatch.setattr(D, "_batch_table", batch_table)
    before, t0 = set(_children()), time.time()
    with pytest.raises(D.DataError) as e:
        _prepared(tmp_path, 2, "prep")
    assert time.time() - t0 < 30
    assert "tokenization worker 1 for datasets[0] was killed by SIGKILL" in str(e.value) and "dataset_num_proc" in str(e.value)
    assert set(_children()) <= before and _leftovers(tmp_path) == []

@linux_only
def test_an_interrupted_parent_leaves_no_worker_behind(tmp_path, monkeypatch):
    import ftkit.data as D
    def interrupted(fds, bar): raise KeyboardInterrupt
    monkeypatch.setattr(D, "_collect", interrupted)
    before = set(_children())
    with pytest.raises(KeyboardInterrupt):
        _prepared(tmp_path, 2, "prep")
    assert set(_children()) <= before and _leftovers(tmp_path) == []

PROBE = r'''
import os, sys, json
sys.path.insert(0, sys.argv[1])
import ftkit.data as D
from helpers import make_cfg
from transformers import AutoTokenizer

def pool_usable_after_fork(tok):
    "Whether a forked child can still start the tokenizer's thread pool: only when this process never used it."
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        n0 = len(os.listdir("/proc/self/task")); tok._tokenizer.encode_batch(["a b c d"] * 64)
        os.write(w, b"1" if len(os.listdir("/proc/self/task")) > n0 else b"0"); os._exit(0)
    os.close(w); os.waitpid(pid, 0); out = os.read(r, 1); os.close(r)
    return out == b"1"

tok = AutoTokenizer.from_pretrained(sys.argv[4])        # loaded, not trained here (training uses the pool)
seen = []
orig = D._map_rows
def probe(*a, **k):
    seen.append(pool_usable_after_fork(tok)); return orig(*a, **k)
D._map_rows = probe
cfg = make_cfg(datasets=[{"path": sys.argv[2], "type": "chat_template", "chat_template": "llama3"}], sequence_len=64,
               dataset_num_proc=2, dataset_prepared_path=sys.argv[3])
D.prepare(cfg, tok, quiet=True)
tok("the parent tokenizes something")                  # transformers' call: the batch call, which starts the pool
print(json.dumps({"before_map": seen, "after_use": pool_usable_after_fork(tok)}))
'''

@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_parent_never_starts_the_tokenizer_pool_before_the_fork(tmp_path):
    p = tmp_path / "chat.jsonl"; p.write_text("\n".join(json.dumps(r) for r in rows(20)) + "\n")
    T.llama3().save_pretrained(str(tmp_path / "tok"))
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}     # the library default: parallel
    out = subprocess.run([sys.executable, "-c", PROBE, str(Path(__file__).parent), str(p), str(tmp_path / "prep"), str(tmp_path / "tok")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res == {"before_map": [True], "after_use": False}   # (after_use: the probe does see a pool the parent started)
