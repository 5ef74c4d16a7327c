#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# The merge floor rig (bench/merge_floor.c) that `make bench` runs: it must
# merge every page it wrote (each compared with its frame first, so a
# wrong frame layout fails the run), in the mappings its shape implies, and
# refuse bad arguments with one line and EX_USAGE.
set -u
here=$(dirname "$0")
. "$here/lib/cli.sh"
FL=$B/bench/merge_floor
[ -x "$FL" ] || { echo "FAIL: $FL not built"; exit 1; }

"$FL" --workload bogus >"$tmp/out" 2>"$tmp/err"
[ $? = 64 ] && grep -q '^merge_floor: ' "$tmp/err" && ok "bad workload refused" || fail "bad workload: $(cat "$tmp/err")"
"$FL" --workload same --pct 90 >"$tmp/out" 2>"$tmp/err"
[ $? = 64 ] && ok "pct out of range refused" || fail "pct 90 accepted"
"$FL" --workload same --clones 3x >"$tmp/out" 2>"$tmp/err"
[ $? = 64 ] && ok "a malformed count refused" || fail "--clones 3x accepted"
"$FL" --help >"$tmp/out" && grep -q -- '--workload same|scatter' "$tmp/out" && ok "--help" || fail "--help"

# 8 MiB clones (1,536 data pages), 10% of them written
for wl in same scatter; do
	if ! "$FL" --workload $wl --clones 3 --mem 8M >"$tmp/$wl.json" 2>"$tmp/err"; then
		fail "$wl: $(cat "$tmp/err")"
		continue
	fi
	python3 - "$tmp/$wl.json" $wl <<'PY' && ok "$wl: every page compared and merged" || fail "$wl: $(cat "$tmp/$wl.json")"
import json, sys
d = json.load(open(sys.argv[1]))
# every clone merges every page it wrote, one frame per distinct content
assert 64 <= d["frames"] <= 512 and d["pages_merged"] == 3 * d["frames"], d
# same: whole runs of 64 adjacent pages map at once (neighbouring runs join);
# scatter: at most one mapping per page (adjacent blocks share one)
if sys.argv[2] == "same":
    assert d["frames"] % 64 == 0 and 3 <= d["mmap_calls"] <= 3 * d["frames"] // 64, d
else:
    assert d["frames"] == 1536 * 1000 // 10000 and 3 < d["mmap_calls"] <= 3 * d["frames"], d
assert 0 < d["together_t95_s"] <= d["together_wall_s"], d
assert d["alone_cpu_s"] > d["alone_compare_cpu_s"] > 0, d
assert abs(d["bound_t95_s"] - 0.95 * d["alone_cpu_s"] / d["cpus"]) < 1e-3, d
PY
done

# KVM clones of a real checkpoint: the guest writes the pages itself, so a
# frame that differs from what it wrote fails the comparison
if [ -r /dev/kvm ]; then
	"$SP" snapshot --mem 16M -o "$tmp/g.ckpt" 2>/dev/null || fail "snapshot"
	for wl in same scatter; do
		if ! "$FL" --workload $wl --clones 2 --ckpt "$tmp/g.ckpt" >"$tmp/$wl.json" 2>"$tmp/err"; then
			fail "$wl on KVM: $(cat "$tmp/err")"
			continue
		fi
		python3 - "$tmp/$wl.json" <<'PY' && ok "$wl on KVM clones: every page the guests wrote merged" || fail "$wl on KVM: $(cat "$tmp/$wl.json")"
import json, sys
d = json.load(open(sys.argv[1]))
assert d["kvm"] is True and d["guest_bytes"] == 16 << 20, d
assert d["frames"] > 0 and d["pages_merged"] == 2 * d["frames"], d
PY
	done
	"$FL" --workload same --ckpt "$tmp/nonexistent.ckpt" >"$tmp/out" 2>"$tmp/err"
	[ $? = 66 ] && grep -q '^merge_floor: ' "$tmp/err" && ok "missing checkpoint refused" \
		|| fail "missing checkpoint: $(cat "$tmp/err")"
else
	echo "SKIP: KVM clone checks need /dev/kvm"
fi
finish
