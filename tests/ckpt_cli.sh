#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# `samepage ckpt info|verify` over the checkpoints tests/unit/test_ckpt.c
# writes in fixture mode (one good file, every malformed variant, files
# whose pages do not match their hashes): exit codes, one-line errors that
# name the file, and `info --json` that parses and carries the fields
# docs/format.md promises. Needs $B/samepage and $B/tests/unit/test_ckpt.
set -u
B=${B:-build}
S=$B/samepage
T=$B/tests/unit/test_ckpt
for x in "$S" "$T"; do
	if [ ! -x "$x" ]; then
		echo "ckpt_cli: $x is not built (run make first); ckpt CLI not tested" >&2
		exit 1
	fi
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0
checks=0
bad() { echo "FAIL: $*"; fail=$((fail + 1)); }

if ! SP_CKPT_FIXTURES=$tmp "$T" >"$tmp/fixtures.log" 2>&1; then
	cat "$tmp/fixtures.log"
	echo "ckpt_cli: writing fixtures with $T failed" >&2
	exit 1
fi
[ -f "$tmp/good.ckpt" ] || { echo "ckpt_cli: no good.ckpt written" >&2; exit 1; }

# expect WANT_RC STDERR_LINES(0|1|any) -- args...: run samepage, check the exit
# code and that stderr is empty or exactly one "samepage: " line.
expect() {
	local want=$1 lines=$2; shift 3
	checks=$((checks + 1))
	"$S" "$@" >"$tmp/out" 2>"$tmp/err"
	local rc=$?
	local n; n=$(wc -l <"$tmp/err")
	if [ "$rc" -ne "$want" ]; then
		bad "samepage $* exited $rc, want $want; stderr: $(head -3 "$tmp/err")"
	elif [ "$lines" = 1 ] && { [ "$n" -ne 1 ] || ! grep -q '^samepage: ' "$tmp/err"; }; then
		bad "samepage $*: want one 'samepage: ' line on stderr, got $n: $(head -3 "$tmp/err")"
	elif [ "$lines" = 0 ] && [ "$n" -ne 0 ]; then
		bad "samepage $*: unexpected stderr: $(head -3 "$tmp/err")"
	fi
}

g=$tmp/good.ckpt
expect 0 0 -- ckpt info "$g"
grep -q '^version: *1$' "$tmp/out" || bad "info: no 'version: 1' line"
grep -q '^mem offset: *2097152 ' "$tmp/out" || bad "info: no 'mem offset: 2097152' line"
grep -q 'hashes' "$tmp/out" || bad "info: sections not listed"

expect 0 0 -- ckpt info "$g" --json
checks=$((checks + 1))
python3 -c '
import json, sys
d = json.load(sys.stdin)
assert "mem_offset" in d and "mem_bytes" in d, "mem_offset/mem_bytes missing"
for k in ("version", "page_size", "pages", "zero_pages", "flags", "vcpu_arch",
          "vcpu_bytes", "nsections", "meta_checksum", "file_bytes", "sections"):
    assert k in d, k + " missing"
assert d["version"] == 1 and d["page_size"] == 4096
assert d["mem_offset"] % (2 << 20) == 0
assert d["pages"] * 4096 == d["mem_bytes"]
assert [s["name"] for s in d["sections"]] == ["vcpu", "hashes", "zeromap", "mem"]
mem = [s for s in d["sections"] if s["name"] == "mem"][0]
assert mem["offset"] == d["mem_offset"] and mem["bytes"] == d["mem_bytes"]
assert d["allocated_bytes"] < d["file_bytes"], "zero pages are not holes"
' <"$tmp/out" || bad "info --json: output does not parse or lacks fields"

expect 0 0 -- ckpt verify "$g"
grep -Eq '^ok: [0-9]+ pages verified$' "$tmp/out" || bad "verify: no 'ok: N pages verified' line"
expect 0 0 -- ckpt verify --json "$g"
checks=$((checks + 1))
python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["ok"] is True and d["bad_pages"] == 0' \
	<"$tmp/out" || bad "verify --json on a good file"

# Every malformed file: info and verify both fail with EX_DATAERR (65) and
# one line naming the file.
n=0
for f in "$tmp"/bad-*.ckpt; do
	n=$((n + 1))
	expect 65 1 -- ckpt info "$f"
	grep -qF "samepage: $f: " "$tmp/err" || bad "info $f: error does not name the file"
	expect 65 1 -- ckpt verify "$f"
done
[ "$n" -ge 40 ] || bad "only $n malformed fixtures written"

# Pages that do not match their hashes: info is fine, verify is not.
for f in "$tmp"/badpage-*.ckpt; do
	expect 0 0 -- ckpt info "$f"
	expect 65 1 -- ckpt verify "$f"
	grep -q 'page [0-9]' "$tmp/err" || bad "verify $f: error does not name the page"
	expect 65 1 -- ckpt verify --json "$f"
	checks=$((checks + 1))
	python3 -c 'import json,sys; d=json.load(sys.stdin); assert d["ok"] is False and d["bad_pages"] >= 1' \
		<"$tmp/out" || bad "verify --json $f"
done

# Cannot open: EX_NOINPUT (66).
expect 66 1 -- ckpt info "$tmp/does-not-exist.ckpt"
expect 66 1 -- ckpt verify "$tmp"

# Usage: EX_USAGE (64); --help is not an error.
expect 64 1 -- ckpt frobnicate "$g"
expect 64 1 -- ckpt info
expect 64 1 -- ckpt info "$g" --bogus
expect 64 1 -- ckpt info "$g" "$g"
expect 64 any -- ckpt   # usage text on stderr
expect 0 0 -- ckpt --help
grep -q 'usage: samepage ckpt info' "$tmp/out" || bad "--help prints no usage"

if [ "$fail" -ne 0 ]; then
	echo "ckpt_cli: $fail of $checks checks failed"
	exit 1
fi
echo "ckpt_cli: $checks checks passed"
