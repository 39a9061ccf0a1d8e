# Shared helpers for the setup scripts. Source it; it sets REPO and CACHE.
# shellcheck shell=bash

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${POSTCOPY_SIDECAR_CACHE:-$REPO/.cache}"
export REPO CACHE

# One progress line, prefixed so it stands out in CI logs.
say() { printf '[setup] %s\n' "$*"; }

die() {
	printf '[setup] ERROR: %s\n' "$*" >&2
	exit 1
}

need_root() {
	[ "$(id -u)" = 0 ] || die "run as root (it installs Debian packages)"
}

# apt-get update at most once per run, and only when something is actually missing.
APT_UPDATED=0
apt_update_once() {
	if [ "$APT_UPDATED" = 0 ]; then
		say "apt-get update"
		apt-get update -qq >/dev/null
		APT_UPDATED=1
	fi
}

# Is package $1 installed (any version)?
pkg_installed() {
	[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = installed ]
}

# Installed version of package $1, empty when missing.
pkg_version() {
	dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true
}

# Install the listed packages that are missing (no recommends, quiet).
apt_install_missing() {
	local missing=() p
	for p in "$@"; do
		pkg_installed "$p" || missing+=("$p")
	done
	if [ "${#missing[@]}" -gt 0 ]; then
		apt_update_once
		say "installing ${missing[*]}"
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	fi
}

# Newest version of package $1 offered by a suite that is not a backports suite
# (apt-cache madison lists newest first).
stable_version() {
	apt-cache madison "$1" | awk -F'|' '$3 !~ /backports/ { gsub(/ /, "", $2); print $2; exit }'
}

# Fetch package $1 at version $2 into $CACHE/debs (cached) and print the .deb path.
download_deb() {
	local name="$1" version="$2" dir="$CACHE/debs" f
	mkdir -p "$dir"
	f="$(find "$dir" -maxdepth 1 -name "${name}_*.deb" -print | while read -r d; do
		[ "$(dpkg-deb -f "$d" Version)" = "$version" ] && echo "$d"
	done | head -n1)"
	if [ -z "$f" ]; then
		apt_update_once
		# apt's _apt user cannot write into root's cache dir; download as root quietly.
		(
			cd "$dir" || exit 1
			# Progress and warnings go to stderr: only the file name may reach stdout.
			apt-get download -qq "$name=$version" 2>&1 | { grep -v 'unsandboxed' || true; } >&2
		) || true # a failed download is reported below, by name
		f="$(find "$dir" -maxdepth 1 -name "${name}_*.deb" -print | while read -r d; do
			[ "$(dpkg-deb -f "$d" Version)" = "$version" ] && echo "$d"
		done | head -n1)"
		[ -n "$f" ] || die "could not download $name=$version"
	fi
	echo "$f"
}
