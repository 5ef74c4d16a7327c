#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# The merge benchmark (issue 3): samepage's merge engine against Linux KSM on
# the same workloads, in one run.
#
#   For each workload (same:P%, scatter:P%, zero:P%, revert:P% on N cow
#   clones of one 256 MiB checkpoint): the engine (fanout --merge), ksmd at
#   its fastest knobs (pages_to_scan 10000, sleep_millisecs 0) and ksmd at
#   its defaults (100 / 20 ms): time to 95% of the final saving, time to
#   converge, CPU seconds, final saving, cgroup cross-check; CPU once
#   converged with nothing changing (engine owner vs ksmd); engine metadata
#   bytes per candidate page. Every writable /sys/kernel/mm/ksm knob is saved
#   first and restored at the end, also on failure, SIGINT and SIGTERM.
#   Alternating with those, for same and scatter: the floor
#   ($B/bench/merge_floor), what the clones' share of merging (compare each
#   page with its frame, map the frame file over it) costs here with no KVM
#   and no engine, against which the targets are held.
#
# Writes bench/results/merge-vs-ksm.json (every run's raw numbers and KSM's
# time series), merge-vs-ksm.md (the table and the targets) and
# merge-vs-ksm.png (time to 95% per workload, log scale); prints the table.
# Needs root and /dev/kvm. Runs for a few minutes, ksmd at defaults dominating.
#
#   MERGE_N=8                 clones
#   MERGE_P=10                percent of each clone's data pages the workload touches
#   MERGE_MEM=256M            guest size of the checkpoint
#   MERGE_WORKLOADS="same scatter zero revert"
#   MERGE_REPEAT=3            runs of the engine and of ksmd at its fastest per
#                             workload, alternating; the tables show the median
#   MERGE_KSM_DEFAULTS=1      0 skips ksmd at its default knobs (the slow part)
#   MERGE_KSM_ZERO=0          KSM use_zero_pages for workloads other than zero
#                             (zero always runs both sides with zero pages on)
#   MERGE_IDLE_S=20           idle window after convergence (0: skip)
#   MERGE_IDLE_WORKLOADS=same workloads that get the idle measurement
#   MERGE_KSM_CAP_S=600       give up waiting for ksmd at defaults after this
#   MERGE_FLOOR=1             0 skips the floor ($B/bench/merge_floor: the clones'
#                             compare-and-map alone, for same and scatter)
set -euo pipefail
B=${B:-build}
SP=$B/samepage
OUT=${OUT:-bench/results}
N=${MERGE_N:-8}
P=${MERGE_P:-10}
MEM=${MERGE_MEM:-256M}
WLS=${MERGE_WORKLOADS:-same scatter zero revert}

[ -e /dev/kvm ] || { echo "bench: /dev/kvm is missing" >&2; exit 69; }
[ "$(id -u)" = 0 ] || { echo "bench: the KSM side needs root" >&2; exit 77; }
[ -d /sys/kernel/mm/ksm ] || { echo "bench: no /sys/kernel/mm/ksm (kernel without KSM)" >&2; exit 69; }
[ -x "$SP" ] || { echo "bench: $SP is missing (run make)" >&2; exit 66; }
floor=()
if [ "${MERGE_FLOOR:-1}" = 1 ]; then
	[ -x "$B/bench/merge_floor" ] || { echo "bench: $B/bench/merge_floor is missing (run make bench)" >&2; exit 66; }
	floor=(--floor "$B/bench/merge_floor")
fi
mkdir -p "$OUT"
tmp=$(mktemp -d /tmp/samepage-merge.XXXXXX)
py=
cleanup() { rm -rf "$tmp"; }
# the helper restores the KSM knobs itself; pass it our signals and wait
forward() {
	trap '' INT TERM
	[ -n "$py" ] && kill -TERM "$py" 2>/dev/null
	[ -n "$py" ] && wait "$py"
	cleanup
	exit 130
}
trap cleanup EXIT
trap forward INT TERM

"$SP" snapshot --mem "$MEM" -o "$tmp/golden.ckpt" >&2
python3 "$(dirname "$0")/merge_vs_ksm.py" --sp "$SP" --ckpt "$tmp/golden.ckpt" --mem "$MEM" \
	--out "$OUT" --tmp "$tmp" --clones "$N" --pct "$P" --workloads "$WLS" \
	--repeat "${MERGE_REPEAT:-3}" --ksm-defaults "${MERGE_KSM_DEFAULTS:-1}" --ksm-zero "${MERGE_KSM_ZERO:-0}" \
	--idle "${MERGE_IDLE_S:-20}" --idle-workloads "${MERGE_IDLE_WORKLOADS:-same}" \
	--cap-default "${MERGE_KSM_CAP_S:-600}" "${floor[@]}" &
py=$!
wait "$py"
