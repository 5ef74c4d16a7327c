/* SPDX-License-Identifier: MIT */
/*
 * `samepage snapshot`: boot a probe guest, let it fill its memory with
 * page-distinct content (and some zero pages), stop it and write a
 * checkpoint that clones can be restored from.
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tools/cmd.h"
#include "vmm/probe.h"

static void usage(FILE *f)
{
	fprintf(f,
		"usage: samepage snapshot -o FILE [--mem SIZE] [--zero-pct P] [--seed N]\n"
		"\n"
		"Boot a probe guest (64-bit, CPL3) with SIZE of RAM, let it fill every data\n"
		"page with distinct non-zero content, P%% of them zero instead, stop it and\n"
		"write a checkpoint (format v1, docs/format.md) to FILE.\n"
		"\n"
		"  -o, --output FILE   checkpoint to write (replaced atomically)\n"
		"  -m, --mem SIZE      guest RAM, multiple of 2M, 4M..16G (default 256M)\n"
		"  -z, --zero-pct P    percentage of data pages left zero (default 0)\n"
		"  -s, --seed N        content seed (default 1)\n"
		"  -h, --help          this text\n");
}

int cmd_snapshot(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "output", required_argument, NULL, 'o' },
		{ "mem", required_argument, NULL, 'm' },
		{ "zero-pct", required_argument, NULL, 'z' },
		{ "seed", required_argument, NULL, 's' },
		{ "help", no_argument, NULL, 'h' },
		{ 0 },
	};
	struct sp_snapshot_opts o = { .ram_bytes = 256ull << 20, .seed = 1 };
	struct sp_error err = { 0 };
	const char *out = NULL;
	unsigned long long v;
	int c, rc;

	optind = 1;
	while ((c = getopt_long(argc, argv, "o:m:z:s:h", opts, NULL)) != -1) {
		switch (c) {
		case 'o':
			out = optarg;
			break;
		case 'm':
			if (tool_parse_size(optarg, &v) || v < SP_PROBE_MIN_RAM ||
			    v > SP_PROBE_MAX_RAM || v % (2ull << 20)) {
				tool_err("--mem '%s': need a multiple of 2M between 4M and 16G", optarg);
				return EX_USAGE;
			}
			o.ram_bytes = v;
			break;
		case 'z':
			if (sp_probe_parse_pct(optarg, &o.zero_bp)) {
				tool_err("--zero-pct '%s': need a percentage from 0 to 100", optarg);
				return EX_USAGE;
			}
			break;
		case 's':
			if (tool_parse_u64(optarg, 0, ~0ull, &v)) {
				tool_err("--seed '%s': need a non-negative integer", optarg);
				return EX_USAGE;
			}
			o.seed = v;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return EX_USAGE;
		}
	}
	if (!out || optind != argc) {
		if (!out)
			tool_err("snapshot: -o FILE is required");
		else
			tool_err("snapshot: unexpected argument '%s'", argv[optind]);
		usage(stderr);
		return EX_USAGE;
	}
	rc = sp_vm_available();
	if (rc) {
		tool_err("cannot use /dev/kvm: %s", strerror(-rc));
		return EX_UNAVAILABLE;
	}
	rc = sp_probe_snapshot(out, &o, &err);
	if (rc) {
		tool_err("%s: %s", out, err.msg[0] ? err.msg : sp_strerror(rc));
		return rc == -EIO ? EX_SOFTWARE : EX_CANTCREAT;
	}
	fprintf(stderr, "samepage: wrote %s (%llu MiB guest, %.2f%% zero pages, seed %llu)\n", out,
		(unsigned long long)(o.ram_bytes >> 20), o.zero_bp / 100.0,
		(unsigned long long)o.seed);
	return 0;
}
