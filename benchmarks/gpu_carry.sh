#!/usr/bin/env bash
# Build, on this (CPU) machine, what a GPU call carries (the `carry` argument of the device tool): cp312 wheels the
# GPU image lacks in .whl/base, bitsandbytes unpacked with only its CUDA 13 and CPU libraries in .gpu/site (the whole
# wheel is 43 MB of the 64 MiB a call may carry), the shared baseline harness in .gpu/bench (../shared does not
# travel) and the embedded model's tokenizer in .gpu/tok. All three folders are ignored through .git/info/exclude.
# Versions are those of the 2026-12-01 GPU results (benchmarks/results/*/env.txt), so numbers stay comparable;
# datasets 5.0 works with the image's pyarrow (5.2 would need a 50 MB pyarrow). Then, in each call:
#   carry: [".whl/base", ".gpu"]; command: bash benchmarks/gpu_suite.sh PART   (it installs them into /tmp/site)
# Usage: bash benchmarks/gpu_carry.sh            (about 40 MB; needs only the package index)
set -eu
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
PIPD="python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform any"
mkdir -p .whl/base .whl/opt .gpu/site
$PIPD -d .whl/base transformers==5.24.0 peft==0.21.2 trl==1.16.0 "datasets==5.0.*" liger-kernel==0.8.5 \
  cut-cross-entropy==25.1.1 dill==0.4.1 multiprocess==0.70.19 tokenizers==0.23.3 pydantic pydantic-core \
  annotated-types typing-inspection gguf fastcore ipython ipywidgets traitlets decorator jedi parso matplotlib-inline \
  pexpect ptyprocess prompt-toolkit wcwidth stack-data executing asttokens pure-eval ipython-pygments-lexers comm \
  widgetsnbextension jupyterlab-widgets 2>&1 | grep -v "^WARNING: Location" || true
$PIPD -d .whl/opt bitsandbytes==0.50.2 2>&1 | grep -v "^WARNING: Location" || true
(cd .gpu/site && unzip -q -o ../../.whl/opt/bitsandbytes-0.50.2-*.whl \
   && find bitsandbytes -maxdepth 1 -name 'libbitsandbytes_*.so' ! -name '*cpu*' ! -name '*cuda130*' -delete)
rm -rf .gpu/bench && cp -r ../shared/bench .gpu/bench
[ -d .gpu/tok ] || .venv/bin/python scripts/conformance/make_tokenizer.py .gpu/tok >/dev/null
du -sh .whl/base .gpu
