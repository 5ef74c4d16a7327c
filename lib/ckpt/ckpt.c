/* SPDX-License-Identifier: MIT */
/*
 * Checkpoint format v1: writer, validating reader and page verifier.
 *
 * A checkpoint is one file: a header region at offset 0 (a 64-byte header
 * followed by the section table, padded to a whole number of pages), the
 * metadata sections (vCPU state, page hash index, zero-page bitmap) packed
 * after it on 8-byte boundaries, and the guest memory section starting on a
 * 2 MiB boundary so clones can mmap() it and huge-page copies can use PMDs.
 * docs/format.md is the byte-level specification; this file implements it.
 *
 * Writing: hashes and the zero bitmap are computed from the image, a
 * temporary file in the target directory is sized with ftruncate() (so
 * every page we skip stays a hole), metadata and non-zero pages are written
 * with pwrite(), the file is fsync()ed and renamed over the target, and the
 * directory is fsync()ed so the rename is durable.
 *
 * Reading: nothing in the file is trusted. The checks run in three stages,
 * each only using what the previous stage proved:
 *
 *   1. structure: header fields, then every section table entry (known
 *      type, no flags, bounds without overflow, inside the file, outside the
 *      header, aligned, no duplicate), required sections present, sizes
 *      implied by mem_bytes, no two sections overlapping. Every size is by
 *      then bounded by the file size, so allocations cannot be driven by a
 *      forged length.
 *   2. checksum: the metadata is read with pread() into malloc'd buffers and
 *      its XXH3-64 compared with the header's.
 *   3. contents: vCPU length and architecture, zero-bitmap padding bits,
 *      and the hash stored for every zero page.
 *
 * sp_ckpt_reseal_fd() runs stage 1, computes stage 2's checksum and stores
 * it, so tests and the fuzzer can reach stage 3 with a corrupted field.
 * Page hashes are only checked by sp_ckpt_verify(), which reads the whole
 * memory section.
 */
#include <assert.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lib/util/xxh.h"

#include "samepage/ckpt.h"

/* "\x89SPCKP\r\n": the high byte catches 7-bit transfers, the CR LF pair
 * catches text-mode line-ending conversion in either direction. */
static const uint8_t ckpt_magic[8] = { 0x89, 'S', 'P', 'C', 'K', 'P', '\r', '\n' };

/* On-disk header, little-endian, at file offset 0. */
struct hdr_disk {
	uint8_t magic[8];          /*  0 */
	uint32_t version;          /*  8 */
	uint32_t page_size;        /* 12 */
	uint64_t mem_bytes;        /* 16 */
	uint64_t flags;            /* 24 */
	uint32_t nsections;        /* 32 */
	uint32_t header_bytes;     /* 36 header + section table + padding */
	uint64_t meta_checksum;    /* 40 */
	uint8_t reserved[16];      /* 48 zero */
} __attribute__((packed));

/* On-disk section table entry, little-endian, at 64 + 32 * index. */
struct sec_disk {
	uint32_t type;             /*  0 */
	uint32_t flags;            /*  4 */
	uint64_t offset;           /*  8 */
	uint64_t bytes;            /* 16 */
	uint64_t reserved;         /* 24 zero */
} __attribute__((packed));

/* On-disk prefix of the VCPU section; the state blob follows. */
struct vcpu_disk {
	uint32_t arch;
	uint32_t len;
} __attribute__((packed));

static_assert(sizeof(struct hdr_disk) == 64, "header is 64 bytes");
static_assert(sizeof(struct sec_disk) == 32, "section entry is 32 bytes");
static_assert(sizeof(struct vcpu_disk) == 8, "vcpu prefix is 8 bytes");
static_assert(offsetof(struct hdr_disk, meta_checksum) == 40, "checksum at 40");
static_assert(SP_PAGE_SIZE == 4096, "v1 pages are 4 KiB");
static_assert(SP_CKPT_MAX_HEADER_BYTES >= sizeof(struct hdr_disk) +
	      SP_CKPT_MAX_SECTIONS * sizeof(struct sec_disk), "table fits");

#define HDR_BYTES ((uint32_t)sizeof(struct hdr_disk))
#define SEC_BYTES ((uint32_t)sizeof(struct sec_disk))
#define META_ALIGN 8u              /* metadata section offsets */
#define IO_CHUNK_BYTES (2u << 20)  /* verify reads this much at a time */
#define NTYPES 4u                  /* section types 1..NTYPES */

struct sp_ckpt {
	int fd;                                        /* (c) read-only */
	struct sp_ckpt_info info;                      /* (c) */
	struct sp_ckpt_section sec[SP_CKPT_MAX_SECTIONS]; /* (c) file order */
	const struct sp_ckpt_section *mem;             /* (c) into sec[] */
	uint8_t *vcpu_sec;                             /* (c) whole section */
	uint64_t *hashes;                              /* (c) host order */
	uint8_t *zeromap;                              /* (c) */
};

/* Everything stage 1 learns; shared by open and reseal. */
struct layout {
	uint64_t file_bytes;
	uint64_t mem_bytes;
	uint64_t pages;
	uint64_t flags;
	uint32_t version;
	uint32_t nsections;
	uint32_t header_bytes;
	uint64_t stored_checksum;
	uint8_t *header;                               /* header_bytes long */
	struct sp_ckpt_section sec[SP_CKPT_MAX_SECTIONS];
	int by_type[NTYPES + 1];                       /* index in sec[] */
	uint8_t *meta[SP_CKPT_MAX_SECTIONS];           /* non-MEM contents */
};

const char *sp_ckpt_section_name(uint32_t type)
{
	switch (type) {
	case SP_CKPT_SEC_VCPU: return "vcpu";
	case SP_CKPT_SEC_HASHES: return "hashes";
	case SP_CKPT_SEC_ZEROMAP: return "zeromap";
	case SP_CKPT_SEC_MEM: return "mem";
	default: return "unknown";
	}
}

const char *sp_ckpt_arch_name(uint32_t arch)
{
	return arch == SP_CKPT_ARCH_X86_64 ? "x86_64" : "unknown";
}

uint64_t sp_page_hash(const void *page)
{
	return XXH3_64bits(page, SP_PAGE_SIZE);
}

static bool page_is_zero(const uint8_t *p)
{
	static const uint8_t zero[SP_PAGE_SIZE];

	return memcmp(p, zero, SP_PAGE_SIZE) == 0;
}

static uint64_t zero_page_hash(void)
{
	static const uint8_t zero[SP_PAGE_SIZE];

	return sp_page_hash(zero);
}

static uint64_t align_up(uint64_t v, uint64_t a)
{
	return (v + a - 1) / a * a;
}

/* Full pread; -EBADMSG (via *short_read) if the file ends early. */
static int pread_all(int fd, void *buf, size_t len, uint64_t off, bool *short_read)
{
	uint8_t *p = buf;

	*short_read = false;
	while (len > 0) {
		ssize_t n = pread(fd, p, len, (off_t)off);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0) {
			*short_read = true;
			return -EBADMSG;
		}
		p += n;
		off += (uint64_t)n;
		len -= (size_t)n;
	}
	return 0;
}

static int pwrite_all(int fd, const void *buf, size_t len, uint64_t off)
{
	const uint8_t *p = buf;

	while (len > 0) {
		ssize_t n = pwrite(fd, p, len, (off_t)off);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return -EIO;
		p += n;
		off += (uint64_t)n;
		len -= (size_t)n;
	}
	return 0;
}

/* Read len bytes at off, naming what was read if that fails. */
static int read_at(int fd, void *buf, size_t len, uint64_t off, const char *what,
		   struct sp_error *err)
{
	bool short_read;
	int rc = pread_all(fd, buf, len, off, &short_read);

	if (rc == 0)
		return 0;
	if (short_read)
		return sp_error_set(err, -EBADMSG,
				    "%s: file ends before offset %llu (did it shrink while open?)",
				    what, (unsigned long long)(off + len));
	return sp_error_set(err, rc, "%s: read at offset %llu failed: %s", what,
			    (unsigned long long)off, sp_strerror(rc));
}

/* ------------------------------------------------------------------ */
/* Writer                                                              */
/* ------------------------------------------------------------------ */

static void put_section(struct sec_disk *d, uint32_t type, uint64_t off, uint64_t bytes)
{
	memset(d, 0, sizeof(*d));
	d->type = htole32(type);
	d->offset = htole64(off);
	d->bytes = htole64(bytes);
}

/* XXH3-64 over the header region (checksum field read as zero) and every
 * non-MEM section's contents in table order. */
static int meta_checksum(const uint8_t *header, uint32_t header_bytes,
			 const struct sp_ckpt_section *sec, uint32_t nsections,
			 uint8_t *const *meta, uint64_t *out)
{
	static const uint8_t zero8[8];
	XXH3_state_t *st = XXH3_createState();
	size_t ck = offsetof(struct hdr_disk, meta_checksum);

	if (st == NULL)
		return -ENOMEM;
	XXH3_64bits_reset(st);
	XXH3_64bits_update(st, header, ck);
	XXH3_64bits_update(st, zero8, sizeof(zero8));
	XXH3_64bits_update(st, header + ck + 8, header_bytes - ck - 8);
	for (uint32_t i = 0; i < nsections; i++)
		if (sec[i].type != SP_CKPT_SEC_MEM)
			XXH3_64bits_update(st, meta[i], (size_t)sec[i].bytes);
	*out = XXH3_64bits_digest(st);
	XXH3_freeState(st);
	return 0;
}

static int check_image(const struct sp_ckpt_image *img, struct sp_error *err)
{
	if (img == NULL || img->mem == NULL)
		return sp_error_set(err, -EINVAL, "no guest memory given");
	if (img->mem_bytes == 0 || img->mem_bytes % SP_PAGE_SIZE != 0)
		return sp_error_set(err, -EINVAL,
				    "mem_bytes %llu is not a positive multiple of %u",
				    (unsigned long long)img->mem_bytes, SP_PAGE_SIZE);
	if (img->mem_bytes > (uint64_t)SIZE_MAX || img->mem_bytes > (uint64_t)INT64_MAX / 2)
		return sp_error_set(err, -EINVAL, "mem_bytes %llu is too large",
				    (unsigned long long)img->mem_bytes);
	if (img->vcpu_arch != SP_CKPT_ARCH_X86_64)
		return sp_error_set(err, -EINVAL, "unknown vcpu_arch %u", img->vcpu_arch);
	if (img->vcpu_bytes > SP_CKPT_MAX_VCPU_BYTES)
		return sp_error_set(err, -EINVAL, "vcpu_bytes %u exceeds the limit of %u",
				    img->vcpu_bytes, SP_CKPT_MAX_VCPU_BYTES);
	if (img->vcpu_bytes > 0 && img->vcpu == NULL)
		return sp_error_set(err, -EINVAL, "vcpu_bytes %u but no vcpu state given",
				    img->vcpu_bytes);
	if (img->flags != 0)
		return sp_error_set(err, -EINVAL, "flags 0x%llx: no flags are defined in v1",
				    (unsigned long long)img->flags);
	return 0;
}

/* Create "<path>.tmp.<pid>.<n>" exclusively; *tmp_out is malloc'd. */
static int open_temp(const char *path, char **tmp_out, struct sp_error *err)
{
	static atomic_uint counter;
	size_t len = strlen(path) + 48;
	char *tmp = malloc(len);

	if (tmp == NULL)
		return sp_error_set(err, -ENOMEM, "out of memory");
	for (int tries = 0; tries < 100; tries++) {
		unsigned n = atomic_fetch_add(&counter, 1);
		int fd;

		snprintf(tmp, len, "%s.tmp.%ld.%u", path, (long)getpid(), n);
		fd = open(tmp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
		if (fd >= 0) {
			*tmp_out = tmp;
			return fd;
		}
		if (errno != EEXIST) {
			int rc = -errno;

			sp_error_set(err, rc, "cannot create %s: %s", tmp, sp_strerror(rc));
			free(tmp);
			return rc;
		}
	}
	free(tmp);
	return sp_error_set(err, -EEXIST, "cannot find a free temporary name next to %s", path);
}

/* fsync the directory holding path so a rename into it is durable. */
static int sync_dir(const char *path, struct sp_error *err)
{
	const char *slash = strrchr(path, '/');
	char *dir;
	int fd, rc = 0;

	if (slash == NULL)
		dir = strdup(".");
	else if (slash == path)
		dir = strdup("/");
	else
		dir = strndup(path, (size_t)(slash - path));
	if (dir == NULL)
		return sp_error_set(err, -ENOMEM, "out of memory");
	fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0 || (fsync(fd) != 0 && errno != EINVAL)) {
		rc = -errno;
		sp_error_set(err, rc, "%s written, but syncing directory %s failed: %s",
			     path, dir, sp_strerror(rc));
	}
	if (fd >= 0)
		close(fd);
	free(dir);
	return rc;
}

/* Write the pages of mem that are not zero, one pwrite per run. */
static int write_pages(int fd, const uint8_t *mem, uint64_t pages, const uint8_t *zeromap,
		       uint64_t mem_off)
{
	uint64_t p = 0;

	while (p < pages) {
		uint64_t run;
		int rc;

		if (zeromap[p / 8] & (1u << (p % 8))) {
			p++;
			continue;
		}
		for (run = 1; p + run < pages && !(zeromap[(p + run) / 8] & (1u << ((p + run) % 8)));
		     run++)
			;
		rc = pwrite_all(fd, mem + p * SP_PAGE_SIZE, (size_t)(run * SP_PAGE_SIZE),
				mem_off + p * SP_PAGE_SIZE);
		if (rc < 0)
			return rc;
		p += run;
	}
	return 0;
}

int sp_ckpt_write(const char *path, const struct sp_ckpt_image *img, struct sp_error *err)
{
	const uint8_t *mem;
	uint64_t pages, hashes_bytes, zmap_bytes, vcpu_off, hashes_off, zmap_off, mem_off;
	uint64_t vcpu_sec_bytes, meta_end, checksum;
	uint8_t *header = NULL, *meta[4] = { 0 };
	uint64_t *hashes;
	struct sp_ckpt_section sec[4];
	struct hdr_disk *h;
	struct vcpu_disk vd;
	char *tmp = NULL;
	int fd = -1, rc;

	if (path == NULL)
		return sp_error_set(err, -EINVAL, "no path given");
	rc = check_image(img, err);
	if (rc < 0)
		return rc;
	mem = img->mem;
	pages = img->mem_bytes / SP_PAGE_SIZE;
	hashes_bytes = pages * 8;
	zmap_bytes = (pages + 7) / 8;
	vcpu_sec_bytes = sizeof(vd) + (uint64_t)img->vcpu_bytes;
	vcpu_off = SP_PAGE_SIZE;
	hashes_off = align_up(vcpu_off + vcpu_sec_bytes, META_ALIGN);
	zmap_off = hashes_off + hashes_bytes;
	meta_end = zmap_off + zmap_bytes;
	mem_off = align_up(meta_end, SP_CKPT_MEM_ALIGN);

	header = calloc(1, SP_PAGE_SIZE);
	meta[0] = malloc((size_t)vcpu_sec_bytes);
	meta[1] = malloc((size_t)hashes_bytes);
	meta[2] = calloc(1, (size_t)zmap_bytes);
	if (header == NULL || meta[0] == NULL || meta[1] == NULL || meta[2] == NULL) {
		rc = sp_error_set(err, -ENOMEM, "out of memory for %llu pages of metadata",
				  (unsigned long long)pages);
		goto out;
	}

	/* Metadata contents. */
	vd.arch = htole32(img->vcpu_arch);
	vd.len = htole32(img->vcpu_bytes);
	memcpy(meta[0], &vd, sizeof(vd));
	if (img->vcpu_bytes > 0)
		memcpy(meta[0] + sizeof(vd), img->vcpu, img->vcpu_bytes);
	hashes = (uint64_t *)(void *)meta[1];
	for (uint64_t p = 0; p < pages; p++) {
		const uint8_t *page = mem + p * SP_PAGE_SIZE;
		uint64_t hv = sp_page_hash(page);

		memcpy(&hashes[p], &(uint64_t){ htole64(hv) }, 8);
		if (page_is_zero(page))
			meta[2][p / 8] |= (uint8_t)(1u << (p % 8));
	}

	/* Header region: header, section table, zero padding. */
	sec[0] = (struct sp_ckpt_section){ SP_CKPT_SEC_VCPU, 0, vcpu_off, vcpu_sec_bytes };
	sec[1] = (struct sp_ckpt_section){ SP_CKPT_SEC_HASHES, 0, hashes_off, hashes_bytes };
	sec[2] = (struct sp_ckpt_section){ SP_CKPT_SEC_ZEROMAP, 0, zmap_off, zmap_bytes };
	sec[3] = (struct sp_ckpt_section){ SP_CKPT_SEC_MEM, 0, mem_off, img->mem_bytes };
	h = (struct hdr_disk *)(void *)header;
	memcpy(h->magic, ckpt_magic, sizeof(ckpt_magic));
	h->version = htole32(SP_CKPT_VERSION);
	h->page_size = htole32(SP_PAGE_SIZE);
	h->mem_bytes = htole64(img->mem_bytes);
	h->flags = htole64(img->flags);
	h->nsections = htole32(4);
	h->header_bytes = htole32(SP_PAGE_SIZE);
	for (int i = 0; i < 4; i++)
		put_section((struct sec_disk *)(void *)(header + HDR_BYTES + i * SEC_BYTES),
			    sec[i].type, sec[i].offset, sec[i].bytes);
	rc = meta_checksum(header, SP_PAGE_SIZE, sec, 4, meta, &checksum);
	if (rc < 0) {
		sp_error_set(err, rc, "out of memory");
		goto out;
	}
	h->meta_checksum = htole64(checksum);

	fd = open_temp(path, &tmp, err);
	if (fd < 0) {
		rc = fd;
		goto out;
	}
	/* Size first: every byte not written below stays a hole. */
	if (ftruncate(fd, (off_t)(mem_off + img->mem_bytes)) != 0) {
		rc = -errno;
		sp_error_set(err, rc, "cannot size %s to %llu bytes: %s", tmp,
			     (unsigned long long)(mem_off + img->mem_bytes), sp_strerror(rc));
		goto out;
	}
	rc = pwrite_all(fd, header, SP_PAGE_SIZE, 0);
	for (int i = 0; i < 3 && rc == 0; i++)
		rc = pwrite_all(fd, meta[i], (size_t)sec[i].bytes, sec[i].offset);
	if (rc == 0)
		rc = write_pages(fd, mem, pages, meta[2], mem_off);
	if (rc < 0) {
		sp_error_set(err, rc, "cannot write %s: %s", tmp, sp_strerror(rc));
		goto out;
	}
	if (fsync(fd) != 0) {
		rc = -errno;
		sp_error_set(err, rc, "cannot sync %s: %s", tmp, sp_strerror(rc));
		goto out;
	}
	if (close(fd) != 0) {
		fd = -1;
		rc = -errno;
		sp_error_set(err, rc, "cannot close %s: %s", tmp, sp_strerror(rc));
		goto out;
	}
	fd = -1;
	if (rename(tmp, path) != 0) {
		rc = -errno;
		sp_error_set(err, rc, "cannot rename %s to %s: %s", tmp, path, sp_strerror(rc));
		goto out;
	}
	free(tmp);
	tmp = NULL;
	rc = sync_dir(path, err);
out:
	if (fd >= 0)
		close(fd);
	if (tmp != NULL) {
		unlink(tmp);
		free(tmp);
	}
	free(header);
	for (int i = 0; i < 4; i++)
		free(meta[i]);
	return rc;
}

/* ------------------------------------------------------------------ */
/* Reader, stage 1: structure                                          */
/* ------------------------------------------------------------------ */

static void layout_free(struct layout *L)
{
	free(L->header);
	for (uint32_t i = 0; i < SP_CKPT_MAX_SECTIONS; i++)
		free(L->meta[i]);
}

static int bad(struct sp_error *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int bad(struct sp_error *err, const char *fmt, ...)
{
	char msg[SP_ERRMSG_LEN];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	return sp_error_set(err, -EBADMSG, "%s", msg);
}

static int check_header(int fd, struct layout *L, struct sp_error *err)
{
	struct hdr_disk h;
	struct stat st;
	uint64_t table_end;
	int rc;

	if (fstat(fd, &st) != 0) {
		rc = -errno;
		return sp_error_set(err, rc, "cannot stat: %s", sp_strerror(rc));
	}
	if (!S_ISREG(st.st_mode))
		return sp_error_set(err, -EINVAL, "not a regular file");
	L->file_bytes = (uint64_t)st.st_size;
	if (L->file_bytes < HDR_BYTES)
		return bad(err, "file is %llu bytes, shorter than the %u-byte header",
			   (unsigned long long)L->file_bytes, HDR_BYTES);
	rc = read_at(fd, &h, sizeof(h), 0, "header", err);
	if (rc < 0)
		return rc;
	if (memcmp(h.magic, ckpt_magic, sizeof(ckpt_magic)) != 0)
		return bad(err, "bad magic %02x %02x %02x %02x %02x %02x %02x %02x: not a samepage "
			   "checkpoint (or mangled by a text-mode transfer)",
			   h.magic[0], h.magic[1], h.magic[2], h.magic[3], h.magic[4], h.magic[5],
			   h.magic[6], h.magic[7]);
	L->version = le32toh(h.version);
	if (L->version != SP_CKPT_VERSION)
		return bad(err, "unsupported version %u (this reader knows version %u)",
			   L->version, SP_CKPT_VERSION);
	if (le32toh(h.page_size) != SP_PAGE_SIZE)
		return bad(err, "page_size %u is not %u", le32toh(h.page_size), SP_PAGE_SIZE);
	for (size_t i = 0; i < sizeof(h.reserved); i++)
		if (h.reserved[i] != 0)
			return bad(err, "header reserved byte at offset %zu is 0x%02x, not 0",
				   offsetof(struct hdr_disk, reserved) + i, h.reserved[i]);
	L->flags = le64toh(h.flags);
	if (L->flags != 0)
		return bad(err, "unknown header flags 0x%llx (none are defined in v1)",
			   (unsigned long long)L->flags);
	L->mem_bytes = le64toh(h.mem_bytes);
	if (L->mem_bytes == 0 || L->mem_bytes % SP_PAGE_SIZE != 0)
		return bad(err, "mem_bytes %llu is not a positive multiple of the page size %u",
			   (unsigned long long)L->mem_bytes, SP_PAGE_SIZE);
	if (L->mem_bytes > L->file_bytes)
		return bad(err, "mem_bytes %llu exceeds the file size (%llu bytes)",
			   (unsigned long long)L->mem_bytes, (unsigned long long)L->file_bytes);
	L->pages = L->mem_bytes / SP_PAGE_SIZE;
	L->nsections = le32toh(h.nsections);
	if (L->nsections == 0 || L->nsections > SP_CKPT_MAX_SECTIONS)
		return bad(err, "nsections %u is out of range 1..%u", L->nsections,
			   SP_CKPT_MAX_SECTIONS);
	L->header_bytes = le32toh(h.header_bytes);
	table_end = HDR_BYTES + (uint64_t)L->nsections * SEC_BYTES;
	if (L->header_bytes < table_end || L->header_bytes % SP_PAGE_SIZE != 0 ||
	    L->header_bytes > SP_CKPT_MAX_HEADER_BYTES)
		return bad(err, "header_bytes %u is invalid: must be a multiple of %u, at least "
			   "%llu (header and %u section entries) and at most %u", L->header_bytes,
			   SP_PAGE_SIZE, (unsigned long long)table_end, L->nsections,
			   SP_CKPT_MAX_HEADER_BYTES);
	if (L->header_bytes > L->file_bytes)
		return bad(err, "header_bytes %u exceeds the file size (%llu bytes)",
			   L->header_bytes, (unsigned long long)L->file_bytes);
	L->stored_checksum = le64toh(h.meta_checksum);
	L->header = malloc(L->header_bytes);
	if (L->header == NULL)
		return sp_error_set(err, -ENOMEM, "out of memory");
	return read_at(fd, L->header, L->header_bytes, 0, "header", err);
}

/* Size a section of this type must have, given mem_bytes; vcpu: minimum. */
static uint64_t expected_bytes(const struct layout *L, uint32_t type)
{
	switch (type) {
	case SP_CKPT_SEC_VCPU: return sizeof(struct vcpu_disk);
	case SP_CKPT_SEC_HASHES: return L->pages * 8;
	case SP_CKPT_SEC_ZEROMAP: return (L->pages + 7) / 8;
	default: return L->mem_bytes;
	}
}

static int check_sections(struct layout *L, struct sp_error *err)
{
	uint32_t order[SP_CKPT_MAX_SECTIONS];
	uint32_t n = L->nsections;

	for (uint32_t t = 0; t <= NTYPES; t++)
		L->by_type[t] = -1;
	for (uint32_t i = 0; i < n; i++) {
		struct sec_disk d;
		struct sp_ckpt_section *s = &L->sec[i];
		const char *name;
		uint64_t end;

		memcpy(&d, L->header + HDR_BYTES + i * SEC_BYTES, sizeof(d));
		s->type = le32toh(d.type);
		s->flags = le32toh(d.flags);
		s->offset = le64toh(d.offset);
		s->bytes = le64toh(d.bytes);
		name = sp_ckpt_section_name(s->type);
		if (s->type == 0 || s->type > NTYPES)
			return bad(err, "section %u has unknown type %u", i, s->type);
		if (s->flags != 0)
			return bad(err, "section %u (%s) has unknown flags 0x%x", i, name, s->flags);
		if (d.reserved != 0)
			return bad(err, "section %u (%s) reserved field is not zero", i, name);
		if (L->by_type[s->type] >= 0)
			return bad(err, "section %u (%s) is a duplicate of section %d", i, name,
				   L->by_type[s->type]);
		L->by_type[s->type] = (int)i;
		if (__builtin_add_overflow(s->offset, s->bytes, &end))
			return bad(err, "section %u (%s): offset %llu + bytes %llu overflows", i,
				   name, (unsigned long long)s->offset,
				   (unsigned long long)s->bytes);
		if (end > L->file_bytes)
			return bad(err, "section %u (%s) ends at %llu, past end of file (%llu bytes)",
				   i, name, (unsigned long long)end,
				   (unsigned long long)L->file_bytes);
		if (s->offset < L->header_bytes)
			return bad(err, "section %u (%s) at offset %llu overlaps the header "
				   "(%u bytes)", i, name, (unsigned long long)s->offset,
				   L->header_bytes);
		if (s->offset % META_ALIGN != 0)
			return bad(err, "section %u (%s) offset %llu is not aligned to %u bytes", i,
				   name, (unsigned long long)s->offset, META_ALIGN);
	}
	for (uint32_t t = 1; t <= NTYPES; t++)
		if (L->by_type[t] < 0)
			return bad(err, "missing required section %s", sp_ckpt_section_name(t));
	for (uint32_t t = 1; t <= NTYPES; t++) {
		uint32_t i = (uint32_t)L->by_type[t];
		const struct sp_ckpt_section *s = &L->sec[i];
		uint64_t want = expected_bytes(L, t);

		if (t == SP_CKPT_SEC_VCPU) {
			if (s->bytes < want || s->bytes > want + SP_CKPT_MAX_VCPU_BYTES)
				return bad(err, "section %u (vcpu) is %llu bytes, not in %llu..%llu",
					   i, (unsigned long long)s->bytes,
					   (unsigned long long)want,
					   (unsigned long long)(want + SP_CKPT_MAX_VCPU_BYTES));
		} else if (s->bytes != want) {
			return bad(err, "section %u (%s) is %llu bytes, expected %llu for %llu pages",
				   i, sp_ckpt_section_name(t), (unsigned long long)s->bytes,
				   (unsigned long long)want, (unsigned long long)L->pages);
		}
		if (t == SP_CKPT_SEC_MEM && s->offset % SP_CKPT_MEM_ALIGN != 0)
			return bad(err, "section %u (mem) offset %llu is not aligned to %u bytes",
				   i, (unsigned long long)s->offset, SP_CKPT_MEM_ALIGN);
	}
	/* Overlap: sort indices by offset (n <= 16), compare neighbours. */
	for (uint32_t i = 0; i < n; i++) {
		uint32_t j = i;

		while (j > 0 && L->sec[order[j - 1]].offset > L->sec[i].offset) {
			order[j] = order[j - 1];
			j--;
		}
		order[j] = i;
	}
	for (uint32_t k = 1; k < n; k++) {
		const struct sp_ckpt_section *a = &L->sec[order[k - 1]], *b = &L->sec[order[k]];

		if (a->offset + a->bytes > b->offset)
			return bad(err, "sections %u (%s, %llu..%llu) and %u (%s, %llu..%llu) overlap",
				   order[k - 1], sp_ckpt_section_name(a->type),
				   (unsigned long long)a->offset,
				   (unsigned long long)(a->offset + a->bytes), order[k],
				   sp_ckpt_section_name(b->type), (unsigned long long)b->offset,
				   (unsigned long long)(b->offset + b->bytes));
	}
	return 0;
}

/* Stage 1 plus reading the metadata sections into L->meta[]. */
static int load_layout(int fd, struct layout *L, struct sp_error *err)
{
	int rc;

	memset(L, 0, sizeof(*L));
	rc = check_header(fd, L, err);
	if (rc == 0)
		rc = check_sections(L, err);
	for (uint32_t i = 0; rc == 0 && i < L->nsections; i++) {
		const struct sp_ckpt_section *s = &L->sec[i];
		char what[48];

		if (s->type == SP_CKPT_SEC_MEM)
			continue;
		/* Bounded by the file size (checked above). */
		L->meta[i] = malloc(s->bytes > 0 ? (size_t)s->bytes : 1);
		if (L->meta[i] == NULL)
			return sp_error_set(err, -ENOMEM, "out of memory for section %u (%llu bytes)",
					    i, (unsigned long long)s->bytes);
		snprintf(what, sizeof(what), "section %u (%s)", i, sp_ckpt_section_name(s->type));
		rc = read_at(fd, L->meta[i], (size_t)s->bytes, s->offset, what, err);
	}
	return rc;
}

int sp_ckpt_reseal_fd(int fd, uint64_t *checksum, struct sp_error *err)
{
	struct layout L;
	uint64_t sum, le;
	int rc = load_layout(fd, &L, err);

	if (rc == 0)
		rc = meta_checksum(L.header, L.header_bytes, L.sec, L.nsections, L.meta, &sum);
	if (rc == -ENOMEM)
		sp_error_set(err, rc, "out of memory");
	if (rc == 0) {
		le = htole64(sum);
		rc = pwrite_all(fd, &le, sizeof(le), offsetof(struct hdr_disk, meta_checksum));
		if (rc < 0)
			sp_error_set(err, rc, "cannot write checksum: %s", sp_strerror(rc));
		else if (checksum != NULL)
			*checksum = sum;
	}
	layout_free(&L);
	return rc;
}

/* ------------------------------------------------------------------ */
/* Reader, stages 2 and 3                                              */
/* ------------------------------------------------------------------ */

static int check_contents(struct sp_ckpt *c, struct layout *L, struct sp_error *err)
{
	int iv = L->by_type[SP_CKPT_SEC_VCPU], ih = L->by_type[SP_CKPT_SEC_HASHES];
	int iz = L->by_type[SP_CKPT_SEC_ZEROMAP];
	uint64_t zh = zero_page_hash(), zero_pages = 0;
	struct vcpu_disk vd;
	uint32_t arch, len;

	memcpy(&vd, L->meta[iv], sizeof(vd));
	arch = le32toh(vd.arch);
	len = le32toh(vd.len);
	if (arch != SP_CKPT_ARCH_X86_64)
		return bad(err, "section %d (vcpu) has unknown arch %u", iv, arch);
	if ((uint64_t)len + sizeof(vd) != L->sec[iv].bytes)
		return bad(err, "section %d (vcpu): state len %u does not match section size %llu "
			   "(expected %llu)", iv, len, (unsigned long long)L->sec[iv].bytes,
			   (unsigned long long)(L->sec[iv].bytes - sizeof(vd)));
	c->info.vcpu_arch = arch;
	c->info.vcpu_bytes = len;

	/* Hashes to host order, in place. */
	c->hashes = (uint64_t *)(void *)L->meta[ih];
	L->meta[ih] = NULL;
	for (uint64_t p = 0; p < L->pages; p++) {
		uint64_t v;

		memcpy(&v, &c->hashes[p], 8);
		c->hashes[p] = le64toh(v);
	}

	c->zeromap = L->meta[iz];
	L->meta[iz] = NULL;
	if (L->pages % 8 != 0 && (c->zeromap[L->pages / 8] >> (L->pages % 8)) != 0)
		return bad(err, "section %d (zeromap) has bits set past page %llu (last byte 0x%02x)",
			   iz, (unsigned long long)(L->pages - 1), c->zeromap[L->pages / 8]);
	for (uint64_t p = 0; p < L->pages; p++) {
		if (!(c->zeromap[p / 8] & (1u << (p % 8))))
			continue;
		if (c->hashes[p] != zh)
			return bad(err, "page %llu is marked zero but its index hash is 0x%016llx, "
				   "not the zero page's 0x%016llx", (unsigned long long)p,
				   (unsigned long long)c->hashes[p], (unsigned long long)zh);
		zero_pages++;
	}
	c->info.zero_pages = zero_pages;

	c->vcpu_sec = L->meta[iv];
	L->meta[iv] = NULL;
	return 0;
}

int sp_ckpt_open_fd(int fd, struct sp_ckpt **out, struct sp_error *err)
{
	struct sp_ckpt *c;
	struct layout L;
	uint64_t sum;
	int rc;

	if (out == NULL)
		return sp_error_set(err, -EINVAL, "no result pointer given");
	*out = NULL;
	c = calloc(1, sizeof(*c));
	if (c == NULL)
		return sp_error_set(err, -ENOMEM, "out of memory");
	c->fd = -1;
	rc = load_layout(fd, &L, err);
	if (rc < 0)
		goto fail;
	rc = meta_checksum(L.header, L.header_bytes, L.sec, L.nsections, L.meta, &sum);
	if (rc < 0) {
		sp_error_set(err, rc, "out of memory");
		goto fail;
	}
	if (sum != L.stored_checksum) {
		rc = bad(err, "metadata checksum mismatch: header says 0x%016llx, computed 0x%016llx",
			 (unsigned long long)L.stored_checksum, (unsigned long long)sum);
		goto fail;
	}
	rc = check_contents(c, &L, err);
	if (rc < 0)
		goto fail;
	c->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
	if (c->fd < 0) {
		rc = -errno;
		sp_error_set(err, rc, "cannot duplicate descriptor: %s", sp_strerror(rc));
		goto fail;
	}
	memcpy(c->sec, L.sec, sizeof(c->sec));
	c->mem = &c->sec[L.by_type[SP_CKPT_SEC_MEM]];
	c->info.version = L.version;
	c->info.page_size = SP_PAGE_SIZE;
	c->info.mem_bytes = L.mem_bytes;
	c->info.mem_offset = c->mem->offset;
	c->info.pages = L.pages;
	c->info.flags = L.flags;
	c->info.nsections = L.nsections;
	c->info.meta_checksum = sum;
	c->info.file_bytes = L.file_bytes;
	layout_free(&L);
	*out = c;
	return 0;
fail:
	layout_free(&L);
	sp_ckpt_close(c);
	return rc;
}

int sp_ckpt_open(const char *path, struct sp_ckpt **out, struct sp_error *err)
{
	int fd, rc;

	if (out != NULL)
		*out = NULL;
	if (path == NULL)
		return sp_error_set(err, -EINVAL, "no path given");
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		rc = -errno;
		return sp_error_set(err, rc, "cannot open: %s", sp_strerror(rc));
	}
	rc = sp_ckpt_open_fd(fd, out, err);
	close(fd);
	return rc;
}

void sp_ckpt_close(struct sp_ckpt *c)
{
	if (c == NULL)
		return;
	if (c->fd >= 0)
		close(c->fd);
	free(c->vcpu_sec);
	free(c->hashes);
	free(c->zeromap);
	free(c);
}

const struct sp_ckpt_info *sp_ckpt_info(const struct sp_ckpt *c)
{
	return &c->info;
}

int sp_ckpt_fd(const struct sp_ckpt *c)
{
	return c->fd;
}

const void *sp_ckpt_vcpu(const struct sp_ckpt *c)
{
	return c->vcpu_sec + sizeof(struct vcpu_disk);
}

const uint64_t *sp_ckpt_hashes(const struct sp_ckpt *c)
{
	return c->hashes;
}

const struct sp_ckpt_section *sp_ckpt_section(const struct sp_ckpt *c, uint32_t i)
{
	return i < c->info.nsections ? &c->sec[i] : NULL;
}

int sp_ckpt_page_is_zero(const struct sp_ckpt *c, uint64_t page)
{
	if (page >= c->info.pages)
		return -ERANGE;
	return (c->zeromap[page / 8] >> (page % 8)) & 1;
}

int sp_ckpt_verify(const struct sp_ckpt *c, uint64_t *bad_pages, struct sp_error *err)
{
	uint64_t pages = c->info.pages, nbad = 0, first = 0, first_hash = 0;
	size_t chunk = IO_CHUNK_BYTES;
	uint8_t *buf;
	int rc = 0;

	if (bad_pages != NULL)
		*bad_pages = 0;
	if (chunk > c->info.mem_bytes)
		chunk = (size_t)c->info.mem_bytes;
	buf = malloc(chunk);
	if (buf == NULL)
		return sp_error_set(err, -ENOMEM, "out of memory");
	for (uint64_t done = 0; done < c->info.mem_bytes; done += chunk) {
		size_t len = c->info.mem_bytes - done < chunk ? (size_t)(c->info.mem_bytes - done)
							      : chunk;

		rc = read_at(c->fd, buf, len, c->info.mem_offset + done, "section mem", err);
		if (rc < 0)
			goto out;
		for (size_t off = 0; off < len; off += SP_PAGE_SIZE) {
			uint64_t p = (done + off) / SP_PAGE_SIZE;
			uint64_t hv = sp_page_hash(buf + off);

			if (hv == c->hashes[p])
				continue;
			if (nbad++ == 0) {
				first = p;
				first_hash = hv;
			}
		}
	}
	if (bad_pages != NULL)
		*bad_pages = nbad;
	if (nbad > 0)
		rc = bad(err, "page %llu (file offset %llu%s) hash 0x%016llx does not match the "
			 "index 0x%016llx; %llu of %llu pages bad", (unsigned long long)first,
			 (unsigned long long)(c->info.mem_offset + first * SP_PAGE_SIZE),
			 sp_ckpt_page_is_zero(c, first) == 1 ? ", marked zero" : "",
			 (unsigned long long)first_hash, (unsigned long long)c->hashes[first],
			 (unsigned long long)nbad, (unsigned long long)pages);
out:
	free(buf);
	return rc;
}

int sp_ckpt_read_mem(const struct sp_ckpt *c, void *buf, struct sp_error *err)
{
	if (buf == NULL)
		return sp_error_set(err, -EINVAL, "no buffer given");
	return read_at(c->fd, buf, (size_t)c->info.mem_bytes, c->info.mem_offset, "section mem",
		       err);
}
