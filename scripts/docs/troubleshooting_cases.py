"""The troubleshooting page: common config mistakes, each run through `ftkit.config.validate` at build time so
the page shows the message ftkit really prints, and the errors ftkit raises at run time, collected from
the source (every `raise SomethingError(...)` and every `RowError(reason, ...)` in ftkit/)."""
from __future__ import annotations

import ast, re
import builtins
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CASES = [
    ("Config mistakes", [
        ("A misspelt key", "base_model: smollm2-135m-instruct\nlearning_rat: 2e-4\ndatasets:\n  - path: data.jsonl\n    type: chat_template\n",
         "Unknown keys are errors (Axolotl ignores them silently): fix the spelling ftkit suggests."),
        ("A value of the wrong type", "base_model: smollm2-135m-instruct\nlearning_rate: fast\nmicro_batch_size: 0\n"
         "datasets:\n  - path: data.jsonl\n    type: chat_template\n", None),
        ("A dataset type that does not exist", "base_model: smollm2-135m-instruct\nlearning_rate: 2e-4\n"
         "datasets:\n  - path: data.jsonl\n    type: chat_templat\n",
         "The [dataset formats](formats.html) page lists every type."),
        ("QLoRA without 4-bit loading", "base_model: smollm2-135m-instruct\nlearning_rate: 2e-4\nadapter: qlora\n"
         "datasets:\n  - path: data.jsonl\n    type: alpaca\n", None),
        ("Two half precisions", "base_model: smollm2-135m-instruct\nlearning_rate: 2e-4\nbf16: true\nfp16: true\n"
         "datasets:\n  - path: data.jsonl\n    type: alpaca\n", None),
        ("Evaluation without evaluation data", "base_model: smollm2-135m-instruct\nlearning_rate: 2e-4\neval_steps: 10\n"
         "datasets:\n  - path: data.jsonl\n    type: alpaca\n", None),
        ("A key ftkit accepts but ignores", "base_model: smollm2-135m-instruct\nlearning_rate: 2e-4\nwandb_project: demo\n"
         "datasets:\n  - path: data.jsonl\n    type: alpaca\n",
         "A warning, not an error: the run goes on. `strict: true` makes it an error."),
        ("An old key name", "base_model: smollm2-135m-instruct\nlearning_rate: 2e-4\ndpo_beta: 0.1\nrl: dpo\n"
         "datasets:\n  - path: data.jsonl\n    type: chatml.intel\n", None),
        ("Preference data without `rl:`", "base_model: smollm2-135m-instruct\nlearning_rate: 2e-4\n"
         "datasets:\n  - path: data.jsonl\n    type: chatml.intel\n", None),
        ("No learning rate", "base_model: smollm2-135m-instruct\ndatasets:\n  - path: data.jsonl\n    type: alpaca\n", None),
    ]),
]


def _msg(node) -> str:
    "The message expression of a raise, as a template: f-string parts become {placeholders}."
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        out = ""
        for v in node.values:
            out += v.value if isinstance(v, ast.Constant) else "{" + ast.unparse(v.value) + "}"
        return out
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _msg(node.left) + _msg(node.right)
    return "{" + ast.unparse(node) + "}"


def collect_raises() -> dict[str, list[tuple[str, str]]]:
    "{error class: [(module, message template)]} for every `raise XError(...)` in ftkit/ (generated code)."
    out: dict[str, list[tuple[str, str]]] = {}
    for p in sorted((ROOT / "ftkit").rglob("*.py")):
        if p.name == "_modidx.py":
            continue
        mod = "ftkit." + ".".join(p.relative_to(ROOT / "ftkit").with_suffix("").parts)
        try:
            tree = ast.parse(p.read_text())
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            call = None
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                call = node.exc
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "RowError":
                call = node
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "emit" and len(node.args) >= 5
                  and isinstance(node.args[3], ast.Constant) and node.args[3].value):   # ftkit.data's drop reasons
                out.setdefault("RowError", []).append((mod, f"{node.args[3].value}: {_msg(node.args[4])}"))
                continue
            if mod == "ftkit.data" and isinstance(node, ast.Tuple):                  # ftkit.data's drop reasons: a
                elts = node.elts                                                      # ("reason", "detail") pair in a record
                for a, b in zip(elts, elts[1:]):
                    if (isinstance(a, ast.Constant) and isinstance(a.value, str) and re.fullmatch(r"[a-z]+(_[a-z]+)+", a.value)
                            and isinstance(b, (ast.Constant, ast.JoinedStr)) and " " in _msg(b)):   # a sentence, not a key name
                        item = (mod, f"{a.value}: {_msg(b)}")
                        if item not in out.setdefault("RowError", []): out["RowError"].append(item)
                continue
            if call is None or not call.args:
                continue
            name = getattr(call.func, "id", None) or getattr(call.func, "attr", None) or ""
            if not name.endswith("Error") or hasattr(builtins, name):      # ftkit's own error classes only
                continue
            if name == "RowError" and len(call.args) >= 2:
                msg = _msg(call.args[0]) + ": " + _msg(call.args[1])
            else:
                msg = _msg(call.args[0])
            if len(msg.strip("{} ")) < 12:
                continue
            out.setdefault(name, [])
            if (mod, msg) not in out[name]:
                out[name].append((mod, msg))
    return out


def runtime_errors_section() -> list[str]:
    import importlib
    found = collect_raises()
    lines = ["## Errors at run time", "",
             "Data, files, the machine and launches are checked when a stage runs. Every such error is an `FtkitError`: the "
             "command line prints it and exits with status 2, a notebook cell shows it without a traceback. Below is every "
             "message ftkit can raise, collected from its source when these docs were built (`{...}` is filled in with "
             "the actual key, file, value or count).", ""]
    rows = found.pop("RowError", [])
    docs = {}
    for mod in ("ftkit.errors", "ftkit.data", "ftkit.launch", "ftkit.train", "ftkit.infer", "ftkit.rl", "ftkit.prompts.registry"):
        try:
            m = importlib.import_module(mod)
        except Exception:
            continue
        for k, v in vars(m).items():
            if isinstance(v, type) and issubclass(v, Exception) and v.__doc__:
                docs.setdefault(k, v.__doc__.strip())
    for name in sorted(found):
        lines += [f"### `{name}`", ""]
        if name in docs:
            lines += [docs[name], ""]
        for mod, msg in found[name]:
            lines += [f"- `{mod}`: " + _inline(msg)]
        lines.append("")
    if rows:
        lines += ["## Rows that are dropped", "",
                  "A row a prompt strategy cannot turn into tokens is not an error for the whole run: it is dropped and "
                  "counted by reason in the data report (`%%finetune debug`, `ftkit preprocess`). The reasons:", ""]
        for mod, msg in rows:
            lines += [f"- `{mod}`: " + _inline(msg)]
        lines.append("")
    return lines


def _inline(msg: str) -> str:
    msg = " ".join(msg.split())
    return "`` " + msg.replace("``", "` `") + " ``" if "`" in msg else f"`{msg}`"
