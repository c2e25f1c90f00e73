#!/usr/bin/env bash
# The GPU check, run on the H200 machine over a build made on the development machine:
#   here:   scripts/gpu-bundle.sh         # builds, copies the binaries to .gpu/, fetches runtime .debs
#   there:  scripts/gpu-check.sh          (carry .gpu and .deb)
# Runs every GPU test (each CUDA op against its CPU reference) and writes the logs under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/muse-gpu-check}"
mkdir -p "$out"
prefix=/tmp/muse-runtime
for deb in .deb/*.deb; do dpkg -x "$deb" "$prefix"; done
export LD_LIBRARY_PATH="$prefix/usr/lib/x86_64-linux-gnu/openblas-openmp:$prefix/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv > "$out/gpu.txt" 2>&1
.gpu/muse --version | tee "$out/version.txt"
.gpu/muse_gpu_tests --gtest_output="json:$out/gpu_tests.json" > "$out/gpu_tests.log" 2>&1
status=$?
grep -E "^\[  (FAILED|PASSED|SKIPPED) |^\[==========\]|Failure|error" "$out/gpu_tests.log" | head -60
echo "gpu tests exit status: $status"
exit $status
