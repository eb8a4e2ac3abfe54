#!/usr/bin/env bash
# One GPU machine call for ftkit: install the carried wheels, then `pytest -m gpu` (part=tests) or the throughput
# benchmarks next to the shared TRL baseline (part=bench). Results go to $OUT.
#   bash benchmarks/gpu_suite.sh tests|bench
# Expects wheels under .whl/base (trl, datasets, pydantic, gguf, liger...), .whl/bnb (bitsandbytes) and the shared
# baseline harness copied to .gpu/bench (../shared does not travel).
set -u
part=${1:-tests}
OUT=${OUT:-/tmp/ftkit_gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -m pip list 2>/dev/null | grep -iE "^(torch|transformers|peft|trl|datasets|accelerate|bitsandbytes|liger.kernel|triton) "; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if [ "$part" = tests ]; then
  python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu.py tests/test_gpu_rl.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
elif [ "$part" = bench ]; then
  SKIP_PIP=1 STACKS="${STACKS:-B0 B1}" T_OTHER=150 bash .gpu/bench/run_baseline.sh 2>&1 | tail -12
  timeout 240 python3 benchmarks/bench_train.py --out "$OUT/F.json" --compare "$OUT" 2>&1 | tee "$OUT/F.log" | tail -15
fi
ls -la "$OUT"
