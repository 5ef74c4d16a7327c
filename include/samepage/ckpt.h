/* SPDX-License-Identifier: MIT */
/*
 * Checkpoint format v1: one golden image of a VM that many clones map.
 *
 * A checkpoint file holds a header with a section table, metadata sections
 * (vCPU state, a per-page XXH3-64 content hash index, a zero-page bitmap)
 * and a page-aligned memory section that clones mmap() directly. All
 * metadata is covered by one checksum; each memory page by its own hash.
 * The byte layout is specified in docs/format.md.
 *
 * The reader trusts nothing in the file: every size, offset and count is
 * checked (including for overflow) before use, and every failure returns
 * -EBADMSG with a message that names what is wrong.
 */
#ifndef SAMEPAGE_CKPT_H
#define SAMEPAGE_CKPT_H

#include <stddef.h>
#include <stdint.h>

#include "samepage/error.h"

#define SP_CKPT_VERSION 1
#define SP_PAGE_SIZE 4096u
/* The memory section starts on a 2 MiB boundary of the file so that a copy
 * of the whole file on a huge-page tmpfs can be mapped with PMDs. */
#define SP_CKPT_MEM_ALIGN (2u << 20)

/* Architecture tag of the vCPU section. */
#define SP_CKPT_ARCH_X86_64 1u

/* What a writer provides. */
struct sp_ckpt_image {
	const void *mem;          /* guest memory, mem_bytes long */
	uint64_t mem_bytes;       /* multiple of SP_PAGE_SIZE, > 0 */
	uint32_t vcpu_arch;       /* SP_CKPT_ARCH_* */
	const void *vcpu;         /* opaque vCPU state blob (the VMM's) */
	uint32_t vcpu_bytes;
	uint64_t flags;           /* reserved, 0 */
};

/* Write img to path atomically (temporary file, fsync, rename). Computes
 * the page hash index and zero bitmap. Zero pages are left as holes. */
int sp_ckpt_write(const char *path, const struct sp_ckpt_image *img,
		  struct sp_error *err);

struct sp_ckpt;   /* an open, validated checkpoint (opaque) */

/* What the header and section table say, after validation. */
struct sp_ckpt_info {
	uint32_t version;
	uint32_t page_size;
	uint64_t mem_bytes;       /* guest memory size */
	uint64_t mem_offset;      /* file offset of the memory section */
	uint64_t pages;           /* mem_bytes / page_size */
	uint64_t zero_pages;      /* pages marked zero in the bitmap */
	uint64_t flags;
	uint32_t vcpu_arch;
	uint32_t vcpu_bytes;
	uint32_t nsections;
	uint64_t meta_checksum;   /* XXH3-64 over all metadata */
	uint64_t file_bytes;
};

/* Open and validate header, section table and metadata checksum. Page
 * hashes are not checked here (see sp_ckpt_verify). On success *out is
 * set; close it with sp_ckpt_close(). */
int sp_ckpt_open(const char *path, struct sp_ckpt **out, struct sp_error *err);
void sp_ckpt_close(struct sp_ckpt *c);

const struct sp_ckpt_info *sp_ckpt_info(const struct sp_ckpt *c);
int sp_ckpt_fd(const struct sp_ckpt *c);                 /* read-only fd */
const void *sp_ckpt_vcpu(const struct sp_ckpt *c);       /* vcpu_bytes long */
const uint64_t *sp_ckpt_hashes(const struct sp_ckpt *c); /* one per page */
/* 1 if page is marked all-zero, 0 if not, -ERANGE if page >= pages. */
int sp_ckpt_page_is_zero(const struct sp_ckpt *c, uint64_t page);

/* Recompute every page's hash (and check zero pages are zero). On the
 * first mismatch returns -EBADMSG naming the page; *bad_pages (if not
 * NULL) receives how many pages mismatch in all. */
int sp_ckpt_verify(const struct sp_ckpt *c, uint64_t *bad_pages,
		   struct sp_error *err);

/* Read the memory section into buf (mem_bytes long). */
int sp_ckpt_read_mem(const struct sp_ckpt *c, void *buf, struct sp_error *err);

/* XXH3-64 of one page, as stored in the hash index. */
uint64_t sp_page_hash(const void *page);

/* --- Additions (sections, fd-based open, re-sealing) --------------------- */

/* Section types of format v1 (docs/format.md). Each appears exactly once. */
#define SP_CKPT_SEC_VCPU    1u  /* u32 arch, u32 len, len bytes of state */
#define SP_CKPT_SEC_HASHES  2u  /* u64 XXH3-64 per page, little-endian */
#define SP_CKPT_SEC_ZEROMAP 3u  /* bitmap, bit set = page is all zero */
#define SP_CKPT_SEC_MEM     4u  /* guest memory, SP_CKPT_MEM_ALIGN aligned */

/* Limits a v1 reader enforces before allocating anything. */
#define SP_CKPT_MAX_SECTIONS 16u
#define SP_CKPT_MAX_HEADER_BYTES (64u << 10)
#define SP_CKPT_MAX_VCPU_BYTES (1u << 20)

/* One validated section table entry, in host byte order. */
struct sp_ckpt_section {
	uint32_t type;            /* SP_CKPT_SEC_* */
	uint32_t flags;           /* 0 in v1 */
	uint64_t offset;          /* file offset, bytes */
	uint64_t bytes;           /* length, bytes */
};

/* Like sp_ckpt_open() on an already open file (any offset; read with
 * pread). The checkpoint keeps its own duplicate of fd: the caller still
 * owns fd and may close it at once. */
int sp_ckpt_open_fd(int fd, struct sp_ckpt **out, struct sp_error *err);

/* Entry i (0 <= i < nsections) of the section table in file order, or NULL
 * when i is out of range. */
const struct sp_ckpt_section *sp_ckpt_section(const struct sp_ckpt *c,
					      uint32_t i);

/* "vcpu", "hashes", "zeromap", "mem" or "unknown". Never NULL. */
const char *sp_ckpt_section_name(uint32_t type);

/* "x86_64" or "unknown". Never NULL. */
const char *sp_ckpt_arch_name(uint32_t arch);

/* Recompute the metadata checksum of the checkpoint open read-write on fd
 * and store it in the header (stored value in *checksum if not NULL). Only
 * the structure (header, section table, section bounds and sizes) must be
 * valid; the metadata contents are not checked. For tests and fuzzing,
 * which corrupt one field and need the reader to reach the check for that
 * field rather than stop at the checksum. */
int sp_ckpt_reseal_fd(int fd, uint64_t *checksum, struct sp_error *err);

#endif
