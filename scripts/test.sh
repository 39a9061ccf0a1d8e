#!/usr/bin/env bash
# The project's one test command: installs what the tests need (QEMU 10.0 and 7.2, the
# guest kernel, the guest initramfs, libvirt, cargo-fuzz, docker.io), then runs every check
# and test.
# Usage: ./scripts/test.sh        (CI runs exactly this through .ci/run)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export CARGO_TERM_COLOR=never

step() { printf '\n==> %s\n' "$*"; }

step "setting up the host (QEMU, guest kernel, guest initramfs)"
"$REPO/scripts/setup.sh"

step "format and lints"
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings

step "building (release, used by the interop tests and benchmarks)"
cargo build --release --all-targets

step "tests: codec, daemon, interop against real QEMU and a real Linux guest"
# Guests under TCG on two cores: run interop cases one at a time. The log feeds the matrix.
LOG="$REPO/target/test-output.log"
cargo test --release -- --test-threads=1 2>&1 | tee "$LOG"

step "interop matrix (interop-tests/matrix.tsv; a cell whose test did not run fails)"
"$REPO/target/release/interop-matrix" "$REPO/interop-tests/matrix.tsv" "$LOG" \
    "$REPO/target/interop-matrix.md"

step "Docker interop: postcopy across QEMU releases, one container per end (docker/)"
# Builds the images on a clean machine (cached afterwards), then 7.2->7.2, 10.0->10.0 and
# 7.2->10.0 through the sidecar; fails, never skips, when docker cannot run.
"$REPO/docker/run-interop.sh"

step "guest workload unit tests"
(cd "$REPO/interop-tests/guest-workload" && cargo test --release)

step "fuzz smoke run over the committed corpus"
"$REPO/scripts/fuzz-smoke.sh"
