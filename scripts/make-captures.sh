#!/usr/bin/env bash
# Regenerates the committed captures under protocol-spec/captures/ with capture-migration:
# real QEMU 10.0, 7.2 and 11.1 migrations on loopback, every channel in each direction.
# Needs scripts/setup.sh. Small VMs keep the committed set to a few MB.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
cargo build --release --bin capture-migration
TOOL="$REPO/target/release/capture-migration"
OUT="$REPO/protocol-spec/captures"
cap() { # name, then tool arguments
	local name=$1
	shift
	rm -rf "${OUT:?}/$name"
	echo "== $name"
	"$TOOL" --out "$OUT/$name" "$@"
}
cap 10.0-idle-precopy --mode precopy --guest idle
cap 10.0-idle-postcopy --mode postcopy --guest idle --postcopy-after-ms 0
cap 10.0-idle-preempt --mode preempt --guest idle --postcopy-after-ms 0
# A Linux guest fills most of its RAM with the kernel's own pages (~70 MB of 96 MiB with
# Debian's cloud kernel, ~30 MB gzipped), so one such capture per QEMU version: the preempt
# one, which carries postcopy, real page requests and the preempt channel.
cap 10.0-linux-preempt --mode preempt --guest linux --ram-mib 96 --workload-mib 4
cap 7.2-idle-precopy --src 7.2 --dst 7.2 --mode precopy --guest idle
cap 7.2-idle-postcopy --src 7.2 --dst 7.2 --mode postcopy --guest idle --postcopy-after-ms 0
cap 7.2-linux-preempt --src 7.2 --dst 7.2 --mode preempt --guest linux --ram-mib 96 --workload-mib 4
# Multifd with four channels: each channel in its own file, named by its id.
cap 10.0-idle-multifd --mode precopy --guest idle --multifd 4
cap 7.2-idle-multifd --src 7.2 --dst 7.2 --mode precopy --guest idle --multifd 4
cap 7.2-to-10.0-idle-postcopy --src 7.2 --dst 10.0 --machine pc-q35-7.2 --mode postcopy --guest idle --postcopy-after-ms 0
# QEMU 11.1 (scripts/setup.sh extracts it): the 10.2 package PING(0x42), and multifd beside
# postcopy (allowed again from 10.2).
cap 11.1-idle-postcopy --src 11.1 --dst 11.1 --mode postcopy --guest idle --postcopy-after-ms 0
cap 11.1-idle-multifd-postcopy --src 11.1 --dst 11.1 --mode postcopy --guest idle --postcopy-after-ms 0 --multifd 2
du -sh "$OUT"/*
