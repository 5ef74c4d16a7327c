# SPDX-License-Identifier: MIT
# Shared by the CLI test scripts (sourced, not run): the binary, a scratch
# directory removed on exit (with any held fan-out), and the checks.
#   fail MSG / ok MSG        count and print one result
#   expect_exit CODE WHAT CMD...
#                            run CMD (stdout to $tmp/out, stderr to
#                            $tmp/err); it must exit CODE, and a failure
#                            must say why in a 'samepage: ' line
#   finish                   print "N passed, N failed" and exit
B=${B:-build}
SP=$B/samepage
fails=0
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }
ok() { echo "ok: $*"; }
[ -x "$SP" ] || { echo "FAIL: $SP not built"; exit 1; }
tmp=$(mktemp -d /tmp/sp-cli.XXXXXX)
holdpid=
cleanup() { [ -n "$holdpid" ] && kill -9 "$holdpid" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT

expect_exit() {
	local want=$1 what=$2; shift 2
	"$@" >"$tmp/out" 2>"$tmp/err"
	local rc=$?
	if [ "$rc" != "$want" ]; then fail "$what: exit $rc, want $want ($(head -c 300 "$tmp/err"))"; return 1; fi
	if [ "$want" != 0 ] && ! grep -q '^samepage: ' "$tmp/err"; then
		fail "$what: no 'samepage: ' error line on stderr"; return 1
	fi
	ok "$what"
}

finish() {
	echo "$((fails == 0 ? 1 : 0)) passed, $fails failed"
	[ "$fails" = 0 ]
	exit
}
