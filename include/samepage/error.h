/* SPDX-License-Identifier: MIT */
/*
 * samepage error reporting. Library functions return 0 or a negative errno;
 * where a bare errno would leave the user guessing (which field of which
 * file is wrong), they also fill a caller-provided struct sp_error with one
 * line of text. Tools print that line and exit with a sysexits code.
 */
#ifndef SAMEPAGE_ERROR_H
#define SAMEPAGE_ERROR_H

#include <stddef.h>

#define SP_ERRMSG_LEN 256

struct sp_error {
	int code;                  /* negative errno, 0 when unset */
	char msg[SP_ERRMSG_LEN];   /* one line, no trailing newline */
};

/* Record code (a negative errno) and a printf-style message in err (which
 * may be NULL) and return code, so callers can `return sp_error_set(...)`. */
int sp_error_set(struct sp_error *err, int code, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* Text for a negative errno, including samepage's own uses of errno values
 * (-EBADMSG: malformed checkpoint, ...). Never NULL. */
const char *sp_strerror(int code);

#endif
