#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# `make demo`: snapshot a 256 MiB probe guest, fan it out in each mode and
# print the density table (the seed's table: N, naive cost, measured
# increase, per-VM overhead, ratio). Needs /dev/kvm and root (memory cgroup).
set -euo pipefail
B=${B:-build}
SP=$B/samepage
N=${DEMO_CLONES:-16}
NCOPY=${DEMO_COPY_CLONES:-8}
dir=$(mktemp -d /tmp/samepage-demo.XXXXXX)
trap 'rm -rf "$dir"' EXIT

if [ ! -e /dev/kvm ]; then
	echo "demo: /dev/kvm is missing: samepage needs KVM to run its probe guests" >&2
	exit 69
fi
echo "== snapshot: a 256 MiB probe guest fills its memory and stops"
"$SP" snapshot --mem 256M -o "$dir/golden.ckpt"
"$SP" ckpt info "$dir/golden.ckpt"
"$SP" ckpt verify "$dir/golden.ckpt"

rows=()
run() { # mode clones
	echo
	echo "== fan-out: $2 clones, mode $1, workload read (each guest reads every page)"
	"$SP" fanout --ckpt "$dir/golden.ckpt" --clones "$2" --mode "$1" --workload read \
		--json --quiet >"$dir/$1.json"
	rows+=("$dir/$1.json")
	field() { grep -o "\"$1\":[^,}]*" "$dir/$2.json" | head -1 | cut -d: -f2; }
	printf '  increase %s bytes, per-VM %s bytes, ratio %s, restore p50 %s ms\n' \
		"$(field increase_bytes "$1")" "$(field per_vm_bytes "$1")" "$(field ratio "$1")" "$(field p50 "$1")"
}
run copy "$NCOPY"
run cow "$N"
run cow-huge "$N"

echo
echo "== density table (256 MiB guests, workload read; measured in the run's memory cgroup)"
printf '%-9s | %5s | %10s | %12s | %10s | %9s | %6s | %11s\n' mode N naive increase template per-VM ratio "restore p50"
for f in "${rows[@]}"; do
	awk -v RS=',' -F: '
		/"mode"/ {gsub(/"/,"",$2); m=$2}
		/"clones"/ && !c {c=$2}
		/"naive_bytes"/ {nv=$2}
		/"increase_bytes"/ {inc=$2}
		/"template_bytes"/ {t=$2}
		/"per_vm_bytes"/ {pv=$2}
		/"ratio"/ {r=$2}
		/"p50"/ {p=$2}
		END {printf "%-9s | %5d | %6.0f MiB | %8.1f MiB | %6.1f MiB | %5.2f MiB | %6.1f | %8.2f ms\n",
			m, c, nv/1048576, inc/1048576, t/1048576, pv/1048576, r, p}' "$f"
done
echo
echo "copy = read() into private memory (what bhyve -r does); cow = MAP_PRIVATE of a"
echo "sealed template; cow-huge = the same on a 2 MiB huge-page template."

echo
echo "== merge engine: $NCOPY cow clones each write the same 10% of their memory;"
echo "   the engine shares it again (Path B)"
"$SP" fanout --ckpt "$dir/golden.ckpt" --clones "$NCOPY" --mode cow --workload same:10% \
	--merge --ctl-socket "$dir/ctl.sock" --quiet | grep -E '^ +N |^ +[0-9]+ \||^merge'

