/* SPDX-License-Identifier: MIT */
/* Error records and texts shared by every samepage module (see error.h). */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "samepage/error.h"

int sp_error_set(struct sp_error *err, int code, const char *fmt, ...)
{
	va_list ap;

	if (err == NULL)
		return code;
	err->code = code;
	va_start(ap, fmt);
	vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
	va_end(ap);
	return code;
}

const char *sp_strerror(int code)
{
	switch (code) {
	case 0:
		return "success";
	case -EBADMSG:
		return "malformed checkpoint";
	case -ENODEV:
		return "KVM is not available";
	default:
		return strerror(code < 0 ? -code : code);
	}
}
