#!/usr/bin/env bash
# Per-kernel GPU times of one muse bench iteration, measured by Nsight Compute (ncu), on the GPU machine:
#   here:   scripts/gpu-bundle.sh
#   there:  scripts/gpu-kernels.sh          (carry .gpu and .deb)
#   here:   python3 scripts/kernel-report.py OUT/kernels/*.csv > kernels.md
# ncu runs each kernel on its own with the clocks locked, so the sum is the GPU work of an iteration without
# launch gaps or overlap (it is not the iteration's wall time). The iteration is the first one, which runs
# outside CUDA graphs, so every kernel is seen.
#
# With KERNEL=regex it reports instead where one launch of the matching kernel waits, instruction by
# instruction and phase by phase (ncu's warp-state sampling, summarised by scripts/stall-report.py into
# OUT/stalls/). ncu replays the kernel alone, so the cold-code effects of the overlapped decode chain do not
# show (a kernel's first run of its code on an SM is about twice as slow as a warm run: BENCHMARKS.md, tenth
# session); the stall reasons and which phase waits do.
# Settings (environment): MUSE=.gpu/muse  OUT=/tmp/muse-kernels  NCU=ncu  TIMEOUT=240 (seconds per shape)
#   SHAPES="preset:mode:B:N ..."   default: the issue's training and forward shapes of phase8-small
#   KERNEL  SKIP=3 (its launches skipped)  BENCH="bench ..." (default: one phase8-small decode stream)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
MUSE="${MUSE:-.gpu/muse}"
NCU="${NCU:-ncu}"
source scripts/gpu-runtime.sh

# stalls: the KERNEL report.
stalls() {
  local dir="${OUT:-/tmp/muse-kernels}/stalls" name
  local bench="${BENCH:-bench -p phase8-small --mode decode -b 1 --context 1000 --warmup 0 --iters 1 --device cuda}"
  name=$(echo "$KERNEL" | tr -c 'A-Za-z0-9_\n' '_')
  mkdir -p "$dir"
  # shellcheck disable=SC2086  # bench is a list of arguments
  timeout "${TIMEOUT:-240}" "$NCU" -k "regex:$KERNEL" -s "${SKIP:-3}" -c 1 --section WarpStateStats \
    --section SourceCounters --warp-sampling-interval 0 --cache-control none --clock-control none \
    --import-source no -f -o "$dir/$name" "$MUSE" $bench > "$dir/$name.log" 2>&1 ||
    { echo "ncu failed (see $dir/$name.log)" >&2; return 1; }
  "$NCU" -i "$dir/$name.ncu-rep" --page source --csv --print-source sass > "$dir/$name-sass.csv" 2> "$dir/$name.err" ||
    { echo "ncu --page source failed (see $dir/$name.err)" >&2; return 1; }
  python3 scripts/stall-report.py "$dir/$name-sass.csv" | tee "$dir/$name-stalls.txt"
}

if [ -n "${KERNEL:-}" ]; then
  stalls
  exit $?
fi
DIR="${OUT:-/tmp/muse-kernels}/kernels"
TIMEOUT="${TIMEOUT:-240}"
SHAPES="${SHAPES:-phase8-small:forward:8:256 phase8-small:train:8:256 phase8-small:train:16:1024 phase8-medium:train:4:1024}"
mkdir -p "$DIR"
status=0
for shape in $SHAPES; do
  IFS=: read -r preset mode batch seq <<< "$shape"
  name="$preset-$mode-$batch-$seq"
  echo "== $name"
  timeout "$TIMEOUT" "$NCU" --metrics gpu__time_duration.sum --csv \
    "$MUSE" bench -p "$preset" --mode "$mode" -b "$batch" -n "$seq" --device cuda --warmup 0 --iters 1 \
    > "$DIR/$name.csv" 2> "$DIR/$name.err" || { echo "   failed (see $DIR/$name.err)"; status=1; }
done
exit $status
