#!/usr/bin/env bash
# Installs what the build needs, builds muse (CPU + CUDA when nvcc is present) and runs the test suite.
# GPU tests skip cleanly on machines without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-debian.sh
export PATH="$PATH:/usr/local/cuda/bin"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release
cmake --build build
# ctest runs one test process per core; one OpenMP thread each keeps the cores from being oversubscribed
# (spinning OpenMP barriers slow down many-fold then). Tests of thread-count independence set their own.
OMP_NUM_THREADS=1 ctest --test-dir build -j "$(nproc)" --output-on-failure
