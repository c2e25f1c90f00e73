#!/usr/bin/env bash
# Per-kernel GPU times of one muse bench iteration, measured by Nsight Compute (ncu), on the GPU machine:
#   here:   scripts/gpu-bundle.sh
#   there:  scripts/gpu-kernels.sh          (carry .gpu and .deb)
#   here:   python3 scripts/kernel-report.py OUT/kernels/*.csv > kernels.md
# ncu runs each kernel on its own with the clocks locked, so the sum is the GPU work of an iteration without
# launch gaps or overlap (it is not the iteration's wall time). The iteration is the first one, which runs
# outside CUDA graphs, so every kernel is seen.
# Settings (environment): MUSE=.gpu/muse  OUT=/tmp/muse-kernels  NCU=ncu  TIMEOUT=240 (seconds per shape)
#   SHAPES="preset:mode:B:N ..."   default: the issue's training and forward shapes of phase8-small
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
MUSE="${MUSE:-.gpu/muse}"
DIR="${OUT:-/tmp/muse-kernels}/kernels"
NCU="${NCU:-ncu}"
TIMEOUT="${TIMEOUT:-240}"
SHAPES="${SHAPES:-phase8-small:forward:8:256 phase8-small:train:8:256 phase8-small:train:16:1024 phase8-medium:train:4:1024}"
mkdir -p "$DIR"
prefix=/tmp/muse-runtime
for deb in .deb/*.deb; do [ -e "$deb" ] && dpkg -x "$deb" "$prefix"; done
export LD_LIBRARY_PATH="$prefix/usr/lib/x86_64-linux-gnu/openblas-openmp:$prefix/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
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
