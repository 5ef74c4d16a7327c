/* SPDX-License-Identifier: MIT */
/*
 * Helpers shared by samepage's tests. Each test binary uses the Check
 * framework (every test case runs in its own process with a timeout) and
 * exits 0 when all pass, 1 when any fails, 77 when it was skipped; the
 * runner tests/run.sh counts those.
 */
#ifndef SAMEPAGE_TESTUTIL_H
#define SAMEPAGE_TESTUTIL_H

#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#define SP_TEST_SKIP 77

/* Skip the whole binary (exit 77, reason on stderr) when /dev/kvm cannot be
 * opened: tests that need KVM never pass silently without it. */
static inline void sp_test_require_kvm(void)
{
	if (access("/dev/kvm", R_OK | W_OK) != 0) {
		fprintf(stderr, "SKIP: /dev/kvm is not available (%s): KVM tests not run\n",
			"no KVM on this machine or no permission");
		exit(SP_TEST_SKIP);
	}
}

static inline void sp_test_require_root(const char *why)
{
	if (geteuid() != 0) {
		fprintf(stderr, "SKIP: needs root: %s\n", why);
		exit(SP_TEST_SKIP);
	}
}

/* Run one suite, print Check's summary and return the process exit code. */
static inline int sp_test_run(Suite *s)
{
	SRunner *sr = srunner_create(s);
	int failed;

	srunner_run_all(sr, CK_NORMAL);
	failed = srunner_ntests_failed(sr);
	srunner_free(sr);
	return failed == 0 ? 0 : 1;
}

#endif
