# Shared helpers for docker/*.sh: the docker client and daemon, the host's apt mirror,
# cache keys, and waiting on log lines. Source it; it sets REPO, DOCKER_DIR, WORK, DOCKER.
# shellcheck shell=bash

DOCKER_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$DOCKER_DIR/.." && pwd)"
# Generated state (debootstrap's package cache, build contexts, dockerd's log), ignored by git.
WORK="${POSTCOPY_SIDECAR_DOCKER_WORK:-${POSTCOPY_SIDECAR_CACHE:-$REPO/.cache}/docker}"
# The client from Debian's docker.io, the same release as its daemon. Another client may sit
# earlier in PATH (a docker 28 in /usr/local/bin here): it talks to the 20.10 daemon too, but
# its `docker build` wants buildx and warns that the legacy builder is deprecated.
DOCKER="${POSTCOPY_SIDECAR_DOCKER:-/usr/bin/docker}"
# Debian 12: the host's release, so binaries built in a container run on both.
CODENAME=bookworm
IMAGE_PREFIX=postcopy-sidecar
BASE_IMAGE="$IMAGE_PREFIX/base:$CODENAME"
BUILD_IMAGE="$IMAGE_PREFIX/build:$CODENAME"
export REPO DOCKER_DIR WORK DOCKER CODENAME IMAGE_PREFIX BASE_IMAGE BUILD_IMAGE

say() { printf '[docker] %s\n' "$*"; }

die() {
	printf '[docker] ERROR: %s\n' "$*" >&2
	exit 1
}

# sha256 of stdin, shortened: cache keys and image labels.
digest() { sha256sum | cut -c1-16; }

# --- the daemon ------------------------------------------------------------------------------

DOCKERD_PID=""

# Makes sure a docker daemon answers. Uses one that already runs (DOCKER_HOST or the default
# socket); otherwise starts dockerd in the background and stops it again when the calling
# script exits (by its pid: only the process we started). There is no systemd to start it.
ensure_dockerd() {
	[ -x "$DOCKER" ] || die "no docker client at $DOCKER: install docker.io (scripts/setup.sh)"
	if "$DOCKER" version >/dev/null 2>&1; then
		return 0
	fi
	command -v dockerd >/dev/null || die "no dockerd: install docker.io (scripts/setup.sh)"
	[ "$(id -u)" = 0 ] || die "dockerd must be started as root; run as root or start it yourself"
	mkdir -p "$WORK"
	local log="$WORK/dockerd.log"
	# --bridge=none --iptables=false: every container here uses the host network, so dockerd
	# needs no bridge and must not rewrite the host's firewall rules for one. overlay2 works
	# on this kernel (6.18) over ext4; POSTCOPY_SIDECAR_DOCKER_STORAGE=vfs works anywhere,
	# slowly.
	# setsid: its own session, so a Ctrl-C meant for the runner does not also stop the daemon
	# while the runner still needs it to remove its containers.
	say "starting dockerd (log: $log)"
	setsid dockerd --iptables=false --ip6tables=false --bridge=none \
		--storage-driver="${POSTCOPY_SIDECAR_DOCKER_STORAGE:-overlay2}" \
		--pidfile "$WORK/dockerd.pid" >"$log" 2>&1 &
	DOCKERD_PID=$!
	trap stop_dockerd EXIT
	# (Not watched by pid: see wait_lines. dockerd logs a fatal line when it gives up.)
	if ! wait_lines "$log" 'API listen on' 'failed to start daemon|level=fatal' 1 1 120 >/dev/null; then
		tail -n 30 "$log" >&2
		die "dockerd did not come up (see $log)"
	fi
	# setsid runs dockerd in the same process (it only forks when called as a group
	# leader, which a background job of a script is not); the pidfile says for sure.
	[ "$(cat "$WORK/dockerd.pid")" = "$DOCKERD_PID" ] ||
		die "dockerd's pid is $(cat "$WORK/dockerd.pid"), not $DOCKERD_PID as started"
	"$DOCKER" version >/dev/null || die "dockerd is up but $DOCKER cannot talk to it"
	say "dockerd $("$DOCKER" version -f '{{.Server.Version}}') running as pid $DOCKERD_PID," \
		"storage $("$DOCKER" info -f '{{.Driver}}')"
}

stop_dockerd() {
	[ -n "$DOCKERD_PID" ] || return 0
	if [ "${POSTCOPY_SIDECAR_KEEP_DOCKERD:-0}" = 1 ]; then
		say "leaving dockerd running (pid $DOCKERD_PID)"
		return 0
	fi
	say "stopping dockerd (pid $DOCKERD_PID)"
	kill -TERM "$DOCKERD_PID" 2>/dev/null || true
	wait "$DOCKERD_PID" 2>/dev/null || true
	DOCKERD_PID=""
}

# --- waiting on lines ------------------------------------------------------------------------

# wait_line FILE ERE FROM SECS [PID]: waits until a line of FILE, from line FROM (1-based) on,
# matches ERE, and prints it. Fails after SECS seconds, or as soon as process PID is gone
# and nothing matched. Blocks on the file's growth (tail -F), never on a guessed sleep.
# PID must not be a child of this shell: a child that exits stays a zombie until the shell
# waits for it (not while it sits in `read`), and tail --pid cannot tell a zombie from a
# live process. A container's init (container_pid) is the shim's child, never ours.
wait_line() {
	wait_lines "$1" "$2" '' 1 "$3" "$4" "${5:-}"
}

# wait_lines FILE ERE FAIL_ERE COUNT FROM SECS [PID]: like wait_line, for COUNT matching lines
# (all printed); a line matching FAIL_ERE (if not empty) ends the wait with failure at once
# and is printed to stderr.
wait_lines() {
	local file="$1" re="$2" fail_re="$3" count="$4" from="$5" secs="$6" pid="${7:-}"
	local deadline=$((SECONDS + secs)) left line got=0 fd tail_pid rc=1
	local args=(-n "+$from" -F)
	[ -n "$pid" ] && args+=("--pid=$pid")
	touch "$file"
	exec {fd}< <(exec tail "${args[@]}" "$file" 2>/dev/null)
	tail_pid=$!
	while :; do
		left=$((deadline - SECONDS))
		[ "$left" -gt 0 ] || break
		# EOF (tail ended because PID is gone) or the deadline: stop.
		IFS= read -r -t "$left" line <&"$fd" || break
		line="${line%$'\r'}"
		if [ -n "$fail_re" ] && [[ "$line" =~ $fail_re ]]; then
			printf '%s\n' "$line" >&2
			break
		fi
		if [[ "$line" =~ $re ]]; then
			printf '%s\n' "$line"
			got=$((got + 1))
			if [ "$got" -ge "$count" ]; then
				rc=0
				break
			fi
		fi
	done
	kill "$tail_pid" 2>/dev/null || true
	exec {fd}<&-
	return "$rc"
}

# The host pid of container $1's init: gone exactly when the container stops.
container_pid() {
	local p
	p="$("$DOCKER" inspect -f '{{.State.Pid}}' "$1" 2>/dev/null || true)"
	[ -n "$p" ] && [ "$p" != 0 ] || return 1
	printf '%s\n' "$p"
}

# --- the host's apt sources ------------------------------------------------------------------

HOST_SOURCES=/etc/apt/sources.list.d/debian.sources

# The mirror the host uses for $CODENAME: the first URI of the first deb822 stanza that
# serves the suite (or the first matching `deb` line of a classic sources.list). Nothing
# names a mirror in this repository: images use whatever the host uses.
host_mirror() {
	local m=""
	if [ -f "$HOST_SOURCES" ]; then
		m="$(awk -v suite="$CODENAME" 'BEGIN { RS = ""; FS = "\n" }
			{
				uri = ""; ok = 0
				for (i = 1; i <= NF; i++) {
					if ($i ~ /^URIs:/) { split(substr($i, 6), U, /[[:space:]]+/); for (k in U) if (U[k] != "" && uri == "") uri = U[k] }
					if ($i ~ /^Suites:/) { n = split(substr($i, 8), S, /[[:space:]]+/); for (j = 1; j <= n; j++) if (S[j] == suite) ok = 1 }
				}
				if (ok && uri != "") { print uri; exit }
			}' "$HOST_SOURCES")"
	fi
	if [ -z "$m" ] && [ -f /etc/apt/sources.list ]; then
		m="$(awk -v suite="$CODENAME" '$1 == "deb" && $3 == suite { print $2; exit }' /etc/apt/sources.list)"
	fi
	[ -n "$m" ] || die "found no apt source for $CODENAME in $HOST_SOURCES or /etc/apt/sources.list"
	printf '%s\n' "$m"
}

# The host's deb822 stanzas that serve $CODENAME, with Suites replaced by $1 (e.g. the
# backports suite): the same mirror, keyring and components as the host.
sources_for_suite() {
	local to="$1"
	if [ -f "$HOST_SOURCES" ]; then
		awk -v suite="$CODENAME" -v to="$to" 'BEGIN { RS = ""; ORS = "" }
			{
				n = split($0, L, "\n"); keep = 0
				for (i = 1; i <= n; i++) if (L[i] ~ /^Suites:/) {
					m = split(substr(L[i], 8), S, /[[:space:]]+/)
					for (j = 1; j <= m; j++) if (S[j] == suite) keep = 1
				}
				if (!keep) next
				for (i = 1; i <= n; i++) if (L[i] !~ /^#/) print ((L[i] ~ /^Suites:/) ? "Suites: " to : L[i]) "\n"
				print "\n"
			}' "$HOST_SOURCES"
	else
		printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\n\n' "$(host_mirror)" "$to"
	fi
}

# The host's deb822 stanzas for $CODENAME and its updates/security suites, as they are (minus
# comments): what apt inside the images uses, so it sees what the host's apt sees.
sources_for_image() {
	if [ -f "$HOST_SOURCES" ]; then
		grep -v '^#' "$HOST_SOURCES"
	else
		printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\n\n' "$(host_mirror)" "$CODENAME"
	fi
}

# The host's apt settings on how to accept the mirror's Release files (a snapshot mirror's
# have expired Valid-Until dates): the images' apt must judge them the same way.
apt_acquire_settings() {
	apt-config dump | grep -E '^Acquire::(Check-Valid-Until|Check-Date) ' || true
}

# --- images ----------------------------------------------------------------------------------

# The value of label postcopy-sidecar.inputs on image $1, empty when the image is missing.
image_inputs() {
	"$DOCKER" image inspect -f '{{ index .Config.Labels "postcopy-sidecar.inputs" }}' "$1" 2>/dev/null || true
}

# The installed docker.io's version without a binNMU suffix (+bN): the version of the
# matching sources package, golang-github-docker-docker-dev.
docker_io_version() {
	local v
	v="$(dpkg-query -W -f='${Version}' docker.io 2>/dev/null || true)"
	[ -n "$v" ] || die "docker.io is not installed (scripts/setup.sh)"
	printf '%s\n' "${v%+b[0-9]*}"
}

# The seccomp profile of the lab containers: docker's own default profile for this daemon,
# plus userfaultfd(2) for containers that have CAP_SYS_PTRACE. Docker 20.10's default denies
# that syscall, and QEMU 7.2 has no other way to get a userfaultfd (10.0 opens
# /dev/userfaultfd), so a 7.2 destination could not do postcopy. Nothing else is relaxed.
# POSTCOPY_SIDECAR_SECCOMP overrides (a profile path, or "unconfined"). Prints the path.
seccomp_profile() {
	if [ -n "${POSTCOPY_SIDECAR_SECCOMP:-}" ]; then
		printf '%s\n' "$POSTCOPY_SIDECAR_SECCOMP"
		return 0
	fi
	local v server default out
	v="$(docker_io_version)"
	server="$("$DOCKER" version -f '{{.Server.Version}}')"
	case "$v" in
	"$server"-*) ;;
	*) die "the daemon is docker $server, not docker.io $v, whose seccomp profile docker/setup.sh" \
		"fetched; set POSTCOPY_SIDECAR_SECCOMP to its default profile plus userfaultfd" ;;
	esac
	default="$WORK/seccomp-default-$v.json"
	[ -s "$default" ] || die "no $default: run docker/setup.sh (scripts/setup.sh runs it)"
	out="$WORK/seccomp-lab-$v.json"
	if [ ! -s "$out" ] || [ "$out" -ot "$default" ]; then
		# A new first rule in the syscalls list, in the profile's own format.
		awk '{ print }
			/^\t"syscalls": \[$/ && !done {
				print "\t\t{"
				print "\t\t\t\"names\": [\"userfaultfd\"],"
				print "\t\t\t\"action\": \"SCMP_ACT_ALLOW\","
				print "\t\t\t\"args\": [],"
				print "\t\t\t\"comment\": \"postcopy-sidecar: QEMU 7.2 destinations need userfaultfd(2)\","
				print "\t\t\t\"includes\": {\"caps\": [\"CAP_SYS_PTRACE\"]},"
				print "\t\t\t\"excludes\": {}"
				print "\t\t},"
				done = 1
			}' "$default" >"$out.tmp"
		[ "$(grep -c userfaultfd "$out.tmp")" -ge 1 ] || die "could not add userfaultfd to $default"
		mv "$out.tmp" "$out"
	fi
	printf '%s\n' "$out"
}

# Flags every lab container gets. --network host: the sidecar and QEMU talk over loopback
# and the QMP sockets sit in a shared host directory, so no bridge is needed (and none is
# configured). /dev/kvm: KVM when it works (the accelerator probe decides). /dev/userfaultfd:
# QEMU 10.0's destination opens it for postcopy. SYS_PTRACE: QEMU 7.2 only has the
# userfaultfd(2) syscall, which the kernel grants only with CAP_SYS_PTRACE while
# vm.unprivileged_userfaultfd is 0 (as here); the sidecar and tools may also inspect QEMU.
# Seccomp: docker's default denies userfaultfd(2), so the lab profile ($1, from
# seccomp_profile) adds it back.
# --init: signals reach lab-vm and exited processes are reaped. The label names the runner's
# pid, so a later run can remove what a killed run left behind.
lab_container_flags() {
	local f=(--init --network host --cap-add SYS_PTRACE --security-opt "seccomp=$1"
		--label "postcopy-sidecar.runner=$$")
	local d
	for d in /dev/kvm /dev/userfaultfd; do
		[ -e "$d" ] && f+=(--device "$d")
	done
	printf '%s\n' "${f[@]}"
}

# Removes lab containers whose runner (the pid in their label) is gone: a run killed before
# it could clean up would otherwise leave VMs running. A live run's containers stay.
remove_stale_containers() {
	local c pid
	while read -r c pid; do
		[ -n "$c" ] || continue
		if ! kill -0 "$pid" 2>/dev/null; then
			say "removing container $c, left by an earlier run (pid $pid is gone)"
			"$DOCKER" rm -f "$c" >/dev/null || true
		fi
	done < <("$DOCKER" ps -a --filter label=postcopy-sidecar.runner \
		--format '{{.Names}} {{.Label "postcopy-sidecar.runner"}}')
}
