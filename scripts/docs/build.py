"""Build the docs site into _docs/.

    python scripts/docs/build.py [--execute all|none] [--renderer auto|quarto|sphinx] [--out _docs]

Where Quarto is installed (and --renderer is auto or quarto) this is nbdev's own flow: `nbdev-docs`
through `_quarto.yml`, with the generated pages written into nbs/_proc-like staging first.
Elsewhere the same pages go through Sphinx + MyST-NB + Furo:

1. every notebook named in `_quarto.yml`'s sidebar (and every other notebook in nbs/) is executed the
   way `nbdev-test` runs it (execnb's CaptureShell, cells flagged with `tst_flags` skipped), cached by
   content hash under _proc/exec/; examples/quickstart.ipynb runs in a real Jupyter kernel (nbclient),
   or its executed copy from the quickstart test (tests/artifacts/quickstart.executed.ipynb) is reused
   when its cells match the source;
2. nbdev's notebook processors (`FilterDefaults`: export and hidden cells removed, `show_doc`
   signatures rendered, links added) run on each executed notebook; Quarto cell options become MyST-NB
   tags (`echo: false` -> remove-input, ...);
3. the generated pages (scripts/docs/pages.py: config reference, dataset formats, CLI, performance,
   migration, troubleshooting) and the hand-written ones (docs/*.md) are written next to them;
4. sphinx-build writes the HTML site (sidebar from `_quarto.yml`, search, highlighting) into _docs/.

Why Sphinx + MyST-NB + Furo: the three are actively maintained; MyST-NB renders a notebook's stored outputs
(HTML such as the token views and dashboards, images, and the markdown that nbdev's show_doc produces) without
running it, so nbdev's processing and our nbdev-test-style execution stay in charge; Sphinx's search is a static
index that works from any static host; and the build needs nothing from the network. mkdocs-material was set
aside because its authors moved it to maintenance in favour of a successor (and MkDocs 1.x itself is no longer
developed); Jupyter Book 2 / mystmd because it is a Node.js tool that fetches its HTML theme when it builds.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
NBS = ROOT / "nbs"
DOCS_SRC = ROOT / "docs"
PROC = ROOT / "_proc"
EXEC_CACHE = PROC / "exec"
SITE_SRC = PROC / "site"
QUICKSTART = ROOT / "examples" / "quickstart.ipynb"
DOC_HOST = "https://ftkit.github.io/ftkit/"

sys.path.insert(0, str(HERE))


def log(*a):
    print("[docs]", *a, flush=True)


# ---------------------------------------------------------------- the sidebar (from _quarto.yml)

TITLES: dict[str, str] = {}     # sidebar entries given as {text, href} in _quarto.yml


def sidebar() -> list[tuple[str | None, list[str]]]:
    "[(section title or None, [entries])] from `_quarto.yml`; nbs/ notebooks not listed go to 'API'."
    q = yaml.safe_load((ROOT / "_quarto.yml").read_text())
    contents = q["website"]["sidebar"].get("contents", [])
    out: list[tuple[str | None, list[str]]] = []
    for item in contents:
        if isinstance(item, str):
            out.append((None, [item]))
        else:
            es = []
            for c in item.get("contents", []):
                if isinstance(c, dict):
                    TITLES[c["href"]] = c.get("text")
                es.append(c if isinstance(c, str) else c["href"])
            out.append((item["section"], es))
    listed = {e for _, es in out for e in es}
    extra = sorted(p.name for p in NBS.glob("*.ipynb") if p.name not in listed and not p.name.startswith("_"))
    if extra:
        for title, es in out:
            if title == "API":
                es.extend(extra)
                break
        else:
            out.append(("API", extra))
    return out


# ---------------------------------------------------------------- executing notebooks

def _src_key(nb_path: Path) -> str:
    "What an executed notebook depends on: its own text and the package's sources."
    h = hashlib.sha256(nb_path.read_bytes())
    for p in sorted((ROOT / "ftkit").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py")):
        h.update(p.name.encode()); h.update(p.read_bytes())
    return h.hexdigest()[:20]


def _exec_nbdev(args) -> tuple[str, float, str]:
    "Run one nbs/ notebook as nbdev-test does, keeping the outputs (in a fresh process)."
    src, dst, key = args
    from fastcore.nbio import write_nb
    from execnb.shell import CaptureShell
    from nbdev.config import get_config
    from nbdev.process import NBProcessor
    from nbdev.test import _skip_cell
    from fastcore.xtras import working_directory
    src, dst = Path(src), Path(dst)
    os.environ["IN_TEST"] = "1"
    t0 = time.time()
    cfg = get_config(src.parent)
    flags = (cfg.get("tst_flags", "") or "").split()
    nb = NBProcessor(src, rm_directives=False, process=True).nb
    skip = _skip_cell(nb, flags, None)
    k = CaptureShell(src)
    err = ""
    with working_directory(src.parent):
        try:
            k.run_all(nb, exc_stop=False, preproc=skip, cell_timeout=int(cfg.get("cell_timeout", 600) or 600))
        except Exception as e:     # a cell that failed keeps its error output; the page shows it (and the docs test fails)
            err = f"{type(e).__name__}: {e}"
    for c in nb.cells:
        for o in c.get("outputs", []) if c.get("cell_type") == "code" else []:
            if o.get("output_type") == "error" and not err:
                err = f"cell {c.get('idx_', '?')}: {o.get('ename')}: {str(o.get('evalue'))[:300]}"
    nb.metadata["ftkit_docs_key"] = "failed" if err else key     # a failed run is not cached
    write_nb(nb, dst)
    return src.name, time.time() - t0, err


def _quickstart_matches(executed: Path) -> bool:
    "Is `executed` a run of the current examples/quickstart.ipynb (same cell sources)?"
    try:
        a = json.loads(executed.read_text()); b = json.loads(QUICKSTART.read_text())
    except Exception:
        return False
    src = lambda nb: ["".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in nb["cells"]]
    ok = all(len(c.get("outputs", [])) == 0 or not any(o.get("output_type") == "error" for o in c["outputs"])
             for c in a["cells"] if c["cell_type"] == "code")
    return src(a) == src(b) and ok and any(c.get("outputs") for c in a["cells"] if c["cell_type"] == "code")


def _exec_quickstart(dst: Path, key: str) -> bool:
    "examples/quickstart.ipynb in a real Jupyter kernel, in a scratch copy of examples/ (as the quickstart test runs it); True if it failed."
    import nbformat
    from nbclient import NotebookClient
    reuse = ROOT / "tests" / "artifacts" / "quickstart.executed.ipynb"
    if reuse.exists() and _quickstart_matches(reuse):
        nb = nbformat.read(reuse, as_version=4)
        log("quickstart: reusing the quickstart test's executed copy", reuse.relative_to(ROOT))
    else:
        import tempfile
        work = Path(tempfile.mkdtemp(prefix="ftkit-docs-quickstart-"))
        shutil.copy(QUICKSTART, work)
        shutil.copy(ROOT / "examples" / "make_reverse_dataset.py", work)
        shutil.copytree(ROOT / "examples" / "data", work / "data")
        nb = nbformat.read(work / "quickstart.ipynb", as_version=4)
        t0 = time.time()
        err = ""
        try:
            NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(work)}}).execute()
        except Exception as e:
            err = f"{type(e).__name__}: {str(e)[:300]}"
        shutil.rmtree(work, ignore_errors=True)
        log(f"quickstart: executed in {time.time() - t0:.0f}s", err)
        if err:
            key = "failed"                 # shown as it is, run again next time
    nb.metadata["ftkit_docs_key"] = key
    nbformat.write(nb, dst)
    return key == "failed"


def execute_all(paths: list[Path], mode: str, workers: int) -> dict[str, Path]:
    "Executed copies (or the sources themselves with --execute none): {source name: path}."
    EXEC_CACHE.mkdir(parents=True, exist_ok=True)
    out, todo = {}, []
    for p in paths:
        if mode == "none":
            out[p.name] = p
            continue
        key, dst = _src_key(p), EXEC_CACHE / p.name
        out[p.name] = dst
        if dst.exists():
            try:
                if json.loads(dst.read_text()).get("metadata", {}).get("ftkit_docs_key") == key:
                    continue
            except Exception:
                pass
        todo.append((p, dst, key))
    nbdev_jobs = [(str(s), str(d), k) for s, d, k in todo if s != QUICKSTART]
    failed = []
    if nbdev_jobs:
        log(f"executing {len(nbdev_jobs)} notebook(s) with {workers} worker(s) (cached in {EXEC_CACHE.relative_to(ROOT)})")
        ctx = mp.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, max_tasks_per_child=1) as ex:
            for name, dt, err in ex.map(_importable(_exec_nbdev), nbdev_jobs):
                log(f"  {name}: {dt:.1f}s" + (f"  ERROR {err}" if err else ""))
                if err:
                    failed.append(name)
    for s, d, k in todo:
        if s == QUICKSTART:
            if _exec_quickstart(d, k):
                failed.append(s.name)
    if failed:
        log(f"WARNING: {len(failed)} notebook(s) raised while executing; their pages show the error: {', '.join(failed)}")
    return out


# ---------------------------------------------------------------- nbdev processing -> MyST-NB notebooks

_QUARTO_TAGS = {("echo", "false"): "remove-input", ("output", "false"): "remove-output",
                ("include", "false"): "remove-cell"}
_DIRECTIVE = re.compile(r"^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$")
_FENCE = re.compile(r"^:::+\s*(\{[^}]*\})?\s*$")
_ATTRS = re.compile(r"\)\{[^}\n]*\}")


def _links(text: str) -> str:
    "nbdev's absolute doc links, and the README's links into _docs/, -> relative links inside the site."
    return text.replace(DOC_HOST, "").replace("](_docs/", "](")


def _show_doc_md(md: str) -> str:
    "show_doc markdown: drop Quarto-only attributes, give the heading an anchor nbdev's links use."
    md = _ATTRS.sub(")", md)
    md = re.sub(r"^\s*---\s*\n", "", md)
    md = re.sub(r"^(#{2,4}) (\S+)\s*$", lambda m: f'<a id="{m.group(2)}"></a>\n\n{m.group(1)} {m.group(2)}', md, count=1, flags=re.M)
    return _links(md)


def to_myst(nb, page_name: str):
    "Turn an nbdev-processed notebook into one MyST-NB renders like Quarto would."
    cells = []
    title = desc = None
    for c in nb.cells:
        if c.cell_type == "raw" and c.source.lstrip().startswith("---"):
            fm = yaml.safe_load(c.source.strip().strip("-")) or {}
            title, desc = fm.get("title"), fm.get("description")
            continue
        if c.cell_type == "markdown":
            lines = [l for l in c.source.split("\n") if not _FENCE.match(l)]
            c.source = _links("\n".join(lines))
            if not c.source.strip():
                continue
        if c.cell_type == "code":
            keep, tags = [], set(c.metadata.get("tags", []))
            for l in c.source.split("\n"):
                m = _DIRECTIVE.match(l)
                if m:
                    tag = _QUARTO_TAGS.get((m.group(1), m.group(2).lower()))
                    if tag: tags.add(tag)
                    continue
                keep.append(l)
            c.source = "\n".join(keep).strip("\n")
            if tags: c.metadata["tags"] = sorted(tags)
            for o in c.get("outputs", []):
                d = o.get("data", {})
                if "text/markdown" in d:
                    md = d["text/markdown"]; md = "".join(md) if isinstance(md, list) else md
                    d["text/markdown"] = _show_doc_md(md)
                if "text/html" in d:
                    h = d["text/html"]; h = "".join(h) if isinstance(h, list) else h
                    d["text/html"] = _links(h)
            if not c.source.strip() and not c.get("outputs"):
                continue
        cells.append(c)
    if title:
        import nbformat
        head = f"# {title}" + (f"\n\n{desc}" if desc else "")
        cells.insert(0, nbformat.v4.new_markdown_cell(head))
    nb.cells = cells
    nb.metadata.pop("ftkit_docs_key", None)
    return nb


def _filter_defaults():
    "nbdev's FilterDefaults, with show_doc execution that keeps our executed outputs and survives a failing cell."
    import copy
    from nbdev.processors import FilterDefaults, exec_show_docs, _do_eval, _is_showdoc

    class keep_outputs_show_docs(exec_show_docs):
        def __call__(self, cell):
            if not self.nb.has_docs_ or not hasattr(self, "k"):
                return
            if not _do_eval(cell):
                return
            before = copy.deepcopy(cell.get("outputs", []))
            self.k.cell(cell)
            failed = self.k.exc is not None
            self.k.exc = None
            if failed or not _is_showdoc(cell):    # executed notebooks keep their own outputs
                cell["outputs"] = before

    class Filter(FilterDefaults):
        def base_procs(self):
            return [keep_outputs_show_docs if p is exec_show_docs else p for p in super().base_procs()]
    return Filter()


def process_notebook(executed: Path, dst: Path, is_nbdev: bool):
    import nbformat
    from fastcore.nbio import read_nb
    if is_nbdev:
        os.environ["IN_TEST"] = "1"
        cwd = os.getcwd()
        os.chdir(NBS)
        try:
            nb = read_nb(executed)
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _filter_defaults()(nb)
        finally:
            os.chdir(cwd)
        from fastcore.nbio import nb2str
        nb = nbformat.reads(nb2str(nb), as_version=4)
    else:
        nb = nbformat.read(executed, as_version=4)
    nb = to_myst(nb, dst.stem)
    nbformat.write(nb, dst)


def _importable(fn):
    "The same function reached through `import build` (spawned workers cannot unpickle functions of __main__)."
    import importlib
    return getattr(importlib.import_module("build"), fn.__name__)


def _process_job(job):
    process_notebook(*job)


def page_name(entry: str) -> str:
    "The HTML page name of a sidebar entry: nbdev's output-file (config.html for 00_config.ipynb)."
    p = Path(entry)
    if p.suffix == ".ipynb" and (NBS / entry).exists() and p.name != "index.ipynb":
        return nbdev_output_stem(NBS / entry)
    return p.stem


def nbdev_output_stem(path: Path) -> str:
    "The page nbdev names a notebook: its default_exp module (dots kept), else the file stem without the number."
    nb = json.loads(path.read_text())
    for c in nb["cells"]:
        s = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
        m = re.search(r"^#\|\s*default_exp\s+(\S+)", s, re.M)
        if m:
            return "init" if m.group(1) == "__init__" else m.group(1)
    return re.sub(r"^\d+[a-z]?_", "", path.stem)


# ---------------------------------------------------------------- the site

def write_index_toctree(index_nb: Path, nav: list[tuple[str | None, list[str]]]):
    import nbformat
    nb = nbformat.read(index_nb, as_version=4)
    blocks = []
    for title, entries in nav:
        names = [(page_name(e), TITLES.get(e)) for e in entries if page_name(e) != "index"]
        names = [(n, t) for n, t in names if (SITE_SRC / f"{n}.ipynb").exists() or (SITE_SRC / f"{n}.md").exists()]
        if not names:
            continue
        cap = f":caption: {title}\n" if title else ""
        items = [f"{t} <{n}>" if t else n for n, t in names]
        blocks.append("```{toctree}\n:hidden:\n" + cap + ":maxdepth: 1\n\n" + "\n".join(items) + "\n```")
    nb.cells.append(nbformat.v4.new_markdown_cell("\n\n".join(blocks)))
    nbformat.write(nb, index_nb)


def build_sphinx(execute: str, out: Path, workers: int) -> None:
    t0 = time.time()
    nav = sidebar()
    if SITE_SRC.exists():
        shutil.rmtree(SITE_SRC)
    SITE_SRC.mkdir(parents=True)
    # 1-2. notebooks
    nb_paths = []
    for _, entries in nav:
        for e in entries:
            p = (NBS / e).resolve()
            if p.suffix == ".ipynb" and p.exists():
                nb_paths.append(p)
            elif p.suffix == ".ipynb":
                log(f"note: {e} is in _quarto.yml but does not exist; skipped")
    executed = execute_all(nb_paths, execute, workers)
    t1 = time.time()
    jobs = []
    for p in nb_paths:
        name = "index" if p.name == "index.ipynb" else page_name(str(p.relative_to(NBS)) if p.is_relative_to(NBS) else p.name)
        if p == QUICKSTART:
            name = "quickstart"
        jobs.append((executed[p.name], SITE_SRC / f"{name}.ipynb", p.parent == NBS))
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        list(ex.map(_importable(_process_job), jobs))
    # 3. hand-written and generated pages
    for md in DOCS_SRC.glob("*.md"):
        shutil.copy(md, SITE_SRC / md.name)
    if (DOCS_SRC / "_static").exists():
        shutil.copytree(DOCS_SRC / "_static", SITE_SRC / "_static", dirs_exist_ok=True)
    import pages
    pages.write_all(SITE_SRC, ROOT)
    write_index_toctree(SITE_SRC / "index.ipynb", nav)
    t2 = time.time()
    # 4. Sphinx
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-j", str(workers), "-c", str(HERE), str(SITE_SRC), str(out)]
    r = subprocess.run(cmd, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"sphinx-build failed ({r.returncode})")
    (out / ".nojekyll").touch()
    log(f"built {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}/index.html in {time.time() - t0:.0f}s "
        f"(execute {t1 - t0:.0f}s, pages {t2 - t1:.0f}s, sphinx {time.time() - t2:.0f}s)")


def build_quarto(execute: str) -> None:
    "nbdev's own flow: nbdev-docs renders nbs/ through _quarto.yml; the generated pages are staged in nbs/ for it."
    import pages
    staged, static_existed = [], (NBS / "_static").exists()
    for md in DOCS_SRC.glob("*.md"):
        shutil.copy(md, NBS / md.name); staged.append(NBS / md.name)
    staged += pages.write_all(NBS, ROOT)
    try:
        subprocess.run([str(Path(sys.executable).parent / "nbdev-docs")], cwd=ROOT, check=True)
    finally:
        for p in staged:
            Path(p).unlink(missing_ok=True)
        if not static_existed:
            shutil.rmtree(NBS / "_static", ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--execute", choices=["all", "none"], default=os.environ.get("FTKIT_DOCS_EXECUTE", "all"),
                    help="run the notebooks to render their outputs (cached under _proc/exec)")
    ap.add_argument("--renderer", choices=["auto", "quarto", "sphinx"], default="auto")
    ap.add_argument("--out", default=str(ROOT / "_docs"))
    ap.add_argument("--workers", type=int, default=int(os.environ.get("FTKIT_DOCS_WORKERS", "2")))
    a = ap.parse_args(argv)
    use_quarto = a.renderer == "quarto" or (a.renderer == "auto" and shutil.which("quarto"))
    if use_quarto:
        log("Quarto found: nbdev-docs through _quarto.yml")
        build_quarto(a.execute)
    else:
        log("Quarto not installed: Sphinx + MyST-NB + Furo")
        build_sphinx(a.execute, Path(a.out).resolve(), a.workers)


if __name__ == "__main__":
    main()
