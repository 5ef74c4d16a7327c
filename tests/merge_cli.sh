#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# `samepage ctl` and `samepage fanout --merge --hold` as an operator uses
# them: names, ranges and refusals with one clear line; live statistics and
# knob changes through the owner's control socket; clean teardown.
set -u
here=$(dirname "$0")
. "$here/lib/cli.sh"
sock=$tmp/ctl.sock
map_count0=$(cat /proc/sys/vm/max_map_count)

# offline: the namespace and its ranges
expect_exit 0 "ctl list" "$SP" ctl list && grep -q '^merge.pages_to_scan ' "$tmp/out" && grep -q '^stats.merge.pages_sharing ' "$tmp/out" \
	|| fail "ctl list misses names"
expect_exit 0 "ctl list --json" "$SP" ctl list --json
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); assert any(x["name"]=="merge.sleep_ms" and x["writable"] for x in d)' "$tmp/out" \
	&& ok "ctl list --json parses" || fail "ctl list --json"
expect_exit 64 "ctl set out of range" "$SP" ctl -s "$sock" set merge.pages_to_scan 0 && grep -q 'out of range' "$tmp/err" || fail "range message"
expect_exit 64 "ctl set not an integer" "$SP" ctl -s "$sock" set merge.sleep_ms fast
expect_exit 64 "ctl set a statistic" "$SP" ctl -s "$sock" set stats.merge.pages_sharing 1
expect_exit 64 "ctl get unknown name" "$SP" ctl -s "$sock" get merge.nonsense
expect_exit 69 "ctl stats without an owner" "$SP" ctl -s "$sock" stats
expect_exit 64 "fanout --domains without --merge" "$SP" fanout --ckpt /nonexistent --clones 2 --domains 2
expect_exit 64 "fanout --merge with copy" "$SP" fanout --ckpt /nonexistent --clones 2 --merge --mode copy

if [ ! -r /dev/kvm ] || [ "$(id -u)" != 0 ]; then
	echo "SKIP: live merge-owner checks need /dev/kvm and root"
	echo "$((fails == 0 ? 1 : 0)) passed, $fails failed"
	[ $fails = 0 ] && exit 77 || exit 1
fi

"$SP" snapshot --mem 16M -o "$tmp/g.ckpt" 2>/dev/null || fail "snapshot"
"$SP" fanout --ckpt "$tmp/g.ckpt" --clones 3 --workload same:10% --merge --ctl-socket "$sock" --hold --quiet \
	>"$tmp/hold.out" 2>"$tmp/hold.err" &
holdpid=$!
for _ in $(seq 600); do grep -q '"ready"' "$tmp/hold.out" 2>/dev/null && break; sleep 0.1; done
grep -q '"ready"' "$tmp/hold.out" || fail "no ready line: $(head -c 500 "$tmp/hold.err")"
grep -q '"owner_pid"' "$tmp/hold.out" && grep -q "\"ctl_socket\":\"$sock\"" "$tmp/hold.out" && ok "ready line names the owner and socket" \
	|| fail "ready line: $(cat "$tmp/hold.out")"
v=$("$SP" ctl -s "$sock" get stats.merge.pages_sharing)
[ "${v:-0}" -gt 0 ] && ok "pages_sharing $v after convergence" || fail "pages_sharing '$v'"
[ "$("$SP" ctl -s "$sock" get stats.merge.converged)" = 1 ] && ok "converged" || fail "not converged"
[ "$("$SP" ctl -s "$sock" get merge.pages_to_scan)" = 100000 ] && [ "$("$SP" ctl -s "$sock" get merge.sleep_ms)" = 0 ] \
	&& ok "the owner's own defaults (docs/knobs.md)" || fail "owner defaults: pages_to_scan $("$SP" ctl -s "$sock" get merge.pages_to_scan)"
expect_exit 0 "ctl set merge.sleep_ms 5" "$SP" ctl -s "$sock" set merge.sleep_ms 5
[ "$("$SP" ctl -s "$sock" get merge.sleep_ms)" = 5 ] && ok "knob reads back" || fail "knob did not change"
expect_exit 64 "max_page_sharing refused while frames are merged" "$SP" ctl -s "$sock" set merge.max_page_sharing 100
grep -qi 'busy\|merged' "$tmp/err" && ok "refusal says why" || fail "refusal message: $(cat "$tmp/err")"
expect_exit 64 "merge_across_domains refused once clones hold their frame files" \
	"$SP" ctl -s "$sock" set merge.merge_across_domains 1
grep -q 'merge-knob' "$tmp/err" && ok "refusal names --merge-knob" || fail "refusal message: $(cat "$tmp/err")"
[ "$("$SP" ctl -s "$sock" get merge.merge_across_domains)" = 0 ] && ok "knob unchanged" || fail "knob changed"
expect_exit 0 "ctl stats --json" "$SP" ctl -s "$sock" stats --json
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); assert d["stats.merge.pages_sharing"] > 0 and "stats.backend.frames_live" in d' "$tmp/out" \
	&& ok "stats --json parses" || fail "stats --json: $(head -c 300 "$tmp/out")"
kill -TERM $holdpid
wait $holdpid
rc=$?
holdpid=
[ $rc = 0 ] && ok "fanout --merge --hold exits 0 on SIGTERM" || fail "exit $rc: $(tail -3 "$tmp/hold.err")"
[ -e "$sock" ] && fail "control socket left behind" || ok "control socket removed"
[ "$(cat /proc/sys/vm/max_map_count)" = "$map_count0" ] && ok "vm.max_map_count restored" \
	|| {
		cur=$(cat /proc/sys/vm/max_map_count)
		fail "vm.max_map_count is $cur, was $map_count0"
		# undo it only if it is what our owner sets (another samepage
		# run may own a different change)
		[ "$cur" = 1048576 ] && echo "$map_count0" >/proc/sys/vm/max_map_count
	}
finish
