#!/usr/bin/env bash
# Pack the GPU-only packages (.gpu-wheels/{base,tile}, fetched by ../shared/tools/gpu-wheels.sh) into one
# xz archive of an installed site-packages, .gpu-wheels/site.tar.xz (~42 MB: the wheels themselves are
# 86 MB, over one 64 MiB device carry). scripts/gpu_env.sh unpacks it on the GPU machine.
# Needs a Python 3.12 here (the wheels are cp312): .venv from scripts/setup.sh.
set -euo pipefail
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
.venv/bin/python -m pip install -q --no-index --no-deps --no-compile --target "$tmp/site" \
  .gpu-wheels/base/*.whl .gpu-wheels/tile/*.whl
rm -rf "$tmp/site/bin"  # console scripts (a 22 MB z3 executable); the libraries are what is imported
tar -C "$tmp" -cf - site | xz -T0 -9 > .gpu-wheels/site.tar.xz.tmp
mv .gpu-wheels/site.tar.xz.tmp .gpu-wheels/site.tar.xz
ls -la .gpu-wheels/site.tar.xz
