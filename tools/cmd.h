/* SPDX-License-Identifier: MIT */
/*
 * The `samepage` command's subcommands. Each takes the arguments after its
 * own name (argv[0] is the subcommand) and returns a sysexits code.
 */
#ifndef SAMEPAGE_TOOLS_CMD_H
#define SAMEPAGE_TOOLS_CMD_H

#include <sysexits.h>

int cmd_ckpt(int argc, char **argv);
int cmd_snapshot(int argc, char **argv);
int cmd_fanout(int argc, char **argv);
int cmd_ctl(int argc, char **argv);

/* Print "samepage: <msg>" to stderr. */
void tool_err(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Parse a size such as 256M, 1G, 4096, 64K into bytes; -EINVAL if bad. */
int tool_parse_size(const char *s, unsigned long long *out);
/* Parse a non-negative integer within [lo, hi]; -EINVAL/-ERANGE if bad. */
int tool_parse_u64(const char *s, unsigned long long lo, unsigned long long hi,
		   unsigned long long *out);

#endif
