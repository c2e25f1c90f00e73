#!/usr/bin/env bash
# The README's main job on a fresh Debian 12 machine: install what the build needs, build muse, turn the
# King James Bible (Debian's bible-kjv) into byte-level token shards, train the `demo` preset to a time
# budget, print validation bits-per-byte before and after, evaluate, and generate a sample.
#   MUSE_DEMO_BUDGET  training seconds (default 540; the whole job stays under 10 minutes of training)
#   MUSE_DEMO_DIR     where data and the run go (default runs/)
set -euo pipefail
cd "$(dirname "$0")/.."
budget="${MUSE_DEMO_BUDGET:-540}"
dir="${MUSE_DEMO_DIR:-runs}"

scripts/setup-debian.sh
export PATH="$PATH:/usr/local/cuda/bin"
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build --target muse
muse=build/src/muse

mkdir -p "$dir"
# The verse references ("Ge1:1 ") are stripped so the model learns the text, not the index.
bible -f Gen1:1-Rev22:21 | sed 's/^[^ ]* //' > "$dir/kjv.txt"
"$muse" prepare --tokenizer byte --input "$dir/kjv.txt" --out "$dir/kjv"

rm -rf "$dir/demo"
mkdir -p "$dir/demo"
"$muse" train --preset demo --data "$dir/kjv" --out "$dir/demo" --time-budget "$budget" \
  --log-every 50 --eval-every 250 | tee "$dir/demo/train.jsonl"

echo "== full validation split"
"$muse" eval --model "$dir/demo" --data "$dir/kjv"
echo "== sample"
"$muse" generate --model "$dir/demo" --prompt "And God said" --max-tokens 400 --temperature 0.7 --seed 1
