/* SPDX-License-Identifier: MIT */
/*
 * libFuzzer target for the checkpoint reader (lib/ckpt). Every input
 * becomes a file in a memfd that sp_ckpt_open_fd() validates; when it is
 * accepted, sp_ckpt_verify(), sp_ckpt_read_mem() and the accessors run
 * over it. The target traps if a rejection carries no message or a code
 * other than the one returned, so silent failures count as crashes too.
 *
 * Input encoding (a valid v1 file is at least 2 MiB because the memory
 * section is 2 MiB aligned, more than libFuzzer mutates comfortably):
 *
 *   byte 0      ctl: bit 0 set = re-seal the metadata checksum with
 *               sp_ckpt_reseal_fd() before opening, so mutations of
 *               checksummed metadata reach the checks behind the checksum
 *   bytes 1..4  split, u32 little-endian
 *   bytes 5..   payload
 *
 * If split < payload length and split <= 2 MiB, payload[0, split) is
 * written at file offset 0 and payload[split, end) at offset 2 MiB (the
 * gap stays a hole); otherwise the payload is the whole file. Inputs
 * shorter than 5 bytes are the whole file.
 *
 * Seeds in tests/fuzz/corpus/ckpt/ come from the unit test:
 *   SP_CKPT_FIXTURES=/tmp/fx build/tests/unit/test_ckpt
 *   cp /tmp/fx/seed-*.fuzz tests/fuzz/corpus/ckpt/
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "samepage/ckpt.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int put(int fd, const uint8_t *p, size_t n, off_t off)
{
	while (n > 0) {
		ssize_t w = pwrite(fd, p, n, off);

		if (w <= 0)
			return -1;
		p += w;
		n -= (size_t)w;
		off += w;
	}
	return 0;
}

/* A failure must say what failed, with the code it returned. */
static void check_err(int rc, const struct sp_error *err)
{
	if (rc < 0 && (err->code != rc || err->msg[0] == '\0' || strchr(err->msg, '\n')))
		__builtin_trap();
}

static void exercise(struct sp_ckpt *c)
{
	const struct sp_ckpt_info *in = sp_ckpt_info(c);
	struct sp_error err = { 0 };
	uint64_t nbad, zero = 0, sum = 0;
	uint8_t *buf;
	int rc;

	if (in->version != SP_CKPT_VERSION || in->page_size != SP_PAGE_SIZE ||
	    in->mem_offset % SP_CKPT_MEM_ALIGN != 0 ||
	    in->mem_offset + in->mem_bytes > in->file_bytes)
		__builtin_trap();
	for (uint32_t i = 0; i < in->nsections; i++)
		if (sp_ckpt_section(c, i)->offset + sp_ckpt_section(c, i)->bytes > in->file_bytes)
			__builtin_trap();
	for (uint64_t p = 0; p < in->pages; p++) {
		zero += sp_ckpt_page_is_zero(c, p) == 1;
		sum ^= sp_ckpt_hashes(c)[p];
	}
	if (zero != in->zero_pages || sp_ckpt_page_is_zero(c, in->pages) != -ERANGE)
		__builtin_trap();
	for (uint32_t i = 0; i < in->vcpu_bytes; i++)
		sum += ((const uint8_t *)sp_ckpt_vcpu(c))[i];
	rc = sp_ckpt_verify(c, &nbad, &err);
	check_err(rc, &err);
	if ((rc == 0) != (nbad == 0))
		__builtin_trap();
	buf = malloc((size_t)in->mem_bytes);
	if (buf != NULL) {
		rc = sp_ckpt_read_mem(c, buf, &err);
		check_err(rc, &err);
		free(buf);
	}
	(void)sum;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const uint8_t *payload = data;
	size_t len = size;
	uint32_t split = UINT32_MAX;
	uint8_t ctl = 0;
	struct sp_error err = { 0 };
	struct sp_ckpt *c = NULL;
	int fd, rc;

	if (size >= 5) {
		ctl = data[0];
		split = (uint32_t)data[1] | (uint32_t)data[2] << 8 | (uint32_t)data[3] << 16 |
			(uint32_t)data[4] << 24;
		payload = data + 5;
		len = size - 5;
	}
	fd = memfd_create("fuzz_ckpt", MFD_CLOEXEC);
	if (fd < 0)
		return 0;
	if (split < len && split <= SP_CKPT_MEM_ALIGN) {
		if (ftruncate(fd, (off_t)SP_CKPT_MEM_ALIGN) != 0 || put(fd, payload, split, 0) != 0 ||
		    put(fd, payload + split, len - split, SP_CKPT_MEM_ALIGN) != 0)
			goto out;
	} else if (put(fd, payload, len, 0) != 0) {
		goto out;
	}
	if (ctl & 1) {
		rc = sp_ckpt_reseal_fd(fd, NULL, &err);
		check_err(rc, &err);
	}
	memset(&err, 0, sizeof(err));
	rc = sp_ckpt_open_fd(fd, &c, &err);
	check_err(rc, &err);
	if (rc == 0) {
		exercise(c);
		sp_ckpt_close(c);
	} else if (c != NULL) {
		__builtin_trap();
	}
out:
	close(fd);
	return 0;
}
