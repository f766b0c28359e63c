#!/usr/bin/env bash
# Runs one fuzz target (or all) with its corpus seeded from the test fixtures.
#
#   fuzz/run.sh TARGET SECONDS [EXTRA libFuzzer ARGS]   e.g. fuzz/run.sh header 60
#   fuzz/run.sh all SECONDS                             every target in turn (the CI smoke)
#
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Memory is capped at
# 2 GiB (-rss_limit_mb) and each input at 1 s (-timeout); a crash leaves its input in
# fuzz/artifacts/TARGET/, to become a regression test in tests/.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
target=$1 seconds=$2; shift 2
if [ "$target" = all ]; then
  for t in $(cargo +nightly fuzz list); do "$here/run.sh" "$t" "$seconds" "$@"; done
  exit 0
fi
mkdir -p "corpus/$target"
case $target in
  header|load_bytes) cp -n ../tests/fixtures/*.safetensors "corpus/$target/" ;;
esac
cargo +nightly fuzz run -O "$target" "corpus/$target" -- \
  -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=1 -print_final_stats=1 "$@"
