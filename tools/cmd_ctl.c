/* SPDX-License-Identifier: MIT */
/*
 * `samepage ctl`: read and set the merge engine's knobs and read its
 * statistics through the merge owner's control socket. Names follow one
 * dotted namespace (merge.pages_to_scan, stats.merge.pages_sharing, ...),
 * documented in docs/knobs.md and by `samepage ctl list`.
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "samepage/merge.h"
#include "tools/cmd.h"
#include "vmm/owner.h"

static void usage(FILE *f)
{
	fprintf(f,
		"usage: samepage ctl [--socket PATH] get NAME\n"
		"       samepage ctl [--socket PATH] set NAME VALUE\n"
		"       samepage ctl [--socket PATH] stats [--json]\n"
		"       samepage ctl list [--json]\n"
		"\n"
		"Talk to a running merge owner (started by 'samepage fanout --merge').\n"
		"Knobs are merge.NAME (read/write), statistics stats.merge.NAME and\n"
		"stats.backend.NAME (read-only); 'list' prints every name with its range\n"
		"and meaning without needing an owner.\n"
		"\n"
		"  -s, --socket PATH   control socket (default $SAMEPAGE_CTL, else\n"
		"                      " SP_CTL_SOCKET_DEFAULT ")\n"
		"      --json          one JSON object instead of lines\n"
		"  -h, --help          this text\n"
		"\n"
		"Exit status: 0 ok, 64 usage or bad name/value, 69 no owner running.\n");
}

static const struct sp_merge_ctl_info *lookup(const char *name)
{
	size_t n;
	const struct sp_merge_ctl_info *in = sp_merge_ctl_list(&n);

	for (size_t i = 0; i < n; i++)
		if (!strcmp(in[i].name, name))
			return &in[i];
	return NULL;
}

static void json_str(const char *s)
{
	putchar('"');
	for (; *s; s++) {
		if (*s == '"' || *s == '\\')
			putchar('\\');
		putchar(*s);
	}
	putchar('"');
}

int cmd_ctl(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "socket", required_argument, NULL, 's' },
		{ "json", no_argument, NULL, 'J' },
		{ "help", no_argument, NULL, 'h' },
		{ 0 },
	};
	const char *path = getenv("SAMEPAGE_CTL");
	struct sp_error err = { 0 };
	char *buf;
	int json = 0, c, rc;
	const char *verb;

	if (!path || !*path)
		path = SP_CTL_SOCKET_DEFAULT;
	optind = 1;
	while ((c = getopt_long(argc, argv, "+s:h", opts, NULL)) != -1) {
		switch (c) {
		case 's':
			path = optarg;
			break;
		case 'J':
			json = 1;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return EX_USAGE;
		}
	}
	if (optind >= argc) {
		tool_err("ctl: need get, set, stats or list (see --help)");
		return EX_USAGE;
	}
	verb = argv[optind++];
	/* options may also follow the verb */
	for (int i = optind; i < argc; i++)
		if (!strcmp(argv[i], "--json")) {
			json = 1;
			memmove(&argv[i], &argv[i + 1], (size_t)(argc - i - 1) * sizeof(*argv));
			argc--;
			i--;
		}

	if (!strcmp(verb, "list")) {
		size_t n;
		const struct sp_merge_ctl_info *in = sp_merge_ctl_list(&n);
		if (optind != argc) {
			tool_err("ctl list: unexpected argument '%s'", argv[optind]);
			return EX_USAGE;
		}
		if (json)
			putchar('[');
		for (size_t i = 0; i < n; i++) {
			if (json) {
				printf("%s{\"name\":", i ? "," : "");
				json_str(in[i].name);
				printf(",\"writable\":%s,\"min\":%lld,\"max\":%lld,\"doc\":",
				       in[i].writable ? "true" : "false", (long long)in[i].min,
				       (long long)in[i].max);
				json_str(in[i].doc);
				putchar('}');
			} else if (in[i].writable) {
				printf("%-34s rw  %lld..%lld  %s\n", in[i].name, (long long)in[i].min,
				       (long long)in[i].max, in[i].doc);
			} else {
				printf("%-34s ro  %s\n", in[i].name, in[i].doc);
			}
		}
		if (json)
			puts("]");
		return 0;
	}
	if (!strcmp(verb, "get") || !strcmp(verb, "set")) {
		int set = verb[0] == 's';
		const struct sp_merge_ctl_info *in;
		char req[512];
		long long v = 0;

		if (argc - optind != (set ? 2 : 1)) {
			tool_err("ctl %s: need %s", verb, set ? "NAME VALUE" : "NAME");
			return EX_USAGE;
		}
		in = lookup(argv[optind]);
		if (!in && strncmp(argv[optind], "stats.backend.", 14)) {
			tool_err("ctl: unknown name '%s' (see 'samepage ctl list')", argv[optind]);
			return EX_USAGE;
		}
		if (set) {
			char *end;
			if (!in || !in->writable) {
				tool_err("ctl set: '%s' is a statistic, not a knob", argv[optind]);
				return EX_USAGE;
			}
			errno = 0;
			v = strtoll(argv[optind + 1], &end, 10);
			if (errno || *end || end == argv[optind + 1]) {
				tool_err("ctl set %s: '%s' is not an integer", in->name, argv[optind + 1]);
				return EX_USAGE;
			}
			if (v < in->min || v > in->max) {
				tool_err("ctl set %s: %lld is out of range (%lld..%lld)", in->name, v,
					 (long long)in->min, (long long)in->max);
				return EX_USAGE;
			}
			snprintf(req, sizeof(req), "set %s %lld", in->name, v);
		} else {
			snprintf(req, sizeof(req), "get %s", argv[optind]);
		}
		buf = malloc(1 << 16);
		if (!buf)
			return EX_OSERR;
		rc = sp_ctl_request(path, req, buf, 1 << 16, &err);
		if (rc == 0 && !set) {
			const char *sp = strchr(buf, ' ');
			printf("%s", sp ? sp + 1 : buf);
		}
		free(buf);
		if (rc) {
			tool_err("ctl %s: %s", verb, err.msg);
			return rc == -ENOENT || rc == -ECONNREFUSED ? EX_UNAVAILABLE : EX_USAGE;
		}
		return 0;
	}
	if (!strcmp(verb, "stats")) {
		char *line, *save = NULL;
		int first = 1;

		if (optind != argc) {
			tool_err("ctl stats: unexpected argument '%s'", argv[optind]);
			return EX_USAGE;
		}
		buf = malloc(1 << 16);
		if (!buf)
			return EX_OSERR;
		rc = sp_ctl_request(path, "stats", buf, 1 << 16, &err);
		if (rc) {
			free(buf);
			tool_err("ctl stats: %s", err.msg);
			return rc == -ENOENT || rc == -ECONNREFUSED ? EX_UNAVAILABLE : EX_OSERR;
		}
		if (!json) {
			fputs(buf, stdout);
			free(buf);
			return 0;
		}
		putchar('{');
		for (line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
			char *sp = strchr(line, ' ');
			if (!sp)
				continue;
			*sp = '\0';
			printf("%s", first ? "" : ",");
			json_str(line);
			printf(":%s", sp + 1);
			first = 0;
		}
		puts("}");
		free(buf);
		return 0;
	}
	tool_err("ctl: unknown verb '%s' (get, set, stats, list)", verb);
	return EX_USAGE;
}
