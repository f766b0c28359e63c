#!/usr/bin/env bash
# Regenerates convert.ptx from convert.cl (needs clang 14 or later with the NVPTX target:
# `apt-get install clang-14`). PTX 6.4 for sm_70: the driver JIT-compiles it for any newer GPU.
set -euo pipefail
cd "$(dirname "$0")"
clang=${CLANG:-$(command -v clang-14 || command -v clang)}
"$clang" -x cl -cl-std=CL1.2 --target=nvptx64-nvidia-cuda -march=sm_70 -Xclang -target-feature -Xclang +ptx64 \
  -O3 -S -o convert.ptx convert.cl
echo "wrote $(pwd)/convert.ptx"
