#!/usr/bin/env python
"""Render nbs/index.ipynb to README.md without Quarto.

nbdev-readme needs Quarto, which cannot be installed everywhere (its PyPI package downloads a
binary). This renders the same notebook: markdown cells as they are (nbdev's `#| hide` cells
skipped), code cells as fenced Python followed by their text output, produced by running the
notebook from nbs/ with execnb. `--check` exits 1 when README.md is out of date.
"""
import argparse
import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _text_outputs(cell) -> str:
    out = []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream":
            out.append("".join(o["text"]) if isinstance(o["text"], list) else o["text"])
        elif "text/plain" in o.get("data", {}):
            t = o["data"]["text/plain"]
            out.append("".join(t) if isinstance(t, list) else t)
    return "".join(out).rstrip("\n")


def render(nb_path: pathlib.Path) -> str:
    from fastcore.nbio import read_nb
    from execnb.shell import CaptureShell
    nb = read_nb(nb_path)
    cwd = os.getcwd()
    os.chdir(nb_path.parent)
    try:
        CaptureShell().run_all(nb, exc_stop=True)
    finally:
        os.chdir(cwd)
    parts = []
    for c in nb.cells:
        src = c.source if isinstance(c.source, str) else "".join(c.source)
        if src.lstrip().startswith("#| hide") or not src.strip():
            continue
        if c.cell_type == "markdown":
            parts.append(src.strip())
        elif c.cell_type == "code":
            code = "\n".join(l for l in src.splitlines() if not l.startswith("#|")).strip()
            parts.append(f"```python\n{code}\n```")
            out = _text_outputs(c)
            if out:
                parts.append("```\n" + out + "\n```")
    text = "\n\n".join(parts) + "\n"
    return "<!-- Generated from nbs/index.ipynb by scripts/render_readme.py: edit the notebook, not this file. -->\n\n" + text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    text = render(ROOT / "nbs" / "index.ipynb")
    readme = ROOT / "README.md"
    if a.check:
        if not readme.exists() or readme.read_text() != text:
            print("README.md is out of date: run `make readme`", file=sys.stderr)
            return 1
        return 0
    readme.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
