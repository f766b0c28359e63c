#!/usr/bin/env bash
# Regenerates convert.ptx from convert.cl (needs clang 14 or later with the NVPTX target:
# `apt-get install clang-14`). PTX ISA 7.0 (CUDA 11.0 drivers and later) for sm_75: the driver
# JIT-compiles it for any newer GPU. Not sm_70: CUDA 13 drops Volta; not sm_80: that would drop
# Turing (T4, RTX 20xx), which CUDA 13 still supports.
set -euo pipefail
cd "$(dirname "$0")"
clang=${CLANG:-$(command -v clang-14 || command -v clang)}
"$clang" -x cl -cl-std=CL1.2 --target=nvptx64-nvidia-cuda -march=sm_75 -Xclang -target-feature -Xclang +ptx70 \
  -O3 -S -o convert.ptx convert.cl
echo "wrote $(pwd)/convert.ptx"
