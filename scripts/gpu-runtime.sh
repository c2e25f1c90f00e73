# shellcheck shell=bash
# Sourced (from the repository root) by the scripts that run muse on the GPU machine, which has no Debian
# dev packages: unpacks the runtime libraries the muse binary lacks, carried as .deb files in .deb/
# (scripts/gpu-bundle.sh and gpu-ab.sh fetch them), into /tmp/muse-runtime and puts them on LD_LIBRARY_PATH.
# Without .deb files (a machine that has the libraries) it changes nothing.
if compgen -G ".deb/*.deb" > /dev/null; then
  for deb in .deb/*.deb; do dpkg -x "$deb" /tmp/muse-runtime; done
  export LD_LIBRARY_PATH="/tmp/muse-runtime/usr/lib/x86_64-linux-gnu/openblas-openmp:/tmp/muse-runtime/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
fi
