#!/usr/bin/env bash
# Installs everything the tests, captures and demo need on a Debian 12 host (run as root):
#   - QEMU 10.0 from bookworm-backports (system-wide, /usr/bin/qemu-system-x86_64);
#   - QEMU 7.2 from bookworm, extracted (not installed) under .cache/qemu-7.2/ so both
#     versions can run side by side for cross-version migration;
#   - QEMU 11.1 from Debian's development suite, extracted with its own libraries and
#     loader under .cache/qemu-11.1/ (Debian 12 cannot install it);
#   - the guest kernel (Debian's cloud kernel) as .cache/guest/vmlinuz;
#   - the guest initramfs with our workload as /init (scripts/build-guest.sh);
#   - libvirt 9.0 (libvirtd, virtlogd, virsh) for the libvirt hook's tests, which start
#     their own daemons, and systemd-analyze to check the systemd unit;
#   - docker.io and debootstrap for the Docker interop runner (docker/setup.sh).
# Idempotent: a second run only checks what is cached and touches the network for nothing.
# Override the cache location with POSTCOPY_SIDECAR_CACHE.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
START=$SECONDS
need_root
mkdir -p "$CACHE"

# shellcheck disable=SC1091
. /etc/os-release
CODENAME="${VERSION_CODENAME:-bookworm}"
BPO="${CODENAME}-backports"

# --- 1. the backports source, derived from the distribution's own source --------------------
add_backports_source() {
	local dst=/etc/apt/sources.list.d/postcopy-sidecar-backports.sources
	local src=/etc/apt/sources.list.d/debian.sources
	[ -f "$dst" ] && return 0
	if grep -rqsE "(^Suites:.*[[:space:]]|^deb[[:space:]].*[[:space:]])${BPO}([[:space:]]|$)" \
		/etc/apt/sources.list /etc/apt/sources.list.d/; then
		return 0 # already configured by someone else
	fi
	say "adding the $BPO apt source (derived from the $CODENAME source)"
	local tmp
	tmp="$(mktemp)"
	if [ -f "$src" ]; then
		# Keep each stanza that serves the plain release suite; swap its Suites line.
		awk -v suite="$CODENAME" -v bpo="$BPO" 'BEGIN { RS = ""; ORS = "" }
			{
				n = split($0, L, "\n"); keep = 0
				for (i = 1; i <= n; i++) if (L[i] ~ /^Suites:/) {
					m = split(substr(L[i], 8), S, /[[:space:]]+/)
					for (j = 1; j <= m; j++) if (S[j] == suite) keep = 1
				}
				if (!keep) next
				for (i = 1; i <= n; i++) print ((L[i] ~ /^Suites:/) ? "Suites: " bpo : L[i]) "\n"
				print "\n"
			}' "$src" >"$tmp"
	elif [ -f /etc/apt/sources.list ]; then
		awk -v suite="$CODENAME" -v bpo="$BPO" '$1 == "deb" && $3 == suite {
				printf "Types: deb\nURIs: %s\nSuites: %s\nComponents: main\n\n", $2, bpo; exit
			}' /etc/apt/sources.list >"$tmp"
	fi
	[ -s "$tmp" ] || die "found no $CODENAME apt source to derive $BPO from"
	install -m 0644 "$tmp" "$dst"
	rm -f "$tmp"
	APT_UPDATED=0
}
add_backports_source

# --- 2. host packages -----------------------------------------------------------------------
# libclang-dev: bindgen in userfaultfd-sys; libc6-dev: the static guest binary; cpio: initramfs.
apt_install_missing libclang-dev libc6-dev cpio gzip ca-certificates

case "$(pkg_version qemu-system-x86)" in
1:10.*) ;;
*)
	apt_update_once
	say "installing QEMU 10.0 from $BPO"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		-t "$BPO" qemu-system-x86 >/dev/null
	;;
esac
QEMU10=/usr/bin/qemu-system-x86_64
[ -x "$QEMU10" ] || die "$QEMU10 missing after install"

# Boots a firmware-only VM under TCG and checks QMP answers; $1.. = the command line.
qmp_boot_check() {
	local out
	out="$(printf '%s\n' '{"execute":"qmp_capabilities"}' '{"execute":"query-status"}' \
		'{"execute":"quit"}' | timeout 60 "$@" -nodefaults -display none -accel tcg -M q35 \
		-m 64 -qmp stdio 2>&1)" || true
	if ! grep -q '"status": "running"' <<<"$out"; then
		printf '%s\n' "$out" >&2
		return 1
	fi
}

V10="$(pkg_version qemu-system-x86)"
if [ "$(cat "$CACHE/qemu-10.0.ok" 2>/dev/null || true)" != "$V10" ]; then
	qmp_boot_check "$QEMU10" || die "QEMU 10.0 ($V10) does not boot a firmware-only VM"
	echo "$V10" >"$CACHE/qemu-10.0.ok"
fi
say "QEMU 10.0: $("$QEMU10" --version | head -n1)"

# --- 3. QEMU 7.2, extracted beside the system one --------------------------------------------
Q72="$CACHE/qemu-7.2"
install_qemu72() {
	apt_update_once
	local v_x86 v_data v_bios deb
	v_x86="$(stable_version qemu-system-x86)"
	v_data="$(stable_version qemu-system-data)"
	v_bios="$(stable_version seabios)"
	case "$v_x86" in 1:7.2*) ;; *) die "no QEMU 7.2 in the $CODENAME sources (got '$v_x86')" ;; esac
	say "extracting QEMU $v_x86 (+ data $v_data, seabios $v_bios) into $Q72"
	rm -rf "$Q72.tmp"
	mkdir -p "$Q72.tmp"
	# qemu-system-common carries the accel-tcg module that 7.2 loads at run time.
	for spec in "qemu-system-x86=$v_x86" "qemu-system-common=$v_x86" \
		"qemu-system-data=$v_data" "seabios=$v_bios"; do
		deb="$(download_deb "${spec%%=*}" "${spec#*=}")"
		dpkg -x "$deb" "$Q72.tmp"
	done
	rm -rf "$Q72.tmp/usr/share/doc" "$Q72.tmp/usr/share/man"
	# The shared libraries it links are plain bookworm libraries: install the missing ones.
	deb="$(download_deb qemu-system-x86 "$v_x86")"
	mapfile -t libs < <(dpkg-deb -f "$deb" Depends | tr ',' '\n' | sed -e 's/|.*//' \
		-e 's/(.*)//' -e 's/[[:space:]]//g' | grep -vE '^(qemu-|seabios$|ipxe-qemu$)' | grep .)
	apt_install_missing "${libs[@]}" ipxe-qemu
	# A wrapper for people: the lab code sets the same -L dirs and module dir itself.
	cat >"$Q72.tmp/qemu-system-x86_64" <<'EOF'
#!/bin/sh
# QEMU 7.2 extracted by scripts/setup.sh: its own firmware and modules, not the system's.
D="$(cd "$(dirname "$0")" && pwd)"
export QEMU_MODULE_DIR="$D/usr/lib/x86_64-linux-gnu/qemu"
exec "$D/usr/bin/qemu-system-x86_64" -L "$D/usr/share/qemu" -L "$D/usr/share/seabios" \
	-L /usr/lib/ipxe/qemu "$@"
EOF
	chmod +x "$Q72.tmp/qemu-system-x86_64"
	echo "$v_x86" >"$Q72.tmp/.version"
	rm -rf "$Q72"
	mv "$Q72.tmp" "$Q72"
}
if [ ! -f "$Q72/.version" ] || [ ! -x "$Q72/usr/bin/qemu-system-x86_64" ]; then
	install_qemu72
fi
unresolved="$(ldd "$Q72/usr/bin/qemu-system-x86_64" \
	"$Q72/usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so" | grep 'not found' || true)"
[ -z "$unresolved" ] || die "QEMU 7.2 misses libraries: $unresolved"
V72="$("$Q72/qemu-system-x86_64" --version | head -n1)"
case "$V72" in *"version 7.2"*) ;; *) die "unexpected QEMU 7.2 version line: $V72" ;; esac
if [ "$(cat "$CACHE/qemu-7.2.ok" 2>/dev/null || true)" != "$(cat "$Q72/.version")" ]; then
	qmp_boot_check "$Q72/qemu-system-x86_64" || die "QEMU 7.2 does not boot a firmware-only VM"
	cp "$Q72/.version" "$CACHE/qemu-7.2.ok"
fi
say "QEMU 7.2: $V72"

# --- 3b. QEMU 11.1 from Debian's development suite, with its own libraries and loader -------
# Debian 12 cannot install it (it links a newer glibc), so the whole dependency closure is
# downloaded with a private apt state (the system's sources are not touched: the suite is
# derived from the distribution's own source) and extracted under .cache/qemu-11.1/root;
# QEMU runs through that tree's dynamic loader. The stream changes of 10.1-11.1 then run
# for real (protocol-spec/versions.md#versions-after-10-0).
Q11="$CACHE/qemu-11.1"
install_qemu11() {
	local apt_dir="$CACHE/sid-apt" uri v deb
	uri="$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null ||
		true)"
	[ -n "$uri" ] || uri="$(awk '$1 == "deb" { print $2; exit }' /etc/apt/sources.list)"
	[ -n "$uri" ] || die "found no apt source to derive the development suite from"
	mkdir -p "$apt_dir/etc" "$apt_dir/state/lists/partial" "$apt_dir/cache/archives/partial"
	printf 'Types: deb\nURIs: %s\nSuites: sid\nComponents: main\nSigned-By: %s\n' "$uri" \
		/usr/share/keyrings/debian-archive-keyring.gpg >"$apt_dir/etc/sid.sources"
	: >"$apt_dir/state/status"
	local apt=(apt-get -qq -o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$apt_dir/etc"
		-o "Dir::State=$apt_dir/state" -o "Dir::State::status=$apt_dir/state/status"
		-o "Dir::Cache=$apt_dir/cache" -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
	"${apt[@]}" update >/dev/null
	v="$("${apt[@]}" -s install --no-install-recommends qemu-system-x86 |
		awk '$1 == "Inst" && $2 == "qemu-system-x86" { gsub(/[()]/, "", $3); print $3 }')"
	case "$v" in 1:11.1*) ;; *) die "no QEMU 11.1 in the development suite (got '$v')" ;; esac
	say "extracting QEMU $v with its libraries into $Q11"
	"${apt[@]}" install --download-only -y --no-install-recommends qemu-system-x86 >/dev/null
	rm -rf "$Q11.tmp"
	mkdir -p "$Q11.tmp/root"
	for deb in "$apt_dir"/cache/archives/*.deb; do dpkg -x "$deb" "$Q11.tmp/root"; done
	rm -rf "$Q11.tmp/root/usr/share/doc" "$Q11.tmp/root/usr/share/man"
	cat >"$Q11.tmp/qemu-system-x86_64" <<'EOF'
#!/bin/sh
# QEMU 11.1 extracted by scripts/setup.sh, run by its own tree's loader and libraries.
R="$(cd "$(dirname "$0")" && pwd)/root"
L="$R/usr/lib/x86_64-linux-gnu"
export QEMU_MODULE_DIR="$L/qemu"
exec "$L/ld-linux-x86-64.so.2" --library-path "$L:$R/lib/x86_64-linux-gnu" \
	"$R/usr/bin/qemu-system-x86_64" "$@"
EOF
	chmod +x "$Q11.tmp/qemu-system-x86_64"
	echo "$v" >"$Q11.tmp/.version"
	rm -rf "$Q11" "$apt_dir/cache/archives"
	mv "$Q11.tmp" "$Q11"
}
if [ ! -f "$Q11/.version" ] || [ ! -x "$Q11/root/usr/bin/qemu-system-x86_64" ]; then
	install_qemu11
fi
V11="$("$Q11/qemu-system-x86_64" --version | head -n1)"
case "$V11" in *"version 11.1"*) ;; *) die "unexpected QEMU 11.1 version line: $V11" ;; esac
if [ "$(cat "$CACHE/qemu-11.1.ok" 2>/dev/null || true)" != "$(cat "$Q11/.version")" ]; then
	qmp_boot_check "$Q11/qemu-system-x86_64" -L "$Q11/root/usr/share/qemu" \
		-L "$Q11/root/usr/share/seabios" || die "QEMU 11.1 does not boot a firmware-only VM"
	cp "$Q11/.version" "$CACHE/qemu-11.1.ok"
fi
say "QEMU 11.1: $V11"

# --- 4. libvirt and systemd-analyze ---------------------------------------------------------
# After QEMU 10: libvirt's QEMU driver then finds the backports QEMU. The tests start their
# own libvirtd and virtlogd (interop-tests/support/libvirt.rs); nothing here starts one.
apt_install_missing libvirt-daemon-system libvirt-clients libvirt-daemon-driver-qemu systemd
say "libvirt: $(pkg_version libvirt-daemon-system)"

# --- 5. the guest kernel ---------------------------------------------------------------------
GUEST="$CACHE/guest"
mkdir -p "$GUEST"
if [ ! -s "$GUEST/vmlinuz" ]; then
	apt_update_once
	# linux-image-cloud-amd64 is a metapackage: resolve it to the real image package.
	meta_v="$(apt-cache policy linux-image-cloud-amd64 | awk '/Candidate:/ { print $2 }')"
	real="$(apt-cache show "linux-image-cloud-amd64=$meta_v" | awk -F': ' '/^Depends:/ {
		split($2, d, /[ ,(]/); print d[1]; exit }')"
	[ -n "$real" ] || die "could not resolve linux-image-cloud-amd64 to a kernel package"
	real_v="$(apt-cache show "$real" | awk '/^Version:/ { print $2; exit }')"
	say "fetching guest kernel $real $real_v"
	deb="$(download_deb "$real" "$real_v")"
	rm -rf "$GUEST/kernel.tmp"
	mkdir -p "$GUEST/kernel.tmp"
	# Only /boot is needed (the guest loads no modules): skip the package's module tree.
	dpkg --fsys-tarfile "$deb" | tar -x -C "$GUEST/kernel.tmp" --wildcards './boot/vmlinuz-*'
	cp "$(find "$GUEST/kernel.tmp/boot" -name 'vmlinuz-*' | head -n1)" "$GUEST/vmlinuz.tmp"
	rm -rf "$GUEST/kernel.tmp"
	echo "$real $real_v" >"$GUEST/vmlinuz.pkg"
	mv "$GUEST/vmlinuz.tmp" "$GUEST/vmlinuz"
fi
say "guest kernel: $(cat "$GUEST/vmlinuz.pkg" 2>/dev/null || echo "$GUEST/vmlinuz")"

# --- 6. the guest initramfs ------------------------------------------------------------------
"$REPO/scripts/build-guest.sh"

# --- 7. the Docker interop runner: docker.io, debootstrap, docker's seccomp profile ----------
"$REPO/docker/setup.sh"

say "done in $((SECONDS - START))s"
