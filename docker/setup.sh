#!/usr/bin/env bash
# Installs what the Docker interop runner (docker/) needs on a Debian 12 host, as root:
#   - docker.io (dockerd 20.10 with its own client, containerd, runc) and debootstrap;
#   - docker's default seccomp profile of that same docker.io release, taken from the
#     Debian package of its sources (downloaded, not installed): the runner allows one more
#     syscall on top of it (see seccomp_profile in docker/lib.sh).
# Idempotent; scripts/setup.sh calls it.
set -euo pipefail
# scripts/lib.sh: apt helpers (apt_install_missing, download_deb); docker/lib.sh: WORK etc.
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"
# shellcheck source=docker/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
need_root

apt_install_missing docker.io debootstrap
say "docker: $("$DOCKER" --version)"

v="$(docker_io_version)"
mkdir -p "$WORK"
if [ ! -s "$WORK/seccomp-default-$v.json" ]; then
	# The profile is a source file of the daemon; Debian ships the sources as a -dev package
	# of the same version (docker.io's own version minus a binNMU suffix).
	# (apt-get update first, here: download_deb's own progress line would land in $deb.)
	apt_update_once
	deb="$(download_deb golang-github-docker-docker-dev "$v")"
	dpkg --fsys-tarfile "$deb" |
		tar -xO ./usr/share/gocode/src/github.com/docker/docker/profiles/seccomp/default.json \
			>"$WORK/seccomp-default-$v.json.tmp"
	grep -q '"defaultAction"' "$WORK/seccomp-default-$v.json.tmp" ||
		die "no seccomp profile in $deb"
	mv "$WORK/seccomp-default-$v.json.tmp" "$WORK/seccomp-default-$v.json"
fi
say "docker's default seccomp profile: $WORK/seccomp-default-$v.json"
