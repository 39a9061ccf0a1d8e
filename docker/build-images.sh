#!/usr/bin/env bash
# Builds the interop images without any image registry:
#   postcopy-sidecar/base:bookworm   debootstrap (minbase) from the host's own apt mirror, then
#                                    `docker import`;
#   postcopy-sidecar/build:bookworm  base + the C toolchain and libclang the crate's build needs;
#   postcopy-sidecar/interop-7.2     base + Debian 12's QEMU 7.2 + our binaries;
#   postcopy-sidecar/interop-10.0    base + QEMU 10.0 from bookworm-backports + our binaries.
# Our binaries (postcopy-sidecar, lab-vm) are built by cargo inside the build image, with the
# host's Rust toolchain and crate cache mounted read-only (no toolchain can be downloaded) and
# the repository mounted at its own path, so cargo reuses target/ incrementally.
#
# Cached: the base is rebuilt only when its recipe or the host's apt sources change (a label
# on the image records them); the other images go through `docker build`, whose layer cache
# skips every step whose inputs (parent image, instruction, copied files) are unchanged.
# A clean machine builds everything. Prints how long each step took.
#
# Usage: docker/build-images.sh [--rebuild-base]      (root; starts dockerd if none runs)
set -euo pipefail
# shellcheck source=docker/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REBUILD_BASE=0
for a in "$@"; do
	case "$a" in
	--rebuild-base) REBUILD_BASE=1 ;;
	-h | --help)
		sed -n '2,/^set -e/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
		exit 0
		;;
	*) die "unknown argument: $a" ;;
	esac
done

START=$SECONDS
ensure_dockerd
mkdir -p "$WORK"

# Prints "NAME: Ns" for a step that took time (the summary CI logs are read for).
timed() {
	local what="$1" t0=$SECONDS
	shift
	"$@"
	say "$what: $((SECONDS - t0))s"
}

# --- 1. the base image: debootstrap + docker import ------------------------------------------

# Unmounts whatever an interrupted debootstrap left mounted under $1 (proc, sys), deepest
# first, so removing the directory cannot reach into the host's /proc or /sys.
umount_under() {
	local root="$1" m
	awk -v r="$root/" 'index($2, r) == 1 { print $2 }' /proc/self/mounts | sort -r |
		while read -r m; do umount -l "$m" || true; done
}

# Creates the base root filesystem in $1 from mirror $2. Its text is part of the base
# image's cache key (declare -f), so editing this recipe rebuilds the base.
make_base_rootfs() {
	local root="$1" mirror="$2"
	# Keep downloaded .debs between runs (only helps a machine that built the base before).
	mkdir -p "$WORK/debootstrap-debs"
	debootstrap --variant=minbase --cache-dir="$WORK/debootstrap-debs" \
		"$CODENAME" "$root" "$mirror" >"$WORK/debootstrap.log" 2>&1 || {
		tail -n 30 "$WORK/debootstrap.log" >&2
		die "debootstrap failed (see $WORK/debootstrap.log)"
	}
	# apt in the images uses the host's sources (same mirror, suites and keyring) and judges
	# Release files as the host's apt does.
	rm -f "$root/etc/apt/sources.list"
	sources_for_image >"$root/etc/apt/sources.list.d/debian.sources"
	apt_acquire_settings >"$root/etc/apt/apt.conf.d/90postcopy-sidecar-host"
	# Images need no documentation, and apt need not keep what it downloaded.
	cat >"$root/etc/dpkg/dpkg.cfg.d/90postcopy-sidecar-nodoc" <<-'EOF'
		path-exclude /usr/share/doc/*
		path-exclude /usr/share/man/*
		path-exclude /usr/share/info/*
		path-exclude /usr/share/locale/*
	EOF
	printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
		>"$root/etc/apt/apt.conf.d/90postcopy-sidecar-norecommends"
	rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"* "$root/usr/share/doc/"*
}

build_base() {
	local mirror key root="$WORK/rootfs"
	mirror="$(host_mirror)"
	key="$({
		declare -f make_base_rootfs sources_for_image apt_acquire_settings
		echo "$CODENAME $mirror"
		sources_for_image
		apt_acquire_settings
	} | digest)"
	if [ "$REBUILD_BASE" = 0 ] && [ "$(image_inputs "$BASE_IMAGE")" = "$key" ]; then
		say "base image $BASE_IMAGE: cached (inputs $key)"
		return 0
	fi
	command -v debootstrap >/dev/null || die "no debootstrap: install it (scripts/setup.sh)"
	say "base image $BASE_IMAGE: debootstrap $CODENAME (minbase) from the host's mirror"
	umount_under "$root"
	rm -rf "$root"
	local t0=$SECONDS
	make_base_rootfs "$root" "$mirror"
	say "debootstrap: $((SECONDS - t0))s"
	t0=$SECONDS
	# --numeric-owner: file owners by number, as in the tree (no name lookups on the host).
	tar --numeric-owner -C "$root" -c . | "$DOCKER" import \
		-c "LABEL postcopy-sidecar.inputs=$key" \
		-c 'ENV DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8' \
		-c 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
	say "docker import: $((SECONDS - t0))s"
	rm -rf "$root"
}
timed "base image" build_base

# --- 2. images from Dockerfiles (docker's layer cache decides what to redo) -------------------

# docker_build TAG DOCKERFILE CONTEXT: --network host, because there is no bridge and apt
# inside reaches the mirror as the host does. Output goes to a log; shown on failure.
docker_build() {
	local tag="$1" file="$2" ctx="$3" log before after
	log="$WORK/build-$(basename "$file" .Dockerfile).log"
	before="$("$DOCKER" image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)"
	if ! "$DOCKER" build --network host -t "$tag" -f "$file" \
		--build-arg "BASE=$BASE_IMAGE" "$ctx" >"$log" 2>&1; then
		tail -n 40 "$log" >&2
		die "docker build of $tag failed (see $log)"
	fi
	after="$("$DOCKER" image inspect -f '{{.Id}}' "$tag")"
	if [ "$before" = "$after" ]; then
		say "$tag: cached (${after#sha256:})"
	else
		say "$tag: built (${after#sha256:})"
		# The image this one replaces, now untagged: remove it unless something still uses
		# it (docker refuses then), so rebuilds after code changes do not pile up.
		[ -z "$before" ] || "$DOCKER" rmi "$before" >/dev/null 2>&1 || true
	fi
}

# An empty context: the build image copies nothing in.
mkdir -p "$WORK/ctx-empty"
timed "build image" docker_build "$BUILD_IMAGE" "$DOCKER_DIR/build.Dockerfile" "$WORK/ctx-empty"

# --- 3. our binaries, built by cargo inside the build image ----------------------------------

build_binaries() {
	local sysroot cargo_home target mounts=()
	command -v rustc >/dev/null || die "no Rust toolchain on the host to mount into the build container"
	sysroot="$(rustc --print sysroot)"
	cargo_home="${CARGO_HOME:-$HOME/.cargo}"
	target="${CARGO_TARGET_DIR:-$REPO/target}"
	[ -d "$cargo_home/registry" ] || die "no crate cache at $cargo_home/registry (run cargo fetch on the host)"
	mkdir -p "$target"
	# Same absolute paths as on the host: cargo's fingerprints name these paths, so the
	# in-container build reuses what the host built in target/ and vice versa.
	mounts+=(-v "$REPO:$REPO" -v "$sysroot:$sysroot:ro" -v "$cargo_home/registry:$cargo_home/registry:ro")
	[ -d "$cargo_home/git" ] && mounts+=(-v "$cargo_home/git:$cargo_home/git:ro")
	case "$target" in "$REPO"/*) ;; *) mounts+=(-v "$target:$target") ;; esac
	# --network none and --offline: the build must not need anything the host did not
	# already download. CARGO_HOME itself stays writable inside the container (cargo keeps
	# its lock and cache-tracking database there); only the registry under it is mounted.
	# --all-targets, as scripts/test.sh builds on the host: the same units with the same
	# features (dev-dependencies add features to shared crates), so after the host's build
	# this one only checks fingerprints; `--bin` alone would compile a second variant of
	# most dependencies.
	"$DOCKER" run --rm --network none "${mounts[@]}" -w "$REPO" \
		-e "CARGO_HOME=$cargo_home" -e "CARGO_TARGET_DIR=$target" -e "RUSTC=$sysroot/bin/rustc" \
		-e "PATH=$sysroot/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
		-e CARGO_TERM_COLOR=never \
		"$BUILD_IMAGE" cargo build --release --offline --locked --all-targets \
		>"$WORK/cargo-build.log" 2>&1 || {
		tail -n 40 "$WORK/cargo-build.log" >&2
		die "cargo build in the build container failed (see $WORK/cargo-build.log)"
	}
	grep -E '^ *(Compiling|Finished)' "$WORK/cargo-build.log" | tail -n 3 | sed 's/^ */[docker]   cargo: /'
	local ctx="$WORK/ctx-interop"
	rm -rf "$ctx"
	mkdir -p "$ctx"
	cp "$target/release/postcopy-sidecar" "$target/release/lab-vm" "$ctx/"
	sources_for_suite "$CODENAME-backports" >"$ctx/backports.sources"
}
timed "binaries (cargo build in $BUILD_IMAGE)" build_binaries

# --- 4. the two QEMU images -------------------------------------------------------------------

for v in 7.2 10.0; do
	timed "image $IMAGE_PREFIX/interop-$v" docker_build "$IMAGE_PREFIX/interop-$v" \
		"$DOCKER_DIR/qemu-$v.Dockerfile" "$WORK/ctx-interop"
	version="$("$DOCKER" run --rm --network none "$IMAGE_PREFIX/interop-$v" qemu-system-x86_64 --version)"
	say "  ${version%%$'\n'*}"
done

say "images ready in $((SECONDS - START))s"
