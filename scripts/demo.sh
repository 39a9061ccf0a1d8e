#!/usr/bin/env bash
# The main job on its embedded default: installs what it needs (QEMU, the guest kernel, the
# guest initramfs), boots a small local VM running the guest workload, migrates it with
# postcopy through the sidecar, and shows the live view and the report.
# Usage: ./scripts/demo.sh [extra `postcopy-sidecar demo` options, e.g. --preempt]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
"$REPO/scripts/setup.sh"
cargo build --release --bin postcopy-sidecar
exec "$REPO/target/release/postcopy-sidecar" demo "$@"
