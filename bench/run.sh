#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# `make bench`: measure fan-out density and restore latency.
#
#   density: N = 8, 50, 200, 1000 clones x 256 MiB, all alive at once, in
#            cow and cow-huge; copy only while N x 256 MiB fits in ~12 GiB
#            (N = 8); workload read (every guest reads every page).
#   latency: restore call -> guest's first exit, p50/p99 over 200 clones at
#            concurrency 1 and 8, cow and cow-huge (workload none).
#
# Writes bench/results/fanout-*.json, bench/results/density.json,
# bench/results/density.md (the README table) and bench/results/density.png.
# BENCH_NS="8 50" limits the sizes (BENCH_NS="" runs only the latency part);
# BENCH_LAT_N sets the latency sample;
# BENCH_REPORT_ONLY=1 only rebuilds the table and chart from the JSON files;
# BENCH_MERGE=0 skips the merge-engine-vs-KSM benchmark (bench/merge.sh)
# that otherwise runs at the end.
set -euo pipefail
B=${B:-build}
SP=$B/samepage
OUT=${OUT:-bench/results}
NS=${BENCH_NS-8 50 200 1000}
LAT_N=${BENCH_LAT_N:-200}
MAX_COPY_BYTES=$((12 << 30))
mkdir -p "$OUT"
tmp=$(mktemp -d /tmp/samepage-bench.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

if [ "${BENCH_REPORT_ONLY:-0}" != 1 ]; then
[ -e /dev/kvm ] || { echo "bench: /dev/kvm is missing" >&2; exit 69; }
"$SP" snapshot --mem 256M -o "$tmp/golden.ckpt"

fan() { # name mode N workload concurrency
	local f="$OUT/fanout-$1.json"
	echo "bench: $1 ($3 clones, $2, $4, concurrency $5)" >&2
	local t0=$SECONDS
	"$SP" fanout --ckpt "$tmp/golden.ckpt" --mode "$2" --clones "$3" --workload "$4" \
		--concurrency "$5" --jobs 4 --json --quiet >"$f.tmp"
	mv "$f.tmp" "$f"
	echo "bench:   done in $((SECONDS - t0)) s" >&2
}
for n in $NS; do
	if [ $((n * 258 << 20)) -le $MAX_COPY_BYTES ]; then
		fan "density-copy-$n" copy "$n" read 1
	fi
	fan "density-cow-$n" cow "$n" read 1
	fan "density-cow-huge-$n" cow-huge "$n" read 1
done
for mode in cow cow-huge; do
	for k in 1 8; do
		fan "latency-$mode-c$k" "$mode" "$LAT_N" none "$k"
	done
done
fi

# one JSON array, one markdown table, one chart
{
	echo "["
	first=1
	for f in "$OUT"/fanout-*.json; do
		[ $first = 1 ] || echo ","
		first=0
		printf '{"run":"%s","result":' "$(basename "$f" .json)"
		tr -d '\n' <"$f"
		printf '}'
	done
	echo "]"
} >"$OUT/density.json"

field() { grep -o "\"$2\":[^,}]*" "$1" | head -1 | cut -d: -f2 | tr -d '"'; }
{
	echo "| mode | N | guest | naive | measured increase | template | per-VM | ratio | private anon/VM | page tables/VM | KVM page tables/VM | other kernel/VM | restore p50 / p99 |"
	echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
	for f in "$OUT"/fanout-density-*.json; do
		awk -v RS=',' -F: '
			{v=$NF}
			/"mode"/ {gsub(/"/,"",v); m=v}
			/"clones"/ && !c {c=v}
			/"guest_bytes"/ {g=v}
			/"naive_bytes"/ {nv=v}
			/"increase_bytes"/ {inc=v}
			/"template_bytes"/ {t=v}
			/"per_vm_bytes"/ {pv=v}
			/"ratio"/ {r=v}
			/"private_anon_bytes"/ {a=v}
			/"pagetables_bytes"/ && !/kvm/ {pt=v}
			/"kvm_pagetables_bytes"/ {kp=v}
			/"other_kernel_bytes"/ {ok=v}
			/"p50"/ {p50=v}
			/"p99"/ {p99=v}
			END {M=1048576; printf "| %s | %d | %d MiB | %.0f MiB | %.1f MiB | %.1f MiB | **%.2f MiB** | **%.1f** | %.2f MiB | %.2f MiB | %.2f MiB | %.2f MiB | %.2f / %.2f ms |\n",
				m, c, g/M, nv/M, inc/M, t/M, pv/M, r, a/c/M, pt/c/M, kp/c/M, ok/c/M, p50, p99}' "$f"
	done | sort -t'|' -k2,2 -k3,3n
	echo
	echo "Restore latency (restore call to the guest's first exit, $LAT_N clones, workload none):"
	echo
	echo "| mode | concurrency | p50 | p99 | max |"
	echo "|---|---:|---:|---:|---:|"
	for f in "$OUT"/fanout-latency-*.json; do
		printf '| %s | %s | %.2f ms | %.2f ms | %.2f ms |\n' "$(field "$f" mode)" "$(field "$f" concurrency)" \
			"$(field "$f" p50)" "$(field "$f" p99)" "$(field "$f" max)"
	done
	echo
	echo "Measured $(date -u +%Y-%m-%d) on $(nproc) cores, kernel $(uname -r)."
} >"$OUT/density.md"

# chart: per-VM overhead against N, one line per mode
for mode in copy cow cow-huge; do
	for f in "$OUT"/fanout-density-"$mode"-*.json; do
		[ -e "$f" ] || continue
		[ "$(field "$f" mode)" = "$mode" ] || continue
		echo "$(field "$f" clones) $(field "$f" per_vm_bytes)"
	done | sort -n >"$tmp/$mode.dat"
done
if command -v gnuplot >/dev/null; then
	gnuplot <<GP
set terminal pngcairo size 900,540 font ",11" noenhanced
set output "$OUT/density.png"
set title "samepage fan-out: host memory per 256 MiB clone (workload: read every page)"
set xlabel "clones alive at once (N)"
set ylabel "per-VM overhead (MiB, log scale)"
set logscale xy
set grid
set key top right
set xrange [5:1500]
plot "$tmp/copy.dat" using 1:(\$2/1048576) with linespoints lw 2 pt 7 title "copy (read() into private memory)", \
     "$tmp/cow.dat" using 1:(\$2/1048576) with linespoints lw 2 pt 5 title "cow (MAP_PRIVATE template)", \
     "$tmp/cow-huge.dat" using 1:(\$2/1048576) with linespoints lw 2 pt 9 title "cow-huge (2 MiB template)"
GP
fi
cat "$OUT/density.md"
if [ "${BENCH_MERGE:-1}" = 1 ] && [ "${BENCH_REPORT_ONLY:-0}" != 1 ] && [ -f bench/merge.sh ]; then
	B=$B OUT=$OUT bash bench/merge.sh
fi
