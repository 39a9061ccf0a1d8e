#!/usr/bin/env bash
# Runs the postcopy interop case across QEMU releases, each end in its own container:
# a source container from one image runs our Linux guest and its memory workload, a
# destination container from the other image runs QEMU with -incoming defer and the sidecar
# (`postcopy-sidecar receive`); `postcopy-sidecar send` in the source container migrates the
# guest through the sidecar, asking for postcopy at once (QEMU switches at its first
# iteration, so no pair can converge in precopy and pass without postcopy).
#
# A pair passes when the sidecar's report says completed with the destination running, after
# a switch to postcopy (POSTCOPY_LISTEN and RUN forwarded, pages carried in postcopy), and
# the destination's console shows the workload progressing after the migration with
# mismatches=0 and no `WL mismatch`/`WL fatal` line (the source's console must be clean too).
#
# Pairs: 7.2:7.2, 10.0:10.0, 7.2:10.0 (source:destination). 10.0 -> 7.2 is never run: QEMU
# supports migration to the same or a newer release only.
#
# Usage: docker/run-interop.sh [--pairs 7.2:7.2,10.0:10.0,7.2:10.0] [--no-build]
#                              [--accel auto|kvm|tcg] [--keep]
#   --no-build  use the images as they are (fails if one is missing) instead of running
#               docker/build-images.sh first (which is cached and quick when nothing changed)
#   --accel     auto (default): KVM if our guest boots under it in the images, else TCG
#   --keep      keep the run directory (QMP sockets, consoles, logs, reports) after a pass
# Needs root, docker.io and debootstrap (scripts/setup.sh), and the guest kernel and
# initramfs under .cache/guest/ (scripts/setup.sh). Fails loudly, never skips.
set -euo pipefail
# shellcheck source=docker/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PAIRS="7.2:7.2,10.0:10.0,7.2:10.0"
BUILD=1
ACCEL="${POSTCOPY_SIDECAR_ACCEL:-auto}"
KEEP=0
while [ $# -gt 0 ]; do
	case "$1" in
	--pairs)
		PAIRS="${2:?--pairs needs a list}"
		shift
		;;
	--pairs=*) PAIRS="${1#--pairs=}" ;;
	--no-build) BUILD=0 ;;
	--accel)
		ACCEL="${2:?--accel needs auto, kvm or tcg}"
		shift
		;;
	--accel=*) ACCEL="${1#--accel=}" ;;
	--keep) KEEP=1 ;;
	-h | --help)
		sed -n '2,/^set -e/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
		exit 0
		;;
	*) die "unknown argument: $1 (see --help)" ;;
	esac
	shift
done
case "$ACCEL" in auto | kvm | tcg) ;; *) die "--accel must be auto, kvm or tcg, not $ACCEL" ;; esac

# Guest sizes: the interop tests' (tests/receive.rs): 256 MiB of RAM, 96 MiB of it filled
# and verified by the workload, a 16 MiB hot set rewritten all the time.
VM_ARGS=(--ram-mib 256 --workload-mib 96 --mode hot --hot-mib 16 --seed 11)
BOOT_SECS=300      # source: boot and fill under TCG on two busy cores
LISTEN_SECS=60     # the sidecar: configure the destination and listen
MIGRATION_SECS=600 # send's own limit
PROGRESS_SECS=180  # two fresh progress lines on the destination

# --- which pairs -----------------------------------------------------------------------------
declare -a RUN=()
IFS=',' read -r -a requested <<<"$PAIRS"
for p in "${requested[@]}"; do
	case "$p" in
	7.2:7.2 | 10.0:10.0 | 7.2:10.0) RUN+=("$p") ;;
	10.0:7.2) die "10.0:7.2 is not a valid pair: QEMU supports migration to the same or a newer release only" ;;
	*) die "unknown pair $p (use 7.2:7.2, 10.0:10.0, 7.2:10.0)" ;;
	esac
done
[ "${#RUN[@]}" -gt 0 ] || die "no pairs to run"
say "pairs: ${RUN[*]} (source:destination)"
say "not run: 10.0:7.2 -- QEMU supports migration to the same or a newer release only"

GUEST_DIR="${POSTCOPY_SIDECAR_CACHE:-$REPO/.cache}/guest"
for f in vmlinuz initramfs.cpio.gz; do
	[ -s "$GUEST_DIR/$f" ] || die "no guest $f in $GUEST_DIR: run scripts/setup.sh"
done
[ "$(id -u)" = 0 ] || die "run as root (docker, /dev/kvm, /dev/userfaultfd)"

START=$SECONDS
ensure_dockerd
# One trap for the whole run: pair subshells clean up their own containers; this stops the
# daemon if this script started it.
trap stop_dockerd EXIT
trap 'exit 130' INT TERM

if [ "$BUILD" = 1 ]; then
	t0=$SECONDS
	"$DOCKER_DIR/build-images.sh"
	say "images: $((SECONDS - t0))s"
fi
image() { echo "$IMAGE_PREFIX/interop-$1"; }
for p in "${RUN[@]}"; do
	for v in "${p%%:*}" "${p##*:}"; do
		"$DOCKER" image inspect "$(image "$v")" >/dev/null 2>&1 ||
			die "image $(image "$v") is missing: run docker/build-images.sh (or drop --no-build)"
	done
done

RUNS="$(mktemp -d "${TMPDIR:-/tmp}/postcopy-interop.XXXXXX")"
say "run directory: $RUNS"

remove_stale_containers

# Flags of every lab container (see lab_container_flags), plus the guest files, read-only.
SECCOMP="$(seccomp_profile)"
mapfile -t FLAGS < <(lab_container_flags "$SECCOMP")
FLAGS+=(-v "$GUEST_DIR:/lab-cache/guest:ro" -e POSTCOPY_SIDECAR_CACHE=/lab-cache)
say "container flags: ${FLAGS[*]}"
[ -e /dev/kvm ] || say "no /dev/kvm on this host: QEMU runs under TCG"
[ -e /dev/userfaultfd ] || say "no /dev/userfaultfd on this host: QEMU uses the userfaultfd(2) syscall"

# --- the accelerator -------------------------------------------------------------------------

# KVM only where our guest actually boots under it: /dev/kvm can exist while a nested guest
# hangs early in boot. The lab's probe (lab-vm probe-accel) boots the guest under KVM with
# the image's own QEMU and keeps KVM only if the workload's first line shows up in 10 s.
# Both ends of a migration must use the same accelerator. Sets PAIR_ACCEL (not printed:
# the probes are cached in this shell, so this must not run in a command substitution).
declare -A PROBED=()
PAIR_ACCEL=""
accel_for() {
	local v
	if [ "$ACCEL" != auto ]; then
		PAIR_ACCEL="$ACCEL"
		return
	fi
	for v in "$@"; do
		if [ -z "${PROBED[$v]:-}" ]; then
			local t0=$SECONDS
			PROBED[$v]="$("$DOCKER" run --rm "${FLAGS[@]}" "$(image "$v")" lab-vm probe-accel --qemu "$v")" ||
				die "the accelerator probe failed in $(image "$v")"
			case "${PROBED[$v]}" in
			kvm) say "accelerator probe with QEMU $v: the guest boots under KVM ($((SECONDS - t0))s)" ;;
			tcg) say "accelerator probe with QEMU $v: $(
				[ -e /dev/kvm ] && echo "the guest does not boot under KVM here (nested?)" ||
					echo "no /dev/kvm"
			), using TCG ($((SECONDS - t0))s)" ;;
			*) die "unexpected probe answer from $(image "$v"): ${PROBED[$v]}" ;;
			esac
		fi
	done
	PAIR_ACCEL=kvm
	for v in "$@"; do [ "${PROBED[$v]}" = kvm ] || PAIR_ACCEL=tcg; done
}

# --- one pair --------------------------------------------------------------------------------

# Runs in a subshell with errexit on: the first failing step ends the pair with its reason.
run_pair() {
	local s="$1" d="$2" accel="$3"
	local id="postcopy-interop-$$-$s-to-$d" dir="$RUNS/$s-to-$d" machine=q35
	local t0=$SECONDS
	# Globals of this pair's subshell, so its EXIT trap still sees them after run_pair.
	PIDS=()
	CONTAINERS=()
	# Across releases both ends use the older release's versioned machine type, which the
	# newer release keeps for exactly this.
	[ "$s" = "$d" ] || machine="pc-q35-$s"
	mkdir -p "$dir"
	# shellcheck disable=SC2317 # called by the trap below
	cleanup_pair() {
		local p
		for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
		[ "${#CONTAINERS[@]}" -eq 0 ] || "$DOCKER" rm -f "${CONTAINERS[@]}" >/dev/null 2>&1 || true
	}
	trap cleanup_pair EXIT
	trap 'exit 130' INT TERM
	fail() {
		local f
		printf '[docker] FAIL %s -> %s: %s\n' "$s" "$d" "$*" >&2
		for f in "$dir"/*.log "$dir"/*.out; do
			[ -s "$f" ] || continue
			printf '[docker] --- last lines of %s\n' "$f" >&2
			tail -n 25 "$f" >&2
		done
		printf '[docker] (everything is in %s)\n' "$dir" >&2
		exit 1
	}
	# start_vm ROLE QEMU_VERSION EXTRA...: one container running lab-vm, its output followed
	# into DIR/ROLE.lab-vm.log by `docker logs -f`. Sets ROLE_pid to the container's init:
	# waits on that container's files end as soon as it stops.
	start_vm() {
		local role="$1" v="$2"
		shift 2
		"$DOCKER" run -d --name "$id-$role" "${FLAGS[@]}" -v "$dir:$dir" "$(image "$v")" \
			lab-vm run --name "$role" --dir "$dir" --qemu "$v" --machine "$machine" \
			--accel "$accel" "${VM_ARGS[@]}" "$@" >/dev/null || fail "cannot start the $role container"
		CONTAINERS+=("$id-$role")
		"$DOCKER" logs -f "$id-$role" >"$dir/$role.lab-vm.log" 2>&1 &
		PIDS+=($!)
		local p
		p="$(container_pid "$id-$role")" || fail "the $role container stopped at once"
		printf -v "${role}_pid" '%s' "$p"
	}

	say "=== $s -> $d: source in $(image "$s"), destination in $(image "$d"), machine $machine, $accel"
	local src_pid dst_pid
	start_vm src "$s"
	start_vm dst "$d" --incoming
	wait_line "$dir/src.lab-vm.log" '^lab-vm: src: READY' 1 "$BOOT_SECS" "$src_pid" >/dev/null ||
		fail "the source VM did not become ready (guest boot and workload fill)"
	wait_line "$dir/dst.lab-vm.log" '^lab-vm: dst: READY' 1 "$LISTEN_SECS" "$dst_pid" >/dev/null ||
		fail "the destination VM did not start"
	grep -h '^lab-vm: [a-z]*: ' "$dir/src.lab-vm.log" "$dir/dst.lab-vm.log" | grep -v ': qmp ' |
		sed 's/^/[docker]   /'
	local t_ready=$SECONDS

	# The sidecar in the destination container, on a port the kernel picks; its
	# "waiting for the source" log line says it listens and names the port. `timeout`
	# bounds the wait for its exit below; it prints "error: ..." when it gives up.
	timeout "$((LISTEN_SECS + MIGRATION_SECS + 120))" \
		"$DOCKER" exec -e RUST_LOG=postcopy_sidecar=info -e NO_COLOR=1 "$id-dst" \
		postcopy-sidecar receive --qmp "$dir/dst.qmp2" --listen 127.0.0.1:0 \
		--report "$dir/report.json" --quiet >"$dir/receive.out" 2>"$dir/receive.log" &
	local recv=$!
	PIDS+=("$recv")
	local line port
	line="$(wait_lines "$dir/receive.log" 'waiting for the source' '^error: |panicked' 1 1 \
		"$LISTEN_SECS" "$dst_pid")" || fail "the sidecar did not get to listening"
	[[ "$line" =~ listen=[0-9.]+:([0-9]+) ]] || fail "no port in the sidecar's line: $line"
	port="${BASH_REMATCH[1]}"

	# The source, driven from its own container to the sidecar over the host's loopback.
	if ! "$DOCKER" exec "$id-src" postcopy-sidecar send --qmp "$dir/src.qmp2" \
		--to "127.0.0.1:$port" --postcopy-after 0 --timeout "$MIGRATION_SECS" \
		>"$dir/send.json" 2>"$dir/send.log"; then
		fail "postcopy-sidecar send failed: $(tr -d '\n' <"$dir/send.json") $(cat "$dir/send.log")"
	fi
	local rc=0
	wait "$recv" || rc=$?
	[ "$rc" = 0 ] || fail "postcopy-sidecar receive exited $rc$([ "$rc" != 124 ] || echo " (timed out)")"
	grep -q '^migration completed' "$dir/receive.out" || fail "the sidecar's report table says otherwise"
	grep -q '"outcome": "completed"' "$dir/report.json" || fail "report outcome is not completed"
	grep -q '"running": true' "$dir/report.json" || fail "report says the destination is not running"
	local postcopy
	postcopy="$(postcopy_evidence "$dir/report.json")" || fail "the migration did not go through postcopy: $postcopy"
	say "  postcopy: $postcopy"
	local t_migrated=$SECONDS
	sed 's/^/[docker]   /' "$dir/receive.out"
	say "  source: $(tr -d ' \n' <"$dir/send.json" | sed -e 's/^{//' -e 's/}$//' -e 's/,"/, "/g')"

	# The guest on the destination: fresh progress lines after the migration, all clean.
	local from
	from=$(($(wc -l <"$dir/dst.serial.log") + 1))
	wait_lines "$dir/dst.serial.log" '^WL progress .*mismatches=0( |$)' \
		'^WL (mismatch|fatal)|^WL progress .*mismatches=[1-9]' 2 "$from" "$PROGRESS_SECS" \
		"$dst_pid" | sed 's/^/[docker]   destination after the migration: /' ||
		fail "the destination guest did not make clean progress after the migration"
	local role
	for role in src dst; do
		if grep -qE '^WL (mismatch|fatal)|^WL progress .*mismatches=[1-9]' "$dir/$role.serial.log"; then
			fail "the $role guest reported bad memory: $(grep -m3 -E '^WL (mismatch|fatal)|mismatches=[1-9]' "$dir/$role.serial.log")"
		fi
	done
	say "PASS $s -> $d in $((SECONDS - t0))s (VMs ready $((t_ready - t0))s," \
		"migration $((t_migrated - t_ready))s, guest check $((SECONDS - t_migrated))s)"
}

# Prints what shows the migration went through postcopy (from the sidecar's report), and
# fails when it did not: a pair that converged in precopy has not tested postcopy.
postcopy_evidence() {
	python3 - "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
t, p = r["timeline"], r["postcopy"]
pages = p["pages"] + p["zero_pages"]
print(f"listen at {t['listen_ms']} ms, run at {t['run_ms']} ms, {pages} pages in postcopy, "
      f"{r['requests']['messages']} page requests")
sys.exit(0 if t["listen_ms"] is not None and t["run_ms"] is not None and pages > 0 else 1)
PY
}

# --- all pairs -------------------------------------------------------------------------------

declare -a SUMMARY=()
FAILED=0
for p in "${RUN[@]}"; do
	s="${p%%:*}"
	d="${p##*:}"
	accel_for "$s" "$d"
	accel="$PAIR_ACCEL"
	t0=$SECONDS
	set +e
	(
		set -e
		run_pair "$s" "$d" "$accel"
	)
	rc=$?
	set -e
	# Interrupted (SIGINT/SIGTERM): stop here, the pair's containers are already gone.
	[ "$rc" -lt 128 ] || die "interrupted during $s -> $d (run directory: $RUNS)"
	if [ "$rc" = 0 ]; then
		SUMMARY+=("PASS $s -> $d ($accel) $((SECONDS - t0))s")
	else
		SUMMARY+=("FAIL $s -> $d ($accel) $((SECONDS - t0))s")
		FAILED=1
	fi
done

say "summary ($((SECONDS - START))s in all):"
for l in "${SUMMARY[@]}"; do say "  $l"; done
say "  not run: 10.0 -> 7.2 (migration goes to the same or a newer QEMU release only)"
if [ "$FAILED" = 0 ] && [ "$KEEP" = 0 ]; then
	rm -rf "$RUNS"
else
	say "run directory kept: $RUNS"
fi
exit "$FAILED"
