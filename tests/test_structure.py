"""The shape of the house: every config key is acted on or declared ignored, layers point one way, no import cycles,
no string reads of config keys."""
import ast
import pathlib

import pytest

from ftkit.config import IGNORED_KEYS, REJECTED_KEYS
from ftkit.schema import DatasetEntry, FinetuneConfig, TRLSettings, UserDefinedType

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "ftkit"


def _sources():
    for p in sorted(PKG.rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py")):
        if p.name == "_modidx.py" or "bench" in p.parts: continue
        yield p, ast.parse(p.read_text())


_TABLES = {"IGNORED_KEYS", "REJECTED_KEYS", "RENAMED_KEYS", "_OPTIMIZER_PACKAGES"}


def _config_code(tree):
    "config.py without its validation rules and key tables: a key named only there is checked, not acted on."
    for n in tree.body:
        if isinstance(n, ast.FunctionDef) and any(getattr(d, "id", None) == "rule" for d in n.decorator_list): continue
        if isinstance(n, (ast.Assign, ast.AnnAssign)):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target]
            if any(getattr(t, "id", None) in _TABLES for t in targets): continue
        yield n


def _key_reads() -> set[str]:
    """Names the code reads as config keys: attributes (`cfg.key`), `getattr(cfg, "key")`, and key names written as
    strings in code that maps them (e.g. `_trl(cfg, "num_generations", ...)`), outside the schema and the rules."""
    names = set()
    for p, tree in _sources():
        if p.name == "schema.py": continue
        nodes = _config_code(tree) if p.name == "config.py" else [tree]
        for top in nodes:
            for n in ast.walk(top):
                if isinstance(n, ast.Attribute): names.add(n.attr)
                elif isinstance(n, ast.Constant) and isinstance(n.value, str): names.add(n.value)
    return names


def _schema_keys():
    for k in FinetuneConfig.model_fields: yield k, k
    for k in DatasetEntry.model_fields: yield f"datasets[].{k}", k
    for k in TRLSettings.model_fields: yield f"trl.{k}", k
    for k in UserDefinedType.model_fields: yield f"datasets[].type.{k}", k


def test_every_key_is_read_or_declared_ignored():
    read = _key_reads()
    silent = [t for t, k in _schema_keys() if k != "section" and k not in read and t not in IGNORED_KEYS and t not in REJECTED_KEYS]
    assert not silent, f"schema keys that no code reads and no table declares: {silent}"


def test_ignored_keys_exist_in_the_schema():
    known = {t for t, _ in _schema_keys()}
    assert not [t for t in IGNORED_KEYS if t not in known], "IGNORED_KEYS names keys the schema does not have"


# Layers, bottom to top. A module may import modules of its own layer or below, never above; the doors are on top.
LAYERS = [
    {"ftkit.errors", "ftkit.yamlsafe"},
    {"ftkit.schema", "ftkit.guard", "ftkit.plugins", "ftkit.tracking", "ftkit.hub", "ftkit.streaming", "ftkit.progress"},
    {"ftkit.prompts", "ftkit.prompts.registry", "ftkit.prompts.basic", "ftkit.prompts.instruct", "ftkit.prompts.chat_template"},
    {"ftkit.config"},
]
DOORS = {"ftkit.cli", "ftkit.magics", "ftkit.widgets", "ftkit.dashboard", "ftkit.doctor"}


def _module_name(p: pathlib.Path) -> str:
    parts = p.relative_to(ROOT).with_suffix("").parts
    if parts[0] == "kernels": parts = ("ftkit",) + parts
    return ".".join(parts[:-1] if p.name == "__init__.py" else parts)


def _imports() -> dict[str, set[str]]:
    graph = {}
    for p, tree in _sources():
        name = _module_name(p)
        pkg = name.split(".") if p.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for n in ast.walk(tree):
            if isinstance(n, ast.ImportFrom):
                if n.level: deps.add(".".join(pkg[: len(pkg) - n.level + 1] + ([n.module] if n.module else [])))
                elif n.module == "ftkit": deps |= {f"ftkit.{a.name}" for a in n.names}   # `from ftkit import data`
                elif n.module and n.module.startswith("ftkit"): deps.add(n.module)
            elif isinstance(n, ast.Import):
                deps |= {a.name for a in n.names if a.name.startswith("ftkit")}
        graph[name] = {d for d in deps if d not in (name, "ftkit")}
    return graph


def test_no_import_cycles():
    graph, cycles, done = _imports(), [], set()
    def visit(m, stack):
        if m in stack: cycles.append(stack[stack.index(m):] + [m]); return
        if m in done or m not in graph: return
        for d in sorted(graph[m]): visit(d, stack + [m])
        done.add(m)
    for m in sorted(graph): visit(m, [])
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_nothing_below_the_doors_imports_them():
    graph = _imports()
    up = [f"{m} -> {d}" for m, ds in graph.items() for d in ds if d in DOORS and m not in DOORS and m != "ftkit"]
    assert not up, f"modules importing the doors: {up}"


def test_bottom_layers_import_only_downwards():
    graph = _imports()
    level = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    bad = [f"{m} -> {d}" for m, ds in graph.items() if m in level for d in ds if level.get(d, len(LAYERS)) > level[m]]
    assert not bad, f"upward imports: {bad}"
