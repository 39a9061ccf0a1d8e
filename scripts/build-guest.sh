#!/usr/bin/env bash
# Builds the guest workload (interop-tests/guest-workload) as a static binary and packs it as
# /init of a gzip'd newc initramfs: .cache/guest/initramfs.cpio.gz. Rebuilds only when the
# workload's sources (or this script) changed since the last build.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SRC="$REPO/interop-tests/guest-workload"
OUT="$CACHE/guest"
IMG="$OUT/initramfs.cpio.gz"
TARGET=x86_64-unknown-linux-gnu
mkdir -p "$OUT"

stamp="$( (
	cd "$SRC"
	find Cargo.toml Cargo.lock src -type f 2>/dev/null | LC_ALL=C sort | xargs sha256sum
	sha256sum "$REPO/scripts/build-guest.sh"
) | sha256sum | cut -d' ' -f1)"
if [ -s "$IMG" ] && [ "$(cat "$OUT/initramfs.stamp" 2>/dev/null || true)" = "$stamp" ]; then
	say "guest initramfs up to date ($IMG)"
	exit 0
fi

say "building the guest workload (static)"
# Its own target dir (git-ignored) so the flags below never invalidate the main build.
RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release --target "$TARGET" \
	--manifest-path "$SRC/Cargo.toml" --target-dir "$SRC/target"
BIN="$SRC/target/$TARGET/release/guest-workload"
if ldd "$BIN" 2>&1 | grep -q "=>"; then
	die "$BIN is dynamically linked; /init must be static"
fi

say "packing $IMG"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/dev" "$stage/proc" "$stage/sys"
install -m 0755 "$BIN" "$stage/init"
# The kernel opens /dev/console for PID 1 before /init can mount devtmpfs; without the node
# /init starts with no stdout (it then reopens the console itself, but the node is cleaner).
if [ "$(id -u)" = 0 ]; then
	mknod -m 0600 "$stage/dev/console" c 5 1
fi
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible) |
	gzip -9n >"$IMG.tmp"
mv "$IMG.tmp" "$IMG"
echo "$stamp" >"$OUT/initramfs.stamp"
say "guest initramfs ready ($(du -h "$IMG" | cut -f1))"
