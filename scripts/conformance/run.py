"""Run every conformance case through `axolotl preprocess` and `ftkit preprocess` and compare the
prepared rows token by token.

    .venv/bin/python scripts/conformance/run.py [--only NAME ...] [--write-fixtures] [--report PATH]

Needs the side virtualenv made by `setup.sh` (AXOLOTL_VENV, default /work/conformance-venv) and
runs offline: both tools load the SmolLM2 tokenizer from a folder written by `make_tokenizer.py`.
Work files go to CONFORMANCE_WORK (default /tmp/ftkit-conformance). Writes REPORT.md beside this
file and, with --write-fixtures, tests/fixtures/conformance/<case>.json (the rows Axolotl made)."""
from __future__ import annotations
import argparse, difflib, json, os, subprocess, sys, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from cases import CASES, Case, write_case           # noqa: E402
from differences import DELIBERATE                   # noqa: E402

VENV = Path(os.environ.get("AXOLOTL_VENV", "/work/conformance-venv"))
WORK = Path(os.environ.get("CONFORMANCE_WORK", "/tmp/ftkit-conformance"))
FIXTURES = REPO / "tests" / "fixtures" / "conformance"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
           "WANDB_MODE": "disabled", "AXOLOTL_DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}

def tokenizer_dir() -> Path:
    d = WORK / "smollm2"
    if not (d / "tokenizer.json").exists():
        subprocess.run([sys.executable, str(HERE / "make_tokenizer.py"), str(d)], check=True)
    return d

def _rows(prepared: Path) -> list[dict] | None:
    "The prepared train rows under `prepared` (Axolotl: <hash>/; ftkit: <key>/train)."
    import datasets
    hits = sorted(p.parent for p in prepared.rglob("state.json"))
    if not hits: return None
    ds = datasets.load_from_disk(str(hits[0]))
    return [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in ds]

def _tail(log: Path, n=12) -> str:
    lines = [l for l in log.read_text(errors="replace").splitlines() if l.strip() and "%|" not in l]
    return "\n".join(lines[-n:])

def run_cases(cases: list[Case], tok_dir: Path) -> list[dict]:
    "Write every case, run each tool's `preprocess` on all of them (one process per tool: driver.py), collect the rows."
    import shutil
    ymls = {"axolotl": [], "ftkit": []}
    for case in cases:
        d = WORK / case.name
        if d.exists(): shutil.rmtree(d)
        for side in ymls: ymls[side].append(str(write_case(case, WORK, str(tok_dir), side)))
    rcs = {}
    for side, py in (("axolotl", VENV / "bin" / "python"), ("ftkit", REPO / ".venv" / "bin" / "python")):
        res = WORK / f"rc-{side}.json"
        t0 = time.time()
        subprocess.run([str(py), str(HERE / "driver.py"), side, str(res), *ymls[side]], env={**os.environ, **OFFLINE}, check=False)
        print(f"{side}: {len(cases)} cases in {time.time() - t0:.0f}s", flush=True)
        rcs[side] = json.loads(res.read_text()) if res.exists() else {}
    results = []
    for case in cases:
        d = WORK / case.name
        out = {"name": case.name, "what": case.what}
        for side in ("axolotl", "ftkit"):
            y = str(d / f"{side}.yml")
            rc = rcs[side].get(y, 1)
            rows = _rows(d / f"prepared-{side}") if rc == 0 else None
            out[side] = {"rc": rc, "rows": rows}
            if rows is None: out[side]["error"] = _tail(d / f"{side}.log") if (d / f"{side}.log").exists() else "no log"
        a, f = out["axolotl"]["rows"], out["ftkit"]["rows"]
        out["identical"] = a is not None and f is not None and a == f
        # D1: without sample_packing Axolotl keeps rows that train no token; ftkit drops them (they add nothing to the loss)
        out["identical_d1"] = a is not None and f is not None and [r for r in a if any(l != -100 for l in r["labels"])] == f
        out["both_failed"] = a is None and f is None
        results.append(out)
    return results

# --- readable diff -----------------------------------------------------------------------------------
class Decoder:
    def __init__(self, tok_dir):
        from transformers import AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(str(tok_dir))
    def piece(self, i): return repr(self.tok.decode([i]))[1:-1]
    def text(self, ids, n=160):
        t = self.tok.decode(ids); return repr(t[:n] + ("…" if len(t) > n else ""))

def _lab(l, i): return "·" if l == -100 else ("T" if l == i else str(l))

def diff_rows(a: list[dict], f: list[dict], dec: Decoder, max_rows=4, ctx=3) -> list[str]:
    "Markdown lines: rows only one side has, and per shared row the positions whose labels differ."
    L = []
    sm = difflib.SequenceMatcher(a=[tuple(r["input_ids"]) for r in a], b=[tuple(r["input_ids"]) for r in f], autojunk=False)
    shown = 0
    for op, a0, a1, f0, f1 in sm.get_opcodes():
        if op == "equal":
            for ia, jf in zip(range(a0, a1), range(f0, f1)):
                ra, rf = a[ia], f[jf]
                if ra["labels"] == rf["labels"] or shown >= max_rows: continue
                shown += 1
                ids = ra["input_ids"]
                bad = [k for k, (x, y) in enumerate(zip(ra["labels"], rf["labels"])) if x != y]
                L.append(f"- row {ia} (axolotl) = row {jf} (ftkit): same {len(ids)} tokens, labels differ at {len(bad)} position(s); "
                         f"trained tokens axolotl {sum(l != -100 for l in ra['labels'])}, ftkit {sum(l != -100 for l in rf['labels'])}")
                L.append("")
                L.append("  | pos | token | axolotl | ftkit |")
                L.append("  |---:|---|:-:|:-:|")
                keep = sorted({k for b in bad for k in range(max(0, b - ctx), min(len(ids), b + ctx + 1))})
                prev = None
                for k in keep:
                    if prev is not None and k != prev + 1: L.append("  | … | | | |")
                    mark = " **≠**" if k in bad else ""
                    L.append(f"  | {k} | `{dec.piece(ids[k])}` | {_lab(ra['labels'][k], ids[k])} | {_lab(rf['labels'][k], ids[k])}{mark} |")
                    prev = k
                L.append("")
        else:
            for ia in range(a0, a1):
                L.append(f"- only in axolotl: row {ia} ({len(a[ia]['input_ids'])} tokens): {dec.text(a[ia]['input_ids'])}")
            for jf in range(f0, f1):
                L.append(f"- only in ftkit: row {jf} ({len(f[jf]['input_ids'])} tokens): {dec.text(f[jf]['input_ids'])}")
    return L

def status(r: dict) -> str:
    if r["identical"]: return "identical"
    if r.get("identical_d1"): return "identical (D1)"
    if r["ftkit"]["rc"] not in (0, 2): return "ftkit crashed"       # 2: a reported config or data error; anything else is a bug
    if r["name"] in DELIBERATE: return "deliberate"
    if r["both_failed"]: return "both reject"
    return "differs"

def report(results: list[dict], dec: Decoder, versions: dict) -> str:
    n = len(results); ident = sum(r["identical"] for r in results)
    L = ["# Conformance report: ftkit vs Axolotl 0.19.0", "",
         f"Generated by `make conformance` (`scripts/conformance/run.py`) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
         "Each case runs `axolotl preprocess` and `ftkit preprocess` on the same YAML and the same small JSONL datasets,",
         "with the embedded SmolLM2 tokenizer saved to a local folder (no network), and compares the prepared",
         "`input_ids` and `labels` row by row. Labels in the diffs: `T` trained (label = token id), `·` masked (-100).", "",
         "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), "",
         f"**{ident} of {n} cases identical**, {sum(status(r) == 'identical (D1)' for r in results)} more identical once the rows "
         "Axolotl keeps without any trained token are left out (difference D1: ftkit drops them, they add nothing to the loss); deliberate differences: "
         f"{sum(status(r) == 'deliberate' for r in results)} (see DIFFERENCES.md); "
         f"other differences: {sum(status(r) == 'differs' for r in results)}; both tools reject: {sum(status(r) == 'both reject' for r in results)}"
         + (f"; ftkit crashed: {sum(status(r) == 'ftkit crashed' for r in results)}" if any(status(r) == 'ftkit crashed' for r in results) else "") + ".", "",
         "| case | checks | result | rows axolotl / ftkit |", "|---|---|---|---|"]
    for r in results:
        ra, rf = r["axolotl"]["rows"], r["ftkit"]["rows"]
        cnt = f"{'error' if ra is None else len(ra)} / {'error' if rf is None else len(rf)}"
        st = status(r)
        if st == "deliberate": st = f"deliberate: {DELIBERATE[r['name']]}"
        L.append(f"| {r['name']} | {r['what']} | {st} | {cnt} |")
    for r in results:
        if r["identical"] or r.get("identical_d1"): continue
        L += ["", f"## {r['name']}: {r['what']}", ""]
        if r["name"] in DELIBERATE: L += [f"Deliberate difference **{DELIBERATE[r['name']]}** (DIFFERENCES.md).", ""]
        for side in ("axolotl", "ftkit"):
            if r[side]["rows"] is None:
                L += [f"{side} failed (exit {r[side]['rc']}):", "", "```", r[side].get("error", ""), "```", ""]
        if r["axolotl"]["rows"] is not None and r["ftkit"]["rows"] is not None:
            L += diff_rows(r["axolotl"]["rows"], r["ftkit"]["rows"], dec)
    return "\n".join(L) + "\n"

def write_fixture(case: Case, r: dict):
    if status(r) == "ftkit crashed": return          # keep the last good fixture; the report shows the traceback
    FIXTURES.mkdir(parents=True, exist_ok=True)
    fx = {"name": case.name, "what": case.what, "config": case.config,
          "datasets": [{"entry": ds.entry, "rows": ds.rows} for ds in case.datasets],
          "status": status(r), "difference": DELIBERATE.get(case.name),
          "axolotl": {"rows": r["axolotl"]["rows"], "error": r["axolotl"].get("error")}}
    if not r["identical"]: fx["ftkit"] = {"rows": r["ftkit"]["rows"], "error": r["ftkit"].get("error")}
    (FIXTURES / f"{case.name}.json").write_text(json.dumps(fx, ensure_ascii=False, indent=None, separators=(",", ":")) + "\n")

def versions() -> dict:
    def v(py, mods):
        code = "import importlib.metadata as m; print(' '.join(m.version(x) for x in %r))" % (mods,)
        return subprocess.run([py, "-c", code], capture_output=True, text=True).stdout.split()
    ax = v(str(VENV / "bin" / "python"), ["axolotl", "transformers", "tokenizers", "datasets"])
    ft = v(str(REPO / ".venv" / "bin" / "python"), ["transformers", "tokenizers", "datasets"])
    out = {}
    if ax: out.update({"axolotl": ax[0], "transformers (axolotl side)": ax[1], "tokenizers (axolotl side)": ax[2]})
    if ft: out.update({"transformers (ftkit side)": ft[0], "tokenizers (ftkit side)": ft[1]})
    return out

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="case names to run (default: all); merged into the last full run's report")
    ap.add_argument("--write-fixtures", action="store_true", help="write tests/fixtures/conformance/<case>.json")
    ap.add_argument("--report", default=str(HERE / "REPORT.md"))
    a = ap.parse_args(argv)
    if not (VENV / "bin" / "axolotl").exists():
        sys.exit(f"no axolotl in {VENV}: run scripts/conformance/setup.sh first (or set AXOLOTL_VENV)")
    tok_dir = tokenizer_dir()
    cases = [c for c in CASES if not a.only or c.name in a.only]
    results = run_cases(cases, tok_dir)
    prev = WORK / "results.json"
    if a.only and prev.exists():        # re-ran some cases: merge them into the last full run, so the report stays whole
        done = {r["name"]: r for r in json.loads(prev.read_text())}
        done.update({r["name"]: r for r in results})
        if all(c.name in done for c in CASES):
            results_all = [done[c.name] for c in CASES]
        else: results_all = None
    else: results_all = results
    for c, r in zip(cases, results):
        print(f"{c.name}: {status(r)}", flush=True)
        if a.write_fixtures: write_fixture(c, r)
    dec = Decoder(tok_dir)
    if results_all is None:
        print(report(results, dec, versions())); return
    Path(a.report).write_text(report(results_all, dec, versions()))
    (WORK / "results.json").write_text(json.dumps(results_all))
    ident = sum(r["identical"] for r in results_all)
    print(f"{ident} of {len(results_all)} cases identical; report: {a.report}")

if __name__ == "__main__":
    main()
