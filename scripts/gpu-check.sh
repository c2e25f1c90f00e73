#!/usr/bin/env bash
# The GPU check, run on the H200 machine over a build made on the development machine:
#   here:   scripts/gpu-bundle.sh         # builds, copies the binaries and the KJV text to .gpu/, fetches runtime .debs
#   there:  scripts/gpu-check.sh          (carry .gpu and .deb)
# 1. every GPU test (each CUDA op against its CPU reference, the whole model, the GPU trainer);
# 2. the README's main job on the GPU: prepare the KJV, train `demo` for MUSE_GPU_DEMO_BUDGET seconds
#    (default 60), evaluate on the GPU, generate;
# 3. the benchmark grid (scripts/gpu-bench.sh) unless MUSE_GPU_BENCH=0;
# 4. with .gpu/muse-timeline.xz (MUSE_TIMELINE=1 scripts/gpu-bundle.sh): the decode step's timeline of
#    phase8-small, one stream.
# Logs and JSON go under $OUT (default /tmp/muse-gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out="${OUT:-/tmp/muse-gpu-check}"
mkdir -p "$out"
source scripts/gpu-runtime.sh
muse=.gpu/muse
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv > "$out/gpu.txt" 2>&1
$muse --version | tee "$out/version.txt"

if [ "${MUSE_GPU_TESTS:-1}" != 0 ]; then
  echo "== GPU tests"
  .gpu/muse_gpu_tests --gtest_output="json:$out/gpu_tests.json" > "$out/gpu_tests.log" 2>&1 || status=1
  grep -E "^\[  (FAILED|PASSED|SKIPPED) |^\[==========\]|Failure|error" "$out/gpu_tests.log" | head -60
fi

if [ "${MUSE_GPU_DEMO:-1}" != 0 ]; then
  echo "== main job on the GPU"
  demo=/tmp/muse-demo
  rm -rf "$demo" && mkdir -p "$demo"
  {
    $muse prepare --tokenizer byte --input .gpu/kjv.txt --out "$demo/kjv" &&
      $muse train --preset demo --device cuda --data "$demo/kjv" --out "$demo/run" \
        --time-budget "${MUSE_GPU_DEMO_BUDGET:-60}" --log-every 100 --eval-every 500 &&
      $muse eval --device cuda --model "$demo/run" --data "$demo/kjv" &&
      $muse generate --device cuda --model "$demo/run" --prompt "And God said" --max-tokens 200 --temperature 0.7 --seed 1
  } > "$out/demo.log" 2>&1 || status=1
  tail -n 12 "$out/demo.log"
fi

if [ "${MUSE_GPU_BENCH:-1}" != 0 ]; then
  echo "== benchmark grid"
  MUSE="$muse" OUT="$out" scripts/gpu-bench.sh || status=1
fi
if [ -f .gpu/muse-timeline.xz ]; then
  echo "== decode step timeline"
  xz -dc .gpu/muse-timeline.xz > /tmp/muse-timeline && chmod +x /tmp/muse-timeline
  /tmp/muse-timeline bench -p phase8-small --mode decode --context 1000 --warmup 5 --iters 50 --device cuda \
    --profile > "$out/decode-timeline.txt" 2>&1 || status=1
  cat "$out/decode-timeline.txt"
fi
echo "gpu check exit status: $status"
exit $status
