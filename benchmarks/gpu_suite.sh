#!/usr/bin/env bash
# One GPU machine call for ftkit: install the carried wheels, then `pytest -m gpu` (part=tests), the throughput
# benchmarks next to the shared TRL baseline (part=bench), the kernel GPU tests + per-kernel benchmark + one ftkit run
# (part=kernels), or end to end beside B0/B1 at 4k and 16k plus QLoRA and kernels-off (part=e2e). Results go to $OUT
# (kernels / e2e pack everything into one .tgz, since only 8 files come back).
#   bash benchmarks/gpu_suite.sh tests|bench|kernels|e2e|features|rest|graphs|decoder|last
# Expects wheels under .whl/base (trl, datasets, pydantic, gguf, liger...), bitsandbytes as .whl/bnb wheels or unpacked
# in .gpu/site (only its CUDA 13 libraries, to stay under the 64 MiB tree limit), and the shared baseline harness
# copied to .gpu/bench (../shared does not travel).
set -u
part=${1:-tests}
OUT=${OUT:-/tmp/ftkit_gpu_out}; mkdir -p "$OUT"; FINAL_OUT=$OUT
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
rm -rf /tmp/site      # a warm machine keeps /tmp: never mix in an earlier call's packages
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*/*.whl || exit 1
[ -d .gpu/site ] && cp -r .gpu/site/* /tmp/site/
[ -e ftkit/kernels ] || ln -s ../kernels ftkit/kernels      # what the installed package's package-dir mapping does
export PYTHONPATH=/tmp/site:$PWD
[ -d .gpu/tok ] && export FTKIT_TEST_TOKENIZER=$PWD/.gpu/tok    # the embedded tokenizer (its GGUF package is too big to carry)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -m pip list 2>/dev/null | grep -iE "^(torch|transformers|peft|trl|datasets|accelerate|bitsandbytes|liger.kernel|triton) "; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if [ "$part" = tests ]; then
  python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu.py tests/test_gpu_rl.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40
elif [ "$part" = bench ]; then
  SKIP_PIP=1 STACKS="${STACKS:-B0 B1}" T_OTHER=150 bash .gpu/bench/run_baseline.sh 2>&1 | tail -12
  timeout 240 python3 benchmarks/bench_train.py --out "$OUT/F.json" --compare "$OUT" 2>&1 | tee "$OUT/F.log" | tail -15
elif [ "$part" = kernels ]; then
  R=/tmp/kres; mkdir -p $R
  timeout 200 python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu_kernels.py -s ${KTESTS:-} 2>&1 | tee $R/pytest_gpu_kernels.log | tail -25
  KB=${KBUDGET:-200}      # the bench stops starting rows after its budget; 60 s more for the last row and the write
  timeout $(( ${KB%%.*} + 60 )) python3 benchmarks/bench_kernels.py --out $R --budget $KB ${KOPS:+--ops $KOPS} ${KFLAGS:-} 2>&1 | tee $R/bench_kernels.log | tail -4
  timeout 120 python3 benchmarks/bench_train.py --out $R/F.json 2>&1 | tee $R/F.log | grep -E "kernels:|skipped|RESULT|Error" | tail -12
  cp $R/*.md $R/*.json "$OUT"/ 2>/dev/null; cp "$OUT/env.txt" $R/; tar czf "$OUT/kernels_run.tgz" -C $R .
elif [ "$part" = e2e ]; then
  R=/tmp/e2e; mkdir -p $R/s16
  OUT=$R SKIP_PIP=1 STACKS="B0 B1" T_OTHER=150 bash .gpu/bench/run_baseline.sh 2>&1 | tail -6
  timeout 150 python3 benchmarks/bench_train.py --out $R/F.json --compare $R --profile $R/F_profile.txt 2>&1 | tee $R/F.log | grep -E "kernels:|skipped|RESULT|F vs" | tail -12
  OUT=$R/s16 SKIP_PIP=1 STACKS="B1" T_OTHER=170 EXTRA="--seq 16384 --steps 12 --warmup 3 --timed 8" bash .gpu/bench/run_baseline.sh 2>&1 | tail -3
  timeout 150 python3 benchmarks/bench_train.py --stack F-16k --seq 16384 --steps 12 --warmup 3 --timed 8 --out $R/s16/F.json --compare $R/s16 2>&1 | tee $R/s16/F.log | grep -E "RESULT|vs" | tail -4
  timeout 120 python3 benchmarks/bench_train.py --stack FQ --mode qlora --out $R/FQ.json --compare $R 2>&1 | tee $R/FQ.log | grep -E "kernels:|skipped|RESULT|vs" | tail -8
  [ -n "${WITH_OFF:-}" ] && timeout 120 python3 benchmarks/bench_train.py --stack F-off --kernels off --out $R/Foff.json --compare $R 2>&1 | tee $R/Foff.log | grep -E "RESULT|vs" | tail -3
  cp $R/*.json "$OUT"/ 2>/dev/null; tar czf "$OUT/e2e_run.tgz" -C $R .
elif [ "$part" = features ]; then
  # every feature's GPU test in one short call on 2 GPUs: single-GPU tests side by side (one per GPU), then the
  # tests that need both GPUs. Logs (and the multi-GPU memory records) are packed into features_run.tgz.
  R=/tmp/feat; mkdir -p $R; export OUT=$R
  PT="python3 -m pytest -m gpu -v -rs --tb=short --timeout=${T_TEST:-100} -p no:cacheprovider"   # a per-test limit: pytest still prints its failures
  ( CUDA_VISIBLE_DEVICES=0 timeout ${T_A:-130} $PT tests/test_quant.py tests/test_vision.py tests/test_options.py tests/test_variants.py tests/test_gpu_rl.py > $R/gpu0.log 2>&1 ) &
  ( CUDA_VISIBLE_DEVICES=1 timeout ${T_A:-130} $PT tests/test_guarantees_gpu_oom.py tests/test_gpu.py ${GPU1_MORE:-} > $R/gpu1.log 2>&1 ) &
  wait
  timeout ${T_B:-120} $PT -s tests/test_gpu_multi.py -k "fsdp2 or two_gpus or gpu_varlen" tests/test_sweeps.py tests/test_context_parallel.py > $R/multi.log 2>&1
  timeout 30 python3 benchmarks/multi_gpu.py --out $R/mg --runs allreduce --gpus 2 --previous benchmarks/results/multi_gpu_H200x2.json > $R/allreduce.log 2>&1
  for f in $R/*.log; do echo "== $f"; grep -E "passed|failed|PASSED|SKIPPED|FAILED|ERROR" $f | tail -24; done
  cp "$OUT/env.txt" $R/ 2>/dev/null; tar czf /tmp/features_run.tgz -C $R .; mkdir -p "$FINAL_OUT"; cp /tmp/features_run.tgz "$FINAL_OUT"/
elif [ "$part" = rest ]; then
  # what the features call left: data preparation on this host's cores (tokenizer carried in .gpu/tok), the 2-GPU sweep
  # and context-parallel tests, FSDP2 + QLoRA, then ZeRO-3 (its CPU-offload half may build DeepSpeed's CPU Adam first).
  R=/tmp/rest; mkdir -p $R; export OUT=$R
  PT="python3 -m pytest -m gpu -v -rs --tb=short -p no:cacheprovider"
  ( env -u TOKENIZERS_PARALLELISM timeout 100 python3 benchmarks/bench_preprocess.py --procs 1 2 4 --tokenizer .gpu/tok --out $R/preprocess_default.json
    timeout 80 python3 benchmarks/bench_preprocess.py --procs 1 2 4 --tokenizer .gpu/tok --tokenizers-parallelism false --out $R/preprocess_tpfalse.json ) > $R/preprocess.log 2>&1
  timeout ${T_B:-230} $PT --timeout 150 -s tests/test_sweeps.py tests/test_context_parallel.py tests/test_gpu_multi.py::test_fsdp2_qlora_two_gpus > $R/multi2.log 2>&1
  timeout ${T_Z:-200} $PT --timeout 190 -s tests/test_gpu_multi.py::test_zero3_lora_and_full_offload_two_gpus > $R/zero3.log 2>&1
  for f in $R/*.log; do echo "== $f"; grep -E "passed|failed|PASSED|SKIPPED|FAILED|ERROR|num_proc|Error" $f | tail -24; done
  cp "$OUT/env.txt" $R/ 2>/dev/null; tar czf /tmp/rest_run.tgz -C $R .; mkdir -p "$FINAL_OUT"; cp /tmp/rest_run.tgz "$FINAL_OUT"/
elif [ "$part" = graphs ]; then
  # cuda_graphs (issue 10): its GPU test, then ftkit at 4k with and without graphs beside B1, one call
  R=/tmp/graphs; mkdir -p $R
  timeout 150 python3 -m pytest -m gpu -q -rs -p no:cacheprovider -s tests/test_gpu_graphs.py 2>&1 | tee $R/pytest_graphs.log | tail -6
  OUT=$R SKIP_PIP=1 STACKS="B1" T_OTHER=150 bash .gpu/bench/run_baseline.sh 2>&1 | tail -3
  # the default (packed rows padded to sequence_len, cuda_graphs on where the config allows), then without graphs / padding
  timeout 150 python3 benchmarks/bench_train.py --stack F-nopad --no-pad --out $R/F.json --compare $R 2>&1 | tee $R/F.log | grep -E "kernels:|RESULT|vs" | tail -5
  timeout 150 python3 benchmarks/bench_train.py --stack F-pad --no-graphs --out $R/Fpad.json --compare $R 2>&1 | tee $R/Fpad.log | grep -E "RESULT|vs" | tail -3
  timeout 170 python3 benchmarks/bench_train.py --stack F-graphs --out $R/Fg.json --compare $R --profile $R/Fg_profile.txt 2>&1 | tee $R/Fg.log | grep -E "kernels:|cuda_graphs|RESULT|vs|Warn" | tail -8
  if [ -n "${WITH_Q:-}" ]; then      # QLoRA (NF4 + double quant) at 4k, without and with graphs
    timeout 150 python3 benchmarks/bench_train.py --stack FQ --mode qlora --no-graphs --out $R/FQ.json --compare $R 2>&1 | tee $R/FQ.log | grep -E "kernels:|RESULT|vs" | tail -4
    timeout 150 python3 benchmarks/bench_train.py --stack FQ-graphs --mode qlora --out $R/FQg.json --compare $R 2>&1 | tee $R/FQg.log | grep -E "cuda_graphs|RESULT|vs|Warn" | tail -4
  fi
  cp $R/*.json "$OUT"/ 2>/dev/null; tar czf "$OUT/graphs_run.tgz" -C $R .
elif [ "$part" = decoder ]; then
  # cuda_graphs with the whole decoder as one graph (attention inside, gradients accumulated in the graph): its GPU test,
  # then 4k beside B1 (without graphs, with graphs + a profile, QLoRA with graphs), then 16k beside B1
  R=/tmp/decoder; mkdir -p $R/s16
  timeout 100 python3 -m pytest -m gpu -q -rs -p no:cacheprovider -s tests/test_gpu_graphs.py 2>&1 | tee $R/pytest_graphs.log | grep -E "passed|failed|loss curve|Error|assert" | tail -6
  OUT=$R SKIP_PIP=1 STACKS="B1" T_OTHER=120 bash .gpu/bench/run_baseline.sh 2>&1 | tail -1
  [ -z "${SKIP_NOGRAPHS:-}" ] && timeout 80 python3 benchmarks/bench_train.py --stack F-pad --no-graphs --out $R/Fpad.json --compare $R 2>&1 | tee $R/Fpad.log | grep -E "vs" | tail -2
  timeout 90 python3 benchmarks/bench_train.py --stack F-graphs --out $R/Fg.json --compare $R --profile $R/Fg_profile.txt --trace $R/Fg_trace.json.gz 2>&1 | tee $R/Fg.log | grep -E "cuda_graphs|vs|Warn|Error" | tail -5
  timeout 80 python3 benchmarks/bench_train.py --stack FQ-graphs --mode qlora --out $R/FQg.json --compare $R 2>&1 | tee $R/FQg.log | grep -E "cuda_graphs|vs|Warn|Error" | tail -3
  tar czf "$OUT/decoder_run.tgz" -C $R .
  if [ -n "${WITH_16K:-}" ]; then
    OUT=$R/s16 SKIP_PIP=1 STACKS="B1" T_OTHER=150 EXTRA="--seq 16384 --steps 12 --warmup 3 --timed 8" bash .gpu/bench/run_baseline.sh 2>&1 | tail -1
    timeout 100 python3 benchmarks/bench_train.py --stack F-16k-graphs --seq 16384 --steps 12 --warmup 3 --timed 8 --out $R/s16/F.json --compare $R/s16 2>&1 | tee $R/s16/F.log | grep -E "cuda_graphs|vs|Warn|Error" | tail -3
    tar czf "$OUT/decoder_run.tgz" -C $R .
  fi
elif [ "$part" = nosync ]; then
  # no host sync at step boundaries (logs one step late, the gradient check deferred): its GPU tests and the graphs test,
  # then 4k beside B1: defaults, transformers' logging read (--log-sync), and QLoRA; ATTN=flash|triton picks the graph's attention
  R=/tmp/nosync; mkdir -p $R
  timeout ${T_TESTS:-150} python3 -m pytest -m gpu -q -rs -p no:cacheprovider -s tests/test_gpu_nosync.py tests/test_gpu_graphs.py ${MORE_TESTS:-} 2>&1 | tee $R/pytest.log | grep -E "passed|failed|loss curve|sync-debug|Error|assert|  " | tail -30
  [ -n "${NO_4K_BASE:-}" ] || OUT=$R SKIP_PIP=1 STACKS="${BSTACKS:-B1}" T_OTHER=120 bash .gpu/bench/run_baseline.sh 2>&1 | tail -2
  for run in ${RUNS:-F FL FQ}; do
    case $run in
      F)  args="--stack F --profile $R/F_profile.txt --trace $R/F_trace.json.gz";;
      FL) args="--stack F-logsync --log-sync";;
      FS) args="--stack F-syncstep --sync-every-step";;
      FQ) args="--stack FQ --mode qlora";;
      FF) args="--stack F-flash --graph-attention flash";;
      F16) args="--stack F-16k --seq 16384 --steps 12 --warmup 3 --timed 8";;
      FU) args="--stack F-full --mode full";;                       # full fine-tuning (no baseline stack has one)
      FU16) args="--stack F-full-16k --mode full --seq 16384 --steps 12 --warmup 3 --timed 8";;
      FO) args="--stack F-off --kernels off";;
      *)  args="--stack $run ${EXTRA_ARGS:-}";;
    esac
    timeout 90 python3 benchmarks/bench_train.py $args --out $R/$run.json --compare $R 2>&1 | tee $R/$run.log | grep -E "cuda_graphs|vs|Warn|Error" | tail -3
  done
  if [ -n "${WITH_16K:-}" ]; then       # 16k rows beside B1 at 16k
    mkdir -p $R/s16
    OUT=$R/s16 SKIP_PIP=1 STACKS="B1" T_OTHER=150 EXTRA="--seq 16384 --steps 12 --warmup 3 --timed 8" bash .gpu/bench/run_baseline.sh 2>&1 | tail -1
    timeout 100 python3 benchmarks/bench_train.py --stack F-16k --seq 16384 --steps 12 --warmup 3 --timed 8 --out $R/s16/F.json --compare $R/s16 2>&1 | tee $R/s16/F.log | grep -E "cuda_graphs|vs|Warn|Error" | tail -3
  fi
  tar czf "$OUT/nosync_run.tgz" -C $R .
elif [ "$part" = last ]; then
  # one 2-GPU call for what is left: the context-parallel tests and longest rows (issue 16), the QLoRA memory of
  # ftkit.fit's validation on the second GPU meanwhile (issue 18/10), then data preparation on this host's cores (issue 15)
  R=/tmp/last; mkdir -p $R; export OUT=$R
  timeout ${T_CPT:-150} python3 -m pytest -m gpu -v -rs --tb=short -p no:cacheprovider -s tests/test_context_parallel.py > $R/cp_tests.log 2>&1; grep -E "PASSED|FAILED|SKIPPED|passed|failed" $R/cp_tests.log | tail -4
  C="$R/context_parallel_H200.json"; [ -n "${CP_PREV:-}" ] && cp "$CP_PREV" "$C"
  ( CUDA_VISIBLE_DEVICES=1 timeout ${T_FIT:-240} python3 benchmarks/fit_measure.py --out $R/fit_qlora.json --only qlora_4k,qlora_16k,qlora_4k_nok > $R/fit.log 2>&1 ) &
  CUDA_VISIBLE_DEVICES=0 timeout ${T_CP:-250} python3 benchmarks/context_parallel.py search --gpus 1 --predict --start 65536 --steps 1 \
    --doc-median 4096 --rel 0.05 --timeout 200 --out "$C" 2>&1 | grep -E "gpus|Error" | tail -8
  wait; tail -3 $R/fit.log
  timeout ${T_CP:-250} python3 benchmarks/context_parallel.py search --gpus 2 --predict --start 65536 --steps 1 \
    --doc-median 4096 --rel 0.05 --timeout 200 --out "$C" 2>&1 | grep -E "gpus|Error" | tail -8
  ( env -u TOKENIZERS_PARALLELISM timeout 100 python3 benchmarks/bench_preprocess.py --procs 1 2 4 --tokenizer .gpu/tok --out $R/preprocess_default.json
    timeout 80 python3 benchmarks/bench_preprocess.py --procs 1 2 4 --tokenizer .gpu/tok --tokenizers-parallelism false --out $R/preprocess_tpfalse.json ) > $R/preprocess.log 2>&1
  grep -E "num_proc|procs|Error" $R/preprocess.log | tail -8
  cp "$FINAL_OUT/env.txt" $R/ 2>/dev/null; tar czf /tmp/last_run.tgz -C $R .; cp /tmp/last_run.tgz "$C" "$FINAL_OUT"/
fi
ls -la "$FINAL_OUT"
