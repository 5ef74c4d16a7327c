#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Run every samepage test binary under $B/tests (unit first, then KVM),
# each with a time limit, then the CLI test scripts and the fuzz targets
# briefly over the seed corpus. Prints one line per test and the closing
# line "N passed, N failed, N skipped". Exit status is non-zero if any
# failed. With arguments (e.g. unit/test_merge), runs only those binaries.
set -u
B=${B:-build}
pass=0 fail=0 skip=0
failed=()
run_one() { # name timeout cmd...
	local name=$1 limit=$2; shift 2
	local log; log=$(mktemp)
	local t0=$SECONDS
	timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
	local rc=$?
	local dt=$((SECONDS - t0))
	case $rc in
	0) pass=$((pass + 1)); printf 'PASS  %-40s %4ds  %s\n' "$name" "$dt" "$(grep -E '^[0-9]+%: Checks' "$log" | tail -1)";;
	77) skip=$((skip + 1)); printf 'SKIP  %-40s %s\n' "$name" "$(grep -m1 SKIP "$log")";;
	*) fail=$((fail + 1)); failed+=("$name"); printf 'FAIL  %-40s %4ds (exit %d)\n' "$name" "$dt" "$rc"; sed 's/^/    | /' "$log" | tail -40;;
	esac
	rm -f "$log"
}
if [ $# -gt 0 ]; then
	for t in "$@"; do
		if [ -x "$B/tests/$t" ]; then run_one "$t" 300 "$B/tests/$t"
		else fail=$((fail + 1)); failed+=("$t"); echo "FAIL  $t: $B/tests/$t not built"; fi
	done
	[ ${#failed[@]} -eq 0 ] || echo "failed: ${failed[*]}"
	echo "$pass passed, $fail failed, $skip skipped"
	[ "$fail" -eq 0 ]
	exit
fi
for t in "$B"/tests/unit/test_* "$B"/tests/kvm/test_*; do
	[ -x "$t" ] || continue
	run_one "${t#"$B"/tests/}" 300 "$t"
done
for t in tests/*.sh; do
	[ "$t" = tests/run.sh ] && continue
	[ -f "$t" ] || continue
	run_one "$t" 300 env B="$B" bash "$t"
done
if [ -d "$B/fuzz" ]; then
	for f in "$B"/fuzz/fuzz_*; do
		[ -x "$f" ] || continue
		n=${f##*/}; corpus=tests/fuzz/corpus/${n#fuzz_}
		mkdir -p "$corpus"
		scratch=$(mktemp -d)
		run_one "fuzz/$n (20k runs)" 120 "$f" -runs=20000 -seed=1 "$scratch" "$corpus"
		rm -rf "$scratch"
	done
fi
[ ${#failed[@]} -eq 0 ] || echo "failed: ${failed[*]}"
echo "$pass passed, $fail failed, $skip skipped"
[ "$fail" -eq 0 ]
