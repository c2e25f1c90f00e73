#!/usr/bin/env bash
# Prepares what scripts/gpu-check.sh needs on the GPU machine (which has CUDA but no Debian packages and
# no network): a Release build's binaries in .gpu/ and the runtime libraries it lacks as .debs in .deb/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/cuda/bin"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build --target muse muse_gpu_tests
mkdir -p .gpu .deb
# Stripped: the device call carries at most 64 MiB of files.
cp build/src/muse build/tests/muse_gpu_tests .gpu/
strip .gpu/muse .gpu/muse_gpu_tests
# MUSE_TIMELINE=1: also a build that stamps the decode step's timeline (muse bench --mode decode --profile),
# xz-compressed (about 5 MB) to stay within the 64 MiB.
rm -f .gpu/muse-timeline.xz
if [ "${MUSE_TIMELINE:-0}" != 0 ]; then
  cmake -S . -B build-timeline -G Ninja -DCMAKE_BUILD_TYPE=Release -DMUSE_DECODE_TIMELINE=ON -DMUSE_TESTS=OFF >/dev/null
  cmake --build build-timeline --target muse
  strip -o .gpu/muse-timeline build-timeline/src/muse
  xz -T0 .gpu/muse-timeline
fi
# The main job's corpus (the GPU machine has no bible-kjv package).
[ -s .gpu/kjv.txt ] || bible -f Gen1:1-Rev22:21 | sed 's/^[^ ]* //' > .gpu/kjv.txt
(cd .deb && for p in libopenblas0-openmp libgfortran5; do ls ${p}_*.deb >/dev/null 2>&1 || apt-get download "$p"; done)
du -sh .gpu .deb
