#!/usr/bin/env bash
# A/B of decode (or training) throughput: several builds of muse timed side by side on the GPU machine,
# alternating, in one device call (one call's GPU clocks and neighbours for all of them; separate calls
# differ by a few per cent).
#   here:   scripts/gpu-ab.sh bundle REV...   # a Release `muse` per git revision (the working tree must be
#                                             # clean; the current branch is restored) into .ab/ab.tar.xz,
#                                             # with the GPU tests of the last revision (TESTS=0: without)
#                                             # and, with TIMELINE=1, a -DMUSE_DECODE_TIMELINE=ON build per
#                                             # revision too
#   there:  scripts/gpu-ab.sh run             (carry .ab/ab.tar.xz, .deb and this script)
# `run` runs the GPU tests when bundled (the log in $OUT/gpu_tests.log), then times `muse bench --mode MODE
# --device cuda` for every build, ROUNDS times over, at each of BATCHES (phase8-small) and once at
# MEDIUM_BATCHES (phase8-medium), and prints tokens/s per build; then, for each timeline build, the decode
# step's timeline at one phase8-small stream (--profile) into $OUT/timeline-REV.txt, its head rows printed.
# Everything `run` prints is also kept in $OUT/ab.txt (a device call returns only its output's tail).
# Settings (environment): MODE=decode|train ROUNDS=2 ARGS="" (more `muse bench` arguments, e.g. --gpu-math tf32)
#   decode: BATCHES="1 8 64" MEDIUM_BATCHES="1" CONTEXT=1000 ITERS=50 WARMUP=5
#   train:  BATCHES="64" MEDIUM_BATCHES="64" SEQ=1024 ITERS=3 WARMUP=1
set -euo pipefail
cd "$(dirname "$0")/.."

bundle() {
  [ $# -ge 1 ] || { echo "gpu-ab.sh bundle: name one or more git revisions" >&2; exit 2; }
  if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    echo "gpu-ab.sh bundle: the working tree has uncommitted changes; commit or stash them first" >&2
    exit 2
  fi
  local revs=() rev short
  back=$(git symbolic-ref --short -q HEAD || git rev-parse HEAD)  # global: the EXIT trap restores it
  for rev in "$@"; do
    short=$(git rev-parse --short "$rev^{commit}") || { echo "gpu-ab.sh bundle: unknown revision '$rev'" >&2; exit 2; }
    revs+=("$short")
  done
  export PATH="$PATH:/usr/local/cuda/bin"
  rm -rf .ab && mkdir -p .ab
  trap 'git checkout -q "$back"' EXIT
  for short in "${revs[@]}"; do
    git checkout -q "$short"
    cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
    cmake --build build --target muse
    strip -o ".ab/muse-$short" build/src/muse
    if [ "${TIMELINE:-0}" != 0 ]; then
      cmake -S . -B build-timeline -G Ninja -DCMAKE_BUILD_TYPE=Release -DMUSE_DECODE_TIMELINE=ON -DMUSE_TESTS=OFF \
        >/dev/null
      cmake --build build-timeline --target muse
      strip -o ".ab/timeline-$short" build-timeline/src/muse
    fi
  done
  if [ "${TESTS:-1}" != 0 ]; then
    cmake --build build --target muse_gpu_tests
    strip -o .ab/muse_gpu_tests build/tests/muse_gpu_tests
  fi
  (
    cd .ab
    local files=(muse-*) f
    for f in timeline-* muse_gpu_tests; do [ -f "$f" ] && files+=("$f"); done
    tar cJf ab.tar.xz "${files[@]}"
  )
  mkdir -p .deb
  (cd .deb && for p in libopenblas0-openmp libgfortran5; do ls ${p}_*.deb >/dev/null 2>&1 || apt-get download "$p"; done)
  du -sh .ab/ab.tar.xz
}

run() {
  source scripts/gpu-runtime.sh
  (cd .ab && tar xJf ab.tar.xz)
  if [ -f .ab/muse_gpu_tests ]; then
    mkdir -p "${OUT:-/tmp}"
    .ab/muse_gpu_tests > "${OUT:-/tmp}/gpu_tests.log" 2>&1 || true
    grep -E "^\[  (FAILED|PASSED) |^\[==========\] .* ran" "${OUT:-/tmp}/gpu_tests.log" | tail -8
  fi
  local builds=(.ab/muse-*)
  # tokens_per_s BUILD PRESET BATCH: one `muse bench` record's tokens/s in MODE (decode or train).
  tokens_per_s() {
    local shape
    if [ "${MODE:-decode}" = train ]; then
      shape=(--mode train -b "$3" -n "${SEQ:-1024}" --warmup "${WARMUP:-1}" --iters "${ITERS:-3}")
    else
      shape=(--mode decode -b "$3" --context "${CONTEXT:-1000}" --warmup "${WARMUP:-5}" --iters "${ITERS:-50}")
    fi
    # shellcheck disable=SC2086  # ARGS is a list of arguments
    "$1" bench -p "$2" "${shape[@]}" --device cuda --json ${ARGS:-} 2>/dev/null | grep -oE '"tokens_per_s":[0-9]+' |
      cut -d: -f2 || echo failed
  }
  local small medium
  if [ "${MODE:-decode}" = train ]; then small=${BATCHES:-64} medium=${MEDIUM_BATCHES:-64}
  else small=${BATCHES:-1 8 64} medium=${MEDIUM_BATCHES:-1}; fi
  local round b build line
  for round in $(seq "${ROUNDS:-2}"); do
    for build in "${builds[@]}"; do
      line="${build#.ab/muse-} round $round  phase8-small"
      for b in $small; do line+="  B=$b $(tokens_per_s "$build" phase8-small "$b")"; done
      echo "$line"
    done
  done
  for build in "${builds[@]}"; do
    line="${build#.ab/muse-}  phase8-medium"
    for b in $medium; do line+="  B=$b $(tokens_per_s "$build" phase8-medium "$b")"; done
    echo "$line"
  done
  local timeline rev
  for timeline in .ab/timeline-*; do
    [ -f "$timeline" ] || continue
    rev=${timeline#.ab/timeline-}
    "$timeline" bench -p phase8-small --mode decode -b 1 --context "${CONTEXT:-1000}" --warmup "${WARMUP:-5}" \
      --iters "${ITERS:-50}" --device cuda --profile > "${OUT:-/tmp}/timeline-$rev.txt" 2>&1 || true
    echo "timeline $rev:"
    grep -E "tokens/s|ffn down: done|head" "${OUT:-/tmp}/timeline-$rev.txt" || true
  done
}

case "${1:-}" in
  bundle) shift; bundle "$@" ;;
  run) mkdir -p "${OUT:-/tmp}"; run 2>&1 | tee "${OUT:-/tmp}/ab.txt" ;;
  *) echo "usage: scripts/gpu-ab.sh bundle REV... | scripts/gpu-ab.sh run" >&2; exit 2 ;;
esac
