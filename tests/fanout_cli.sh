#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# The `samepage snapshot` and `samepage fanout` commands as a user drives
# them: bad input gets one clear line and the documented exit code; --json
# is parseable and carries the table's fields; --hold prints the ready line,
# keeps the clones alive with their guest RAM where it says, and tears
# everything down on SIGTERM (no process, cgroup or mount left behind).
set -u
here=$(dirname "$0")
. "$here/lib/cli.sh"
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
	echo "SKIP: /dev/kvm is not available: fan-out CLI tests not run"
	exit 77
fi
[ "$(id -u)" = 0 ] || { echo "SKIP: needs root (memory cgroup, huge tmpfs)"; exit 77; }

expect_exit 0 "snapshot 16M" "$SP" snapshot --mem 16M --zero-pct 10 -o "$tmp/g.ckpt"
expect_exit 64 "snapshot without -o" "$SP" snapshot --mem 16M
expect_exit 64 "snapshot bad --mem" "$SP" snapshot --mem 3M -o "$tmp/x"
expect_exit 64 "snapshot bad --zero-pct" "$SP" snapshot --zero-pct 101 -o "$tmp/x"
expect_exit 73 "snapshot into a missing directory" "$SP" snapshot --mem 16M -o "$tmp/no/such/dir/x"
expect_exit 64 "fanout without --clones" "$SP" fanout --ckpt "$tmp/g.ckpt"
expect_exit 64 "fanout bad mode" "$SP" fanout --ckpt "$tmp/g.ckpt" --clones 2 --mode cow-tiny
expect_exit 64 "fanout bad workload" "$SP" fanout --ckpt "$tmp/g.ckpt" --clones 2 --workload write
expect_exit 64 "fanout bad percentage" "$SP" fanout --ckpt "$tmp/g.ckpt" --clones 2 --workload same:150%
expect_exit 64 "fanout zero clones" "$SP" fanout --ckpt "$tmp/g.ckpt" --clones 0
expect_exit 66 "fanout missing checkpoint" "$SP" fanout --ckpt "$tmp/none.ckpt" --clones 2
head -c 100000 "$tmp/g.ckpt" >"$tmp/trunc.ckpt"
expect_exit 65 "fanout truncated checkpoint" "$SP" fanout --ckpt "$tmp/trunc.ckpt" --clones 2
"$SP" --help | grep -q fanout && ok "--help lists fanout" || fail "--help"
"$SP" fanout --help | grep -q -- '--hold' && ok "fanout --help documents --hold" || fail "fanout --help"

# --json: one object with the table's fields, consistent arithmetic
expect_exit 0 "fanout --json" "$SP" fanout --ckpt "$tmp/g.ckpt" --clones 3 --mode cow --workload write:25% --json --quiet --verify
if python3 - "$tmp/out" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for k in ("clones", "naive_bytes", "increase_bytes", "template_bytes", "per_vm_bytes", "ratio", "restore_ms", "breakdown", "pss_sum_bytes"):
    assert k in d, k
assert d["clones"] == 3 and d["naive_bytes"] == 3 * 16 * 2**20
assert d["verified"] is True and d["bad_clones"] == 0
assert abs(d["per_vm_bytes"] - (d["increase_bytes"] - d["template_bytes"]) / 3) < 2
assert abs(d["ratio"] - d["naive_bytes"] / d["increase_bytes"]) < 0.01
# each clone wrote ~25% of its pages (in runs) with data of its own: at least 15% is private
assert d["breakdown"]["private_anon_bytes"] >= 3 * 0.15 * 14 * 2**20, d["breakdown"]
PY
then ok "--json fields and arithmetic"; else fail "--json content: $(cat "$tmp/out")"; fi

# --hold: ready line, clones alive with RAM where it says, clean teardown
for mode in cow cow-huge; do
	"$SP" fanout --ckpt "$tmp/g.ckpt" --clones 3 --mode $mode --workload same:10% --hold --quiet \
		>"$tmp/hold.out" 2>"$tmp/hold.err" &
	holdpid=$!
	for _ in $(seq 300); do grep -q '"ready"' "$tmp/hold.out" 2>/dev/null && break; sleep 0.1; done
	if ! python3 - "$tmp/hold.out" <<'PY'
import json, sys, os
line = [l for l in open(sys.argv[1]) if l.startswith("{")][0]
d = json.loads(line)
assert d["ready"] is True and len(d["clones"]) == 3
for c in d["clones"]:
    assert c["ram_bytes"] == 16 << 20
    maps = open("/proc/%d/maps" % c["pid"]).read()
    start = "%x-" % c["ram_addr"]
    assert any(l.startswith(start) for l in maps.splitlines()), (start, maps)
    # the guest RAM holds the probe's config block (magic "SAMEPAGE")
    with open("/proc/%d/mem" % c["pid"], "rb") as m:
        m.seek(c["ram_addr"] + 0x30000)
        assert m.read(8) == (0x53414d4550414745).to_bytes(8, "little")
open(sys.argv[1] + ".pids", "w").write(" ".join(str(c["pid"]) for c in d["clones"]))
PY
	then fail "--hold ready line ($mode): $(cat "$tmp/hold.out" "$tmp/hold.err" | head -c 600)"; kill -9 $holdpid; holdpid=; continue; fi
	kill -TERM $holdpid
	wait $holdpid
	rc=$?
	holdpid=
	[ $rc = 0 ] && ok "--hold ($mode) exits 0 on SIGTERM" || fail "--hold ($mode) exit $rc"
	left=
	for p in $(cat "$tmp/hold.out.pids"); do kill -0 "$p" 2>/dev/null && left="$left $p"; done
	[ -z "$left" ] && ok "--hold ($mode): clones gone" || fail "--hold ($mode): clones still alive:$left"
done
ls -d /sys/fs/cgroup/memory/samepage-fanout-* /sys/fs/cgroup/memory/*/samepage-fanout-* 2>/dev/null | grep -q . \
	&& fail "a samepage cgroup was left behind" || ok "no cgroup left behind"
ls -d /tmp/samepage-huge-* 2>/dev/null | grep -q . && fail "huge tmpfs mount point left" || ok "no mount point left"

finish
