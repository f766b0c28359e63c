#!/usr/bin/env bash
# Every test suite of the project, Rust and Python, in one command (README's test command).
#
#   bash tests/all.sh
#
# 1. The Rust suites: `cargo test -- --show-output` over the workspace's default members (the
#    library with every feature, GPU tests printing why they skip, and the command-line crate,
#    whose binary the library's CLI tests run), then the CPU-only library's.
# 2. The Python package: a virtual environment in target/py (created and filled from PyPI on
#    first use: maturin, pytest, numpy, ml_dtypes, safetensors, jax[cpu], torch, huggingface_hub, moto[server]), the package
#    built and installed from python/, then pytest on python/tests (torch's tests required:
#    a torch that does not import fails them).
set -euo pipefail
cd "$(dirname "$0")/.."
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}

cargo test -- --show-output
cargo test -p tensorplace --no-default-features -- --show-output

py=target/py/bin/python
if [ ! -x "$py" ]; then
  python3 -m venv target/py
fi
"$py" -m pip install -q --disable-pip-version-check maturin pytest numpy ml_dtypes safetensors "jax[cpu]" torch "huggingface_hub>=1" "moto[server]"
"$py" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps ./python
# From outside the source tree, so that the installed package (with its native module) is
# the one imported.
(cd target && TENSORPLACE_TEST_TORCH=required "../$py" -m pytest -p no:cacheprovider --import-mode=importlib -rs ../python/tests)
