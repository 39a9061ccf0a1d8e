#!/usr/bin/env bash
# Fuzz smoke run: builds the cargo-fuzz targets in fuzz/ (stream_decoder,
# return_path_decoder, preempt_decoder, multifd_decoder; session_logic, the session core driven by a
# script; snapshot_open, an untrusted snapshot directory) and runs each over its committed seed corpus for a
# bounded number of runs. Inputs the fuzzer finds go to a scratch directory, so the
# committed corpus is never modified; a crash fails the script and is kept under
# fuzz/artifacts/<target>/ for `cargo fuzz run <target> <file>`.
# Usage: ./scripts/fuzz-smoke.sh [runs per target] [seconds per target]   (5000, 30)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUNS="${1:-${FUZZ_RUNS:-5000}}"
SECONDS_PER_TARGET="${2:-${FUZZ_SECONDS:-30}}"
TARGETS=(stream_decoder return_path_decoder preempt_decoder multifd_decoder session_logic snapshot_open)

# cargo-fuzz passes nightly-only flags (-Z sanitizer=..., sancov passes); the stable
# toolchain accepts them when RUSTC_BOOTSTRAP is set.
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

cd "$REPO/fuzz"
cargo fuzz build

SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
for t in "${TARGETS[@]}"; do
    if [ -z "$(ls -A "corpus/$t" 2>/dev/null)" ]; then
        echo "fuzz/corpus/$t has no seed inputs" >&2
        exit 1
    fi
    mkdir -p "$SCRATCH/$t"
    echo "==> fuzzing $t: $RUNS runs or ${SECONDS_PER_TARGET}s over fuzz/corpus/$t"
    cargo fuzz run "$t" "$SCRATCH/$t" "corpus/$t" -- \
        -runs="$RUNS" -max_total_time="$SECONDS_PER_TARGET" -max_len=65536 -print_final_stats=1
done
echo "fuzz smoke run: ${#TARGETS[@]} targets, no crash"
