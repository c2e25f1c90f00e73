#!/usr/bin/env bash
# Where a kernel's warps wait, instruction by instruction: Nsight Compute's warp-state sampling of one launch
# of the kernels whose name matches KERNEL, in a `muse bench` run, summarised by scripts/stall-report.py
# (its regions are the phases between the kernel's barriers). On the GPU machine:
#   here:   scripts/gpu-bundle.sh
#   there:  KERNEL=block_input scripts/gpu-stalls.sh          (carry .gpu and .deb)
# ncu runs the kernel alone and replays it, so cold-code effects of the overlapped chain do not show (a
# decode kernel's first run of its code on an SM is about twice as slow as a warm run: BENCHMARKS.md, tenth
# session); the stall reasons and where a phase waits do.
# Settings (environment): MUSE=.gpu/muse  OUT=/tmp/muse-stalls  NCU=ncu  KERNEL (a regex; required)
#   SKIP=3 (launches of it skipped: the first iteration runs outside CUDA graphs, so every launch is seen)
#   BENCH="bench -p phase8-small --mode decode -b 1 --context 1000 --warmup 0 --iters 1 --device cuda"
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
[ -n "${KERNEL:-}" ] || { echo "gpu-stalls.sh: set KERNEL to a regex of the kernel's name (e.g. KERNEL=mixer)" >&2; exit 2; }
MUSE="${MUSE:-.gpu/muse}"
DIR="${OUT:-/tmp/muse-stalls}"
NCU="${NCU:-ncu}"
BENCH="${BENCH:-bench -p phase8-small --mode decode -b 1 --context 1000 --warmup 0 --iters 1 --device cuda}"
mkdir -p "$DIR"
prefix=/tmp/muse-runtime
for deb in .deb/*.deb; do [ -e "$deb" ] && dpkg -x "$deb" "$prefix"; done
export LD_LIBRARY_PATH="$prefix/usr/lib/x86_64-linux-gnu/openblas-openmp:$prefix/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
name=$(echo "$KERNEL" | tr -c 'A-Za-z0-9_\n' '_')
# shellcheck disable=SC2086  # BENCH is a list of arguments
"$NCU" -k "regex:$KERNEL" -s "${SKIP:-3}" -c 1 --section WarpStateStats --section SourceCounters \
  --warp-sampling-interval 0 --cache-control none --clock-control none --import-source no -f -o "$DIR/$name" \
  "$MUSE" $BENCH > "$DIR/$name.log" 2>&1 || { echo "ncu failed (see $DIR/$name.log)" >&2; exit 1; }
"$NCU" -i "$DIR/$name.ncu-rep" --page source --csv --print-source sass > "$DIR/$name-sass.csv" 2> "$DIR/$name.err" ||
  { echo "ncu --page source failed (see $DIR/$name.err)" >&2; exit 1; }
python3 scripts/stall-report.py "$DIR/$name-sass.csv" | tee "$DIR/$name-stalls.txt"
