/* SPDX-License-Identifier: MIT */
/*
 * `samepage ckpt`: inspect and check checkpoint files.
 *
 *   samepage ckpt info FILE [--json]     header, sections, sizes, checksum
 *   samepage ckpt verify FILE [--json]   recompute every page hash
 *
 * info validates everything sp_ckpt_open() validates (structure and the
 * metadata checksum); verify also reads the whole memory section. Exit
 * codes: 0 ok, EX_USAGE bad arguments, EX_DATAERR malformed file or hash
 * mismatch, EX_NOINPUT file cannot be opened, EX_IOERR/EX_OSERR for read
 * and memory failures. Errors are one line on stderr naming the file.
 * The --json field names are listed in docs/format.md.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "samepage/ckpt.h"
#include "tools/cmd.h"

static void usage(FILE *f)
{
	fprintf(f,
		"usage: samepage ckpt info FILE [--json]\n"
		"       samepage ckpt verify FILE [--json]\n"
		"\n"
		"  info     validate the header, section table and metadata checksum,\n"
		"           then print what the checkpoint holds\n"
		"  verify   also read the memory section and check every page hash\n"
		"  --json   print one JSON object on stdout instead of text\n"
		"\n"
		"exit status: 0 ok, 64 usage, 65 malformed or mismatching file,\n"
		"66 file cannot be opened, 74 read error\n");
}

/* sysexits code for an error from the library. */
static int exit_code(int rc, bool opening)
{
	switch (rc) {
	case -EBADMSG: return EX_DATAERR;
	case -ENOMEM: return EX_OSERR;
	case -EIO: return EX_IOERR;
	default: return opening ? EX_NOINPUT : EX_IOERR;
	}
}

static void report(const char *file, int rc, const struct sp_error *err)
{
	tool_err("%s: %s", file, err->msg[0] != '\0' ? err->msg : sp_strerror(rc));
}

/* A JSON string literal for s. */
static void json_str(const char *s)
{
	putchar('"');
	for (const unsigned char *p = (const unsigned char *)s; *p != '\0'; p++) {
		if (*p == '"' || *p == '\\')
			printf("\\%c", *p);
		else if (*p < 0x20 || *p == 0x7f)
			printf("\\u%04x", *p);
		else
			putchar(*p);
	}
	putchar('"');
}

static uint64_t allocated_bytes(const struct sp_ckpt *c)
{
	struct stat st;

	if (fstat(sp_ckpt_fd(c), &st) != 0)
		return 0;
	return (uint64_t)st.st_blocks * 512;
}

static void info_json(const char *file, const struct sp_ckpt *c)
{
	const struct sp_ckpt_info *in = sp_ckpt_info(c);

	printf("{\"file\":");
	json_str(file);
	printf(",\"version\":%u,\"page_size\":%u,\"mem_bytes\":%llu,\"mem_offset\":%llu,"
	       "\"pages\":%llu,\"zero_pages\":%llu,\"flags\":%llu,\"vcpu_arch\":%u,"
	       "\"vcpu_arch_name\":\"%s\",\"vcpu_bytes\":%u,\"nsections\":%u,"
	       "\"meta_checksum\":\"0x%016llx\",\"file_bytes\":%llu,\"allocated_bytes\":%llu,"
	       "\"sections\":[",
	       in->version, in->page_size, (unsigned long long)in->mem_bytes,
	       (unsigned long long)in->mem_offset, (unsigned long long)in->pages,
	       (unsigned long long)in->zero_pages, (unsigned long long)in->flags,
	       in->vcpu_arch, sp_ckpt_arch_name(in->vcpu_arch), in->vcpu_bytes, in->nsections,
	       (unsigned long long)in->meta_checksum, (unsigned long long)in->file_bytes,
	       (unsigned long long)allocated_bytes(c));
	for (uint32_t i = 0; i < in->nsections; i++) {
		const struct sp_ckpt_section *s = sp_ckpt_section(c, i);

		printf("%s{\"index\":%u,\"type\":%u,\"name\":\"%s\",\"flags\":%u,"
		       "\"offset\":%llu,\"bytes\":%llu}", i ? "," : "", i, s->type,
		       sp_ckpt_section_name(s->type), s->flags, (unsigned long long)s->offset,
		       (unsigned long long)s->bytes);
	}
	printf("]}\n");
}

static void info_text(const char *file, const struct sp_ckpt *c)
{
	const struct sp_ckpt_info *in = sp_ckpt_info(c);

	printf("file:          %s\n", file);
	printf("version:       %u\n", in->version);
	printf("page size:     %u bytes\n", in->page_size);
	printf("guest memory:  %llu bytes (%.1f MiB)\n", (unsigned long long)in->mem_bytes,
	       (double)in->mem_bytes / (1 << 20));
	printf("pages:         %llu\n", (unsigned long long)in->pages);
	printf("zero pages:    %llu (%.1f%%)\n", (unsigned long long)in->zero_pages,
	       100.0 * (double)in->zero_pages / (double)in->pages);
	printf("mem offset:    %llu (0x%llx)\n", (unsigned long long)in->mem_offset,
	       (unsigned long long)in->mem_offset);
	printf("vcpu:          %s (arch %u), %u bytes\n", sp_ckpt_arch_name(in->vcpu_arch),
	       in->vcpu_arch, in->vcpu_bytes);
	printf("flags:         0x%llx\n", (unsigned long long)in->flags);
	printf("checksum:      0x%016llx (XXH3-64 of all metadata, ok)\n",
	       (unsigned long long)in->meta_checksum);
	printf("file size:     %llu bytes, %llu allocated\n",
	       (unsigned long long)in->file_bytes, (unsigned long long)allocated_bytes(c));
	printf("sections:      %u\n", in->nsections);
	printf("  #  type      offset        bytes\n");
	for (uint32_t i = 0; i < in->nsections; i++) {
		const struct sp_ckpt_section *s = sp_ckpt_section(c, i);

		printf("  %u  %-8s  %-12llu  %llu\n", i, sp_ckpt_section_name(s->type),
		       (unsigned long long)s->offset, (unsigned long long)s->bytes);
	}
}

static int do_verify(const char *file, const struct sp_ckpt *c, bool json)
{
	const struct sp_ckpt_info *in = sp_ckpt_info(c);
	struct sp_error err = { 0 };
	uint64_t nbad = 0;
	int rc = sp_ckpt_verify(c, &nbad, &err);

	if (json) {
		printf("{\"file\":");
		json_str(file);
		printf(",\"ok\":%s,\"pages\":%llu,\"bad_pages\":%llu", rc == 0 ? "true" : "false",
		       (unsigned long long)in->pages, (unsigned long long)nbad);
		if (rc < 0) {
			printf(",\"error\":");
			json_str(err.msg[0] != '\0' ? err.msg : sp_strerror(rc));
		}
		printf("}\n");
	}
	if (rc < 0) {
		report(file, rc, &err);
		return exit_code(rc, false);
	}
	if (!json)
		printf("ok: %llu pages verified\n", (unsigned long long)in->pages);
	return 0;
}

int cmd_ckpt(int argc, char **argv)
{
	const char *verb = NULL, *file = NULL;
	bool json = false;
	struct sp_error err = { 0 };
	struct sp_ckpt *c;
	int rc;

	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];

		if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
			usage(stdout);
			return 0;
		} else if (!strcmp(a, "--json")) {
			json = true;
		} else if (!strcmp(a, "--")) {
			if (i + 2 != argc || verb == NULL || file != NULL) {
				tool_err("ckpt: expected one FILE after '--' (try 'samepage ckpt --help')");
				return EX_USAGE;
			}
			file = argv[++i];
		} else if (a[0] == '-' && a[1] != '\0') {
			tool_err("ckpt: unknown option '%s' (try 'samepage ckpt --help')", a);
			return EX_USAGE;
		} else if (verb == NULL) {
			verb = a;
		} else if (file == NULL) {
			file = a;
		} else {
			tool_err("ckpt: unexpected argument '%s' (try 'samepage ckpt --help')", a);
			return EX_USAGE;
		}
	}
	if (verb == NULL) {
		usage(stderr);
		return EX_USAGE;
	}
	if (strcmp(verb, "info") != 0 && strcmp(verb, "verify") != 0) {
		tool_err("ckpt: unknown subcommand '%s' (expected info or verify)", verb);
		return EX_USAGE;
	}
	if (file == NULL) {
		tool_err("ckpt %s: missing FILE (try 'samepage ckpt --help')", verb);
		return EX_USAGE;
	}

	rc = sp_ckpt_open(file, &c, &err);
	if (rc < 0) {
		if (json && !strcmp(verb, "verify")) {
			printf("{\"file\":");
			json_str(file);
			printf(",\"ok\":false,\"error\":");
			json_str(err.msg[0] != '\0' ? err.msg : sp_strerror(rc));
			printf("}\n");
		}
		report(file, rc, &err);
		return exit_code(rc, true);
	}
	if (!strcmp(verb, "verify")) {
		rc = do_verify(file, c, json);
	} else {
		if (json)
			info_json(file, c);
		else
			info_text(file, c);
		rc = 0;
	}
	sp_ckpt_close(c);
	if (fflush(stdout) != 0 && rc == 0) {
		tool_err("%s: cannot write output: %s", file, strerror(errno));
		rc = EX_IOERR;
	}
	return rc;
}
