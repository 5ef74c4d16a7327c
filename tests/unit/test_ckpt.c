/* SPDX-License-Identifier: MIT */
/*
 * Tests for checkpoint format v1 (lib/ckpt, docs/format.md): a round trip
 * that checks every field, the memory, the hash index, the zero bitmap and
 * that zero pages are holes; then every malformed file the reader must
 * reject, each made by corrupting a good file at the byte offsets the spec
 * gives, each asserting -EBADMSG and a message naming the problem. Cases
 * that corrupt checksummed metadata re-seal the checksum first, so the
 * specific check (not the checksum) is what rejects them.
 *
 * With SP_CKPT_FIXTURES=DIR in the environment the binary instead writes a
 * good checkpoint and every corrupted variant into DIR (good.ckpt,
 * bad-<case>.ckpt, badpage-<case>.ckpt, and fuzz seeds *.fuzz in the
 * encoding of tests/fuzz/fuzz_ckpt.c) and exits; tests/ckpt_cli.sh runs the
 * `samepage ckpt` tool over them.
 */
#include <dirent.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include "samepage/ckpt.h"
#include "testutil.h"

/* Byte offsets from docs/format.md. */
#define H_MAGIC 0
#define H_VERSION 8
#define H_PAGE_SIZE 12
#define H_MEM_BYTES 16
#define H_FLAGS 24
#define H_NSECTIONS 32
#define H_HEADER_BYTES 36
#define H_CHECKSUM 40
#define H_RESERVED 48
#define SEC_TABLE 64
#define SEC_ENTRY 32
#define S_TYPE 0
#define S_FLAGS 4
#define S_OFFSET 8
#define S_BYTES 16
#define S_RESERVED 24

#define PAGES 601u              /* not a multiple of 8: zeromap has padding */
#define VCPU_BYTES 300u

static char tdir[256];
static char good[300];

/* Where the good file's sections are, read back through the API. */
struct lay {
	int idx[5];             /* table index by type */
	uint64_t off[5], bytes[5];
	uint64_t file_bytes, mem_offset;
};

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t rng(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

static bool want_zero(uint64_t p)
{
	return p % 7 == 3 || (p >= 100 && p < 500);
}

/* Guest memory of pages pages: zero where want_zero(), random elsewhere. */
static uint8_t *make_mem(uint64_t pages)
{
	uint8_t *m = calloc(pages, SP_PAGE_SIZE);

	ck_assert_ptr_nonnull(m);
	for (uint64_t p = 0; p < pages; p++) {
		if (want_zero(p))
			continue;
		for (size_t i = 0; i < SP_PAGE_SIZE; i += 8) {
			uint64_t v = rng();

			memcpy(m + p * SP_PAGE_SIZE + i, &v, 8);
		}
		m[p * SP_PAGE_SIZE] = 1;
	}
	return m;
}

static uint8_t vcpu_blob[VCPU_BYTES];

static struct sp_ckpt_image make_image(const uint8_t *mem, uint64_t pages)
{
	for (size_t i = 0; i < sizeof(vcpu_blob); i++)
		vcpu_blob[i] = (uint8_t)(i * 7 + 1);
	return (struct sp_ckpt_image){
		.mem = mem, .mem_bytes = pages * SP_PAGE_SIZE,
		.vcpu_arch = SP_CKPT_ARCH_X86_64, .vcpu = vcpu_blob, .vcpu_bytes = VCPU_BYTES,
	};
}

static void write_good(const char *path, uint64_t pages)
{
	struct sp_error err = { 0 };
	uint8_t *mem = make_mem(pages);
	struct sp_ckpt_image img = make_image(mem, pages);
	int rc = sp_ckpt_write(path, &img, &err);

	ck_assert_msg(rc == 0, "sp_ckpt_write: %d %s", rc, err.msg);
	free(mem);
}

static void get_lay(const char *path, struct lay *l)
{
	struct sp_error err = { 0 };
	struct sp_ckpt *c;
	int rc = sp_ckpt_open(path, &c, &err);

	ck_assert_msg(rc == 0, "open good file: %s", err.msg);
	for (uint32_t i = 0; i < sp_ckpt_info(c)->nsections; i++) {
		const struct sp_ckpt_section *s = sp_ckpt_section(c, i);

		l->idx[s->type] = (int)i;
		l->off[s->type] = s->offset;
		l->bytes[s->type] = s->bytes;
	}
	l->file_bytes = sp_ckpt_info(c)->file_bytes;
	l->mem_offset = sp_ckpt_info(c)->mem_offset;
	sp_ckpt_close(c);
}

static void put(int fd, uint64_t off, uint64_t v, int width)
{
	uint8_t b[8];

	for (int i = 0; i < width; i++)
		b[i] = (uint8_t)(v >> (8 * i));
	ck_assert_int_eq(pwrite(fd, b, (size_t)width, (off_t)off), width);
}

static uint64_t get(int fd, uint64_t off, int width)
{
	uint8_t b[8] = { 0 };
	uint64_t v = 0;

	ck_assert_int_eq(pread(fd, b, (size_t)width, (off_t)off), width);
	for (int i = 0; i < width; i++)
		v |= (uint64_t)b[i] << (8 * i);
	return v;
}

static void flip(int fd, uint64_t off)
{
	put(fd, off, get(fd, off, 1) ^ 0x5a, 1);
}

static uint64_t sec_field(const struct lay *l, uint32_t type, int field)
{
	return SEC_TABLE + (uint64_t)l->idx[type] * SEC_ENTRY + (uint64_t)field;
}

/* ------------------------------------------------------------------ */
/* Corruptions                                                         */
/* ------------------------------------------------------------------ */

struct bad_case {
	const char *name;
	void (*mutate)(int fd, const struct lay *l);
	bool reseal;            /* re-seal so the specific check is reached */
	const char *word;       /* the message must contain this */
};

#define MUT(fn, body) \
	static void fn(int fd, const struct lay *l) { (void)fd; (void)l; body; }

MUT(m_trunc0, ck_assert_int_eq(ftruncate(fd, 0), 0))
MUT(m_trunc10, ck_assert_int_eq(ftruncate(fd, 10), 0))
MUT(m_trunc63, ck_assert_int_eq(ftruncate(fd, 63), 0))
MUT(m_trunc64, ck_assert_int_eq(ftruncate(fd, 64), 0))
MUT(m_trunc4095, ck_assert_int_eq(ftruncate(fd, 4095), 0))
MUT(m_trunc_hashes, ck_assert_int_eq(ftruncate(fd, (off_t)l->off[SP_CKPT_SEC_HASHES] + 16), 0))
MUT(m_trunc_mem, ck_assert_int_eq(ftruncate(fd, (off_t)l->mem_offset), 0))
MUT(m_trunc_end, ck_assert_int_eq(ftruncate(fd, (off_t)l->file_bytes - 1), 0))
MUT(m_magic, put(fd, H_MAGIC, 'X', 1))
MUT(m_magic_crlf, put(fd, H_MAGIC + 6, '\n', 1))
MUT(m_version, put(fd, H_VERSION, 2, 4))
MUT(m_page_size, put(fd, H_PAGE_SIZE, 8192, 4))
MUT(m_mem_huge, put(fd, H_MEM_BYTES, 1ull << 63, 8))
MUT(m_mem_odd, put(fd, H_MEM_BYTES, 4095, 8))
MUT(m_mem_zero, put(fd, H_MEM_BYTES, 0, 8))
MUT(m_mem_smaller, put(fd, H_MEM_BYTES, (PAGES - 1) * SP_PAGE_SIZE, 8))
MUT(m_flags, put(fd, H_FLAGS, 1, 8))
MUT(m_reserved, put(fd, H_RESERVED + 5, 1, 1))
MUT(m_nsec0, put(fd, H_NSECTIONS, 0, 4))
MUT(m_nsec17, put(fd, H_NSECTIONS, 17, 4))
MUT(m_nsec_huge, put(fd, H_NSECTIONS, 0xffffffffu, 4))
MUT(m_hdr_small, put(fd, H_HEADER_BYTES, 100, 4))
MUT(m_hdr_huge, put(fd, H_HEADER_BYTES, 1u << 31, 4))
MUT(m_sec_overflow, put(fd, sec_field(l, SP_CKPT_SEC_HASHES, S_OFFSET), ~0ull - 7, 8))
MUT(m_sec_bytes_overflow, put(fd, sec_field(l, SP_CKPT_SEC_VCPU, S_BYTES), ~0ull, 8))
MUT(m_sec_eof, put(fd, sec_field(l, SP_CKPT_SEC_ZEROMAP, S_OFFSET), l->file_bytes, 8))
MUT(m_sec_in_header, put(fd, sec_field(l, SP_CKPT_SEC_VCPU, S_OFFSET), 8, 8))
MUT(m_sec_misaligned, put(fd, sec_field(l, SP_CKPT_SEC_ZEROMAP, S_OFFSET),
			  l->off[SP_CKPT_SEC_ZEROMAP] + 1, 8))
MUT(m_sec_type, put(fd, sec_field(l, SP_CKPT_SEC_ZEROMAP, S_TYPE), 99, 4))
MUT(m_sec_type0, put(fd, sec_field(l, SP_CKPT_SEC_VCPU, S_TYPE), 0, 4))
MUT(m_sec_flags, put(fd, sec_field(l, SP_CKPT_SEC_MEM, S_FLAGS), 4, 4))
MUT(m_sec_reserved, put(fd, sec_field(l, SP_CKPT_SEC_MEM, S_RESERVED), 1, 8))
MUT(m_sec_dup, put(fd, sec_field(l, SP_CKPT_SEC_ZEROMAP, S_TYPE), SP_CKPT_SEC_HASHES, 4))
MUT(m_sec_missing, put(fd, H_NSECTIONS, 3, 4))
MUT(m_hashes_size, put(fd, sec_field(l, SP_CKPT_SEC_HASHES, S_BYTES),
		       l->bytes[SP_CKPT_SEC_HASHES] - 8, 8))
MUT(m_zeromap_size, put(fd, sec_field(l, SP_CKPT_SEC_ZEROMAP, S_BYTES),
			l->bytes[SP_CKPT_SEC_ZEROMAP] + 1, 8))
MUT(m_mem_size, put(fd, sec_field(l, SP_CKPT_SEC_MEM, S_BYTES),
		    l->bytes[SP_CKPT_SEC_MEM] - SP_PAGE_SIZE, 8))
MUT(m_mem_misaligned, put(fd, sec_field(l, SP_CKPT_SEC_MEM, S_OFFSET),
			  l->mem_offset - SP_PAGE_SIZE, 8))
MUT(m_vcpu_small, put(fd, sec_field(l, SP_CKPT_SEC_VCPU, S_BYTES), 4, 8))
MUT(m_vcpu_huge, put(fd, sec_field(l, SP_CKPT_SEC_VCPU, S_BYTES), 8 + (2u << 20), 8))
MUT(m_overlap, put(fd, sec_field(l, SP_CKPT_SEC_ZEROMAP, S_OFFSET),
		   l->off[SP_CKPT_SEC_HASHES] + 8, 8))
MUT(m_csum_hash, flip(fd, l->off[SP_CKPT_SEC_HASHES] + 8 * 11 + 3))
MUT(m_csum_field, flip(fd, H_CHECKSUM + 2))
MUT(m_csum_vcpu, flip(fd, l->off[SP_CKPT_SEC_VCPU] + 8 + 100))
MUT(m_csum_padding, flip(fd, 2000))
MUT(m_csum_zeromap, flip(fd, l->off[SP_CKPT_SEC_ZEROMAP] + 2))
MUT(m_vcpu_len, put(fd, l->off[SP_CKPT_SEC_VCPU] + 4, VCPU_BYTES + 1, 4))
MUT(m_vcpu_len_huge, put(fd, l->off[SP_CKPT_SEC_VCPU] + 4, 0xfffffff8u, 4))
MUT(m_vcpu_arch, put(fd, l->off[SP_CKPT_SEC_VCPU], 7, 4))
MUT(m_zeromap_pad, put(fd, l->off[SP_CKPT_SEC_ZEROMAP] + PAGES / 8, 0x80, 1))
MUT(m_zero_hash, flip(fd, l->off[SP_CKPT_SEC_HASHES] + 8 * 3))

static const struct bad_case bad_cases[] = {
	{ "truncated-0", m_trunc0, false, "file" },
	{ "truncated-10", m_trunc10, false, "file" },
	{ "truncated-63", m_trunc63, false, "file" },
	{ "truncated-64", m_trunc64, false, "file" },
	{ "truncated-4095", m_trunc4095, false, "file" },
	{ "truncated-in-hashes", m_trunc_hashes, false, "file" },
	{ "truncated-at-mem", m_trunc_mem, false, "file" },
	{ "truncated-in-mem", m_trunc_end, false, "past end of file" },
	{ "magic", m_magic, false, "magic" },
	{ "magic-crlf", m_magic_crlf, false, "magic" },
	{ "version-2", m_version, false, "version 2" },
	{ "page-size-8192", m_page_size, false, "page_size 8192" },
	{ "mem-bytes-2p63", m_mem_huge, false, "mem_bytes 9223372036854775808" },
	{ "mem-bytes-4095", m_mem_odd, false, "mem_bytes 4095" },
	{ "mem-bytes-0", m_mem_zero, false, "mem_bytes 0" },
	{ "mem-bytes-smaller", m_mem_smaller, false, "(hashes)" },
	{ "header-flags", m_flags, false, "flags" },
	{ "header-reserved", m_reserved, false, "reserved" },
	{ "nsections-0", m_nsec0, false, "nsections 0" },
	{ "nsections-17", m_nsec17, false, "nsections 17" },
	{ "nsections-huge", m_nsec_huge, false, "nsections 4294967295" },
	{ "header-bytes-100", m_hdr_small, false, "header_bytes 100" },
	{ "header-bytes-2g", m_hdr_huge, false, "header_bytes" },
	{ "section-offset-overflow", m_sec_overflow, false, "overflows" },
	{ "section-bytes-overflow", m_sec_bytes_overflow, false, "overflows" },
	{ "section-past-eof", m_sec_eof, false, "past end of file" },
	{ "section-in-header", m_sec_in_header, false, "overlaps the header" },
	{ "section-misaligned", m_sec_misaligned, false, "not aligned" },
	{ "section-unknown-type", m_sec_type, false, "unknown type 99" },
	{ "section-type-0", m_sec_type0, false, "unknown type 0" },
	{ "section-flags", m_sec_flags, false, "flags" },
	{ "section-reserved", m_sec_reserved, false, "reserved" },
	{ "section-duplicate", m_sec_dup, false, "duplicate" },
	{ "section-missing", m_sec_missing, false, "missing required section mem" },
	{ "hashes-size", m_hashes_size, false, "(hashes) is 4800 bytes, expected 4808" },
	{ "zeromap-size", m_zeromap_size, false, "(zeromap)" },
	{ "mem-size", m_mem_size, false, "(mem)" },
	{ "mem-misaligned", m_mem_misaligned, false, "(mem) offset" },
	{ "vcpu-section-small", m_vcpu_small, false, "(vcpu)" },
	{ "vcpu-section-huge", m_vcpu_huge, false, "(vcpu)" },
	{ "sections-overlap", m_overlap, false, "overlap" },
	{ "checksum-hash-index", m_csum_hash, false, "checksum" },
	{ "checksum-field", m_csum_field, false, "checksum" },
	{ "checksum-vcpu", m_csum_vcpu, false, "checksum" },
	{ "checksum-header-padding", m_csum_padding, false, "checksum" },
	{ "checksum-zeromap", m_csum_zeromap, false, "checksum" },
	{ "vcpu-len", m_vcpu_len, true, "state len 301" },
	{ "vcpu-len-huge", m_vcpu_len_huge, true, "state len" },
	{ "vcpu-arch", m_vcpu_arch, true, "arch 7" },
	{ "zeromap-padding", m_zeromap_pad, true, "past page 600" },
	{ "zero-page-hash", m_zero_hash, true, "page 3 is marked zero" },
};
#define NBAD ((int)(sizeof(bad_cases) / sizeof(bad_cases[0])))

/* Apply case k to the file at path (a copy of a good file). */
static void corrupt(const char *path, const struct lay *l, const struct bad_case *bc)
{
	struct sp_error err = { 0 };
	int fd = open(path, O_RDWR);

	ck_assert_int_ge(fd, 0);
	bc->mutate(fd, l);
	if (bc->reseal) {
		int rc = sp_ckpt_reseal_fd(fd, NULL, &err);

		ck_assert_msg(rc == 0, "%s: reseal failed: %s", bc->name, err.msg);
	}
	close(fd);
}

/* Page corruptions the reader accepts but sp_ckpt_verify() rejects. */
struct page_case {
	const char *name;
	uint64_t pages[2];      /* pages to change (UINT64_MAX: none) */
	const char *word;
};

static const struct page_case page_cases[] = {
	{ "one-page", { 7, UINT64_MAX }, "page 7 " },
	{ "two-pages", { 20, 599 }, "2 of 601 pages bad" },
	{ "zero-page-written", { 3, UINT64_MAX }, "marked zero" },
};

static void corrupt_pages(const char *path, const struct lay *l, const struct page_case *pc)
{
	int fd = open(path, O_RDWR);

	ck_assert_int_ge(fd, 0);
	for (int i = 0; i < 2; i++)
		if (pc->pages[i] != UINT64_MAX)
			flip(fd, l->mem_offset + pc->pages[i] * SP_PAGE_SIZE + 100);
	close(fd);
}

/* ------------------------------------------------------------------ */
/* Fixtures                                                            */
/* ------------------------------------------------------------------ */

static void rm_dir(const char *d)
{
	DIR *dir = opendir(d);
	struct dirent *e;
	char p[600];

	if (dir == NULL)
		return;
	while ((e = readdir(dir)) != NULL) {
		if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
			continue;
		snprintf(p, sizeof(p), "%s/%s", d, e->d_name);
		unlink(p);
	}
	closedir(dir);
	rmdir(d);
}

static void setup(void)
{
	const char *t = getenv("TMPDIR");

	snprintf(tdir, sizeof(tdir), "%s/sp-ckpt-XXXXXX", t != NULL ? t : "/tmp");
	ck_assert_ptr_nonnull(mkdtemp(tdir));
	snprintf(good, sizeof(good), "%s/good.ckpt", tdir);
	write_good(good, PAGES);
}

static void teardown(void)
{
	rm_dir(tdir);
}

static int count_entries(const char *d)
{
	DIR *dir = opendir(d);
	struct dirent *e;
	int n = 0;

	ck_assert_ptr_nonnull(dir);
	while ((e = readdir(dir)) != NULL)
		n += e->d_name[0] != '.';
	closedir(dir);
	return n;
}

/* ------------------------------------------------------------------ */
/* Tests                                                               */
/* ------------------------------------------------------------------ */

START_TEST(test_round_trip)
{
	struct sp_error err = { 0 };
	uint8_t *mem, *back;
	struct sp_ckpt *c;
	const struct sp_ckpt_info *in;
	uint64_t nzero = 0, nbad = 99;
	struct stat st;

	rng_state = 0x9e3779b97f4a7c15ull;
	mem = make_mem(PAGES);
	ck_assert_int_eq(sp_ckpt_open(good, &c, &err), 0);
	in = sp_ckpt_info(c);
	ck_assert_uint_eq(in->version, 1);
	ck_assert_uint_eq(in->page_size, 4096);
	ck_assert_uint_eq(in->mem_bytes, PAGES * 4096ull);
	ck_assert_uint_eq(in->pages, PAGES);
	ck_assert_uint_eq(in->mem_offset % SP_CKPT_MEM_ALIGN, 0);
	ck_assert_uint_eq(in->mem_offset, SP_CKPT_MEM_ALIGN);
	ck_assert_uint_eq(in->flags, 0);
	ck_assert_uint_eq(in->vcpu_arch, SP_CKPT_ARCH_X86_64);
	ck_assert_uint_eq(in->vcpu_bytes, VCPU_BYTES);
	ck_assert_uint_eq(in->nsections, 4);
	ck_assert_uint_eq(in->file_bytes, in->mem_offset + in->mem_bytes);
	ck_assert_mem_eq(sp_ckpt_vcpu(c), vcpu_blob, VCPU_BYTES);

	back = malloc(PAGES * SP_PAGE_SIZE);
	ck_assert_int_eq(sp_ckpt_read_mem(c, back, &err), 0);
	ck_assert_int_eq(memcmp(back, mem, PAGES * SP_PAGE_SIZE), 0);
	for (uint64_t p = 0; p < PAGES; p++) {
		ck_assert_uint_eq(sp_ckpt_hashes(c)[p], sp_page_hash(mem + p * SP_PAGE_SIZE));
		ck_assert_int_eq(sp_ckpt_page_is_zero(c, p), want_zero(p));
		nzero += want_zero(p);
	}
	ck_assert_uint_eq(in->zero_pages, nzero);
	ck_assert_int_eq(sp_ckpt_verify(c, &nbad, &err), 0);
	ck_assert_uint_eq(nbad, 0);

	/* Zero pages are holes: allocation covers metadata and data pages only
	 * (plus slack for the file system), far below the apparent size. */
	ck_assert_int_eq(fstat(sp_ckpt_fd(c), &st), 0);
	ck_assert_uint_eq((uint64_t)st.st_size, in->file_bytes);
	ck_assert_msg((uint64_t)st.st_blocks * 512 <= (PAGES - nzero + 4 + 16) * 4096ull,
		      "%lld bytes allocated for %llu data pages: zero pages are not holes",
		      (long long)st.st_blocks * 512, (unsigned long long)(PAGES - nzero));
	sp_ckpt_close(c);
	free(mem);
	free(back);
}
END_TEST

START_TEST(test_accessors)
{
	struct sp_error err = { 0 };
	struct sp_ckpt *c;
	uint64_t end = 0;

	ck_assert_int_eq(sp_ckpt_open(good, &c, &err), 0);
	ck_assert_int_eq(sp_ckpt_page_is_zero(c, PAGES), -ERANGE);
	ck_assert_int_eq(sp_ckpt_page_is_zero(c, UINT64_MAX), -ERANGE);
	ck_assert_ptr_null(sp_ckpt_section(c, 4));
	for (uint32_t i = 0; i < 4; i++) {
		const struct sp_ckpt_section *s = sp_ckpt_section(c, i);

		ck_assert_uint_eq(s->type, i + 1);   /* writer's order */
		ck_assert_uint_ge(s->offset, end);
		ck_assert_uint_eq(s->offset % 8, 0);
		end = s->offset + s->bytes;
	}
	ck_assert_str_eq(sp_ckpt_section_name(SP_CKPT_SEC_HASHES), "hashes");
	ck_assert_str_eq(sp_ckpt_section_name(0), "unknown");
	ck_assert_str_eq(sp_ckpt_arch_name(SP_CKPT_ARCH_X86_64), "x86_64");
	ck_assert_str_eq(sp_ckpt_arch_name(0), "unknown");
	ck_assert_uint_eq(sp_page_hash((uint8_t[SP_PAGE_SIZE]){ 0 }),
			  sp_ckpt_hashes(c)[3]);
	sp_ckpt_close(c);
	sp_ckpt_close(NULL);
}
END_TEST

START_TEST(test_small_images)
{
	static const uint32_t sizes[] = { 1, 8, 9 };
	struct sp_error err = { 0 };
	struct sp_ckpt *c;

	for (size_t k = 0; k < 3; k++) {
		uint8_t *mem = make_mem(sizes[k]);
		struct sp_ckpt_image img = make_image(mem, sizes[k]);
		uint64_t nbad;

		img.vcpu = NULL;
		img.vcpu_bytes = 0;
		ck_assert_int_eq(sp_ckpt_write(good, &img, &err), 0);
		ck_assert_msg(sp_ckpt_open(good, &c, &err) == 0, "%u pages: %s", sizes[k], err.msg);
		ck_assert_uint_eq(sp_ckpt_info(c)->pages, sizes[k]);
		ck_assert_uint_eq(sp_ckpt_info(c)->vcpu_bytes, 0);
		ck_assert_uint_eq(sp_ckpt_info(c)->mem_offset, SP_CKPT_MEM_ALIGN);
		ck_assert_int_eq(sp_ckpt_verify(c, &nbad, &err), 0);
		sp_ckpt_close(c);
		free(mem);
	}
}
END_TEST

START_TEST(test_write_errors)
{
	struct sp_error err = { 0 };
	uint8_t mem[2 * SP_PAGE_SIZE] = { 1 };
	struct sp_ckpt_image img = make_image(mem, 2);
	char path[600];

	img.mem_bytes = 0;
	ck_assert_int_eq(sp_ckpt_write(good, &img, &err), -EINVAL);
	ck_assert_ptr_nonnull(strstr(err.msg, "mem_bytes"));
	img.mem_bytes = 4097;
	ck_assert_int_eq(sp_ckpt_write(good, &img, &err), -EINVAL);
	img.mem_bytes = 8192;
	img.flags = 1;
	ck_assert_int_eq(sp_ckpt_write(good, &img, &err), -EINVAL);
	ck_assert_ptr_nonnull(strstr(err.msg, "flags"));
	img.flags = 0;
	img.vcpu_arch = 9;
	ck_assert_int_eq(sp_ckpt_write(good, &img, &err), -EINVAL);
	img.vcpu_arch = SP_CKPT_ARCH_X86_64;
	img.vcpu = NULL;
	ck_assert_int_eq(sp_ckpt_write(good, &img, &err), -EINVAL);
	ck_assert_int_eq(sp_ckpt_write(good, NULL, &err), -EINVAL);
	ck_assert_int_eq(sp_ckpt_write(NULL, &img, NULL), -EINVAL);
	img.vcpu = vcpu_blob;

	snprintf(path, sizeof(path), "%s/no/such/dir.ckpt", tdir);
	ck_assert_int_eq(sp_ckpt_write(path, &img, &err), -ENOENT);
	ck_assert_ptr_nonnull(strstr(err.msg, "cannot create"));

	/* Replacing an existing file leaves exactly the new file behind. */
	ck_assert_int_eq(sp_ckpt_write(good, &img, &err), 0);
	ck_assert_int_eq(count_entries(tdir), 1);
}
END_TEST

START_TEST(test_open_errors)
{
	struct sp_error err = { 0 };
	struct sp_ckpt *c = (struct sp_ckpt *)1;
	char path[600];

	snprintf(path, sizeof(path), "%s/missing.ckpt", tdir);
	ck_assert_int_eq(sp_ckpt_open(path, &c, &err), -ENOENT);
	ck_assert_ptr_null(c);
	ck_assert_ptr_nonnull(strstr(err.msg, "cannot open"));
	ck_assert_int_eq(sp_ckpt_open(tdir, &c, &err), -EINVAL);
	ck_assert_ptr_nonnull(strstr(err.msg, "regular file"));
	ck_assert_int_eq(sp_ckpt_open(good, NULL, &err), -EINVAL);
}
END_TEST

START_TEST(test_open_fd_memfd)
{
	struct sp_error err = { 0 };
	struct sp_ckpt *c;
	struct lay l = { 0 };
	uint8_t *buf;
	uint64_t nbad;
	int src = open(good, O_RDONLY), mfd = memfd_create("ckpt", MFD_CLOEXEC);

	get_lay(good, &l);
	buf = malloc(l.file_bytes);
	ck_assert_int_eq(pread(src, buf, l.file_bytes, 0), (ssize_t)l.file_bytes);
	ck_assert_int_eq(pwrite(mfd, buf, l.file_bytes, 0), (ssize_t)l.file_bytes);
	close(src);
	ck_assert_int_eq(sp_ckpt_open_fd(mfd, &c, &err), 0);
	close(mfd);             /* the checkpoint holds its own descriptor */
	ck_assert_uint_eq(sp_ckpt_info(c)->pages, PAGES);
	ck_assert_int_eq(sp_ckpt_verify(c, &nbad, &err), 0);
	sp_ckpt_close(c);
	free(buf);
}
END_TEST

START_TEST(test_reseal_good_is_identity)
{
	struct sp_error err = { 0 };
	struct sp_ckpt *c;
	uint64_t before, after;
	int fd;

	ck_assert_int_eq(sp_ckpt_open(good, &c, &err), 0);
	before = sp_ckpt_info(c)->meta_checksum;
	sp_ckpt_close(c);
	fd = open(good, O_RDWR);
	ck_assert_int_eq(sp_ckpt_reseal_fd(fd, &after, &err), 0);
	close(fd);
	ck_assert_uint_eq(before, after);
	fd = open(good, O_RDONLY);
	ck_assert_uint_eq(get(fd, H_CHECKSUM, 8), before);
	/* A read-only descriptor cannot be resealed, and says why. */
	ck_assert_int_eq(sp_ckpt_reseal_fd(fd, NULL, &err), -EBADF);
	ck_assert_ptr_nonnull(strstr(err.msg, "checksum"));
	close(fd);
}
END_TEST

/* One process per malformed file (a loop test over bad_cases). */
START_TEST(test_malformed)
{
	const struct bad_case *bc = &bad_cases[_i];
	struct sp_error err = { 0 };
	struct sp_ckpt *c = (struct sp_ckpt *)1;
	struct lay l = { 0 };
	int rc;

	get_lay(good, &l);
	corrupt(good, &l, bc);
	rc = sp_ckpt_open(good, &c, &err);
	ck_assert_msg(rc == -EBADMSG, "%s: open returned %d (%s), want -EBADMSG", bc->name, rc,
		      err.msg);
	ck_assert_int_eq(err.code, -EBADMSG);
	ck_assert_ptr_null(c);
	ck_assert_msg(strstr(err.msg, bc->word) != NULL, "%s: message \"%s\" lacks \"%s\"",
		      bc->name, err.msg, bc->word);
	ck_assert_ptr_null(strchr(err.msg, '\n'));
}
END_TEST

START_TEST(test_bad_pages)
{
	const struct page_case *pc = &page_cases[_i];
	struct sp_error err = { 0 };
	struct sp_ckpt *c;
	struct lay l = { 0 };
	uint64_t nbad = 0, want = 0;
	int rc;

	get_lay(good, &l);
	corrupt_pages(good, &l, pc);
	rc = sp_ckpt_open(good, &c, &err);
	ck_assert_msg(rc == 0, "%s: open must not read pages: %s", pc->name, err.msg);
	rc = sp_ckpt_verify(c, &nbad, &err);
	ck_assert_int_eq(rc, -EBADMSG);
	for (int i = 0; i < 2; i++)
		want += pc->pages[i] != UINT64_MAX;
	ck_assert_uint_eq(nbad, want);
	ck_assert_msg(strstr(err.msg, pc->word) != NULL, "%s: message \"%s\" lacks \"%s\"",
		      pc->name, err.msg, pc->word);
	sp_ckpt_close(c);
}
END_TEST

START_TEST(test_shrunk_while_open)
{
	struct sp_error err = { 0 };
	struct sp_ckpt *c;
	struct lay l = { 0 };
	uint64_t nbad;
	void *buf = malloc(PAGES * SP_PAGE_SIZE);

	get_lay(good, &l);
	ck_assert_int_eq(sp_ckpt_open(good, &c, &err), 0);
	ck_assert_int_eq(truncate(good, (off_t)l.mem_offset + 5 * SP_PAGE_SIZE), 0);
	ck_assert_int_eq(sp_ckpt_verify(c, &nbad, &err), -EBADMSG);
	ck_assert_ptr_nonnull(strstr(err.msg, "file ends"));
	ck_assert_int_eq(sp_ckpt_read_mem(c, buf, &err), -EBADMSG);
	ck_assert_ptr_nonnull(strstr(err.msg, "file ends"));
	sp_ckpt_close(c);
	free(buf);
}
END_TEST

/* ------------------------------------------------------------------ */
/* Fixture mode for tests/ckpt_cli.sh and the fuzz seeds               */
/* ------------------------------------------------------------------ */

static void copy_file(const char *from, const char *to)
{
	struct stat st;
	int in = open(from, O_RDONLY), out;
	uint8_t *buf;

	ck_assert_int_ge(in, 0);
	ck_assert_int_eq(fstat(in, &st), 0);
	out = open(to, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	ck_assert_int_ge(out, 0);
	buf = malloc(SP_PAGE_SIZE);
	/* Copy page by page, skipping zero pages, so copies stay sparse. */
	for (off_t off = 0; off < st.st_size; off += SP_PAGE_SIZE) {
		ssize_t n = pread(in, buf, SP_PAGE_SIZE, off);
		bool zero = true;

		ck_assert_int_gt(n, 0);
		for (ssize_t i = 0; i < n && zero; i++)
			zero = buf[i] == 0;
		if (!zero)
			ck_assert_int_eq(pwrite(out, buf, (size_t)n, off), n);
	}
	ck_assert_int_eq(ftruncate(out, st.st_size), 0);
	free(buf);
	close(in);
	close(out);
}

/* Fuzz seed in fuzz_ckpt.c's encoding: ctl byte, u32 split, the first
 * split bytes of the file (its metadata), then its memory section. */
static void write_seed(const char *ckpt, const char *seed, uint8_t ctl)
{
	struct lay l = { 0 };
	uint64_t split;
	uint8_t *buf;
	int in, out;
	size_t n;

	get_lay(ckpt, &l);
	split = l.off[SP_CKPT_SEC_ZEROMAP] + l.bytes[SP_CKPT_SEC_ZEROMAP];
	n = 5 + split + l.bytes[SP_CKPT_SEC_MEM];
	buf = malloc(n);
	buf[0] = ctl;
	for (int i = 0; i < 4; i++)
		buf[1 + i] = (uint8_t)(split >> (8 * i));
	in = open(ckpt, O_RDONLY);
	ck_assert_int_eq(pread(in, buf + 5, split, 0), (ssize_t)split);
	ck_assert_int_eq(pread(in, buf + 5 + split, l.bytes[SP_CKPT_SEC_MEM], (off_t)l.mem_offset),
			 (ssize_t)l.bytes[SP_CKPT_SEC_MEM]);
	close(in);
	out = open(seed, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	ck_assert_int_eq(write(out, buf, n), (ssize_t)n);
	close(out);
	free(buf);
}

START_TEST(test_write_fixtures)
{
	const char *d = getenv("SP_CKPT_FIXTURES");
	char path[600], small[600];
	struct lay l = { 0 };

	snprintf(good, sizeof(good), "%s/good.ckpt", d);
	write_good(good, PAGES);
	get_lay(good, &l);
	for (int k = 0; k < NBAD; k++) {
		snprintf(path, sizeof(path), "%s/bad-%s.ckpt", d, bad_cases[k].name);
		copy_file(good, path);
		corrupt(path, &l, &bad_cases[k]);
	}
	for (size_t k = 0; k < sizeof(page_cases) / sizeof(page_cases[0]); k++) {
		snprintf(path, sizeof(path), "%s/badpage-%s.ckpt", d, page_cases[k].name);
		copy_file(good, path);
		corrupt_pages(path, &l, &page_cases[k]);
	}
	/* Fuzz seeds: 4 and 9 pages. */
	snprintf(small, sizeof(small), "%s/small.tmp", d);
	write_good(small, 4);
	snprintf(path, sizeof(path), "%s/seed-4pages.fuzz", d);
	write_seed(small, path, 1);
	write_good(small, 9);
	snprintf(path, sizeof(path), "%s/seed-9pages.fuzz", d);
	write_seed(small, path, 0);
	unlink(small);
}
END_TEST

static Suite *ckpt_suite(void)
{
	Suite *s = suite_create("ckpt");
	TCase *tc = tcase_create("format");

	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_round_trip);
	tcase_add_test(tc, test_accessors);
	tcase_add_test(tc, test_small_images);
	tcase_add_test(tc, test_write_errors);
	tcase_add_test(tc, test_open_errors);
	tcase_add_test(tc, test_open_fd_memfd);
	tcase_add_test(tc, test_reseal_good_is_identity);
	tcase_add_loop_test(tc, test_malformed, 0, NBAD);
	tcase_add_loop_test(tc, test_bad_pages, 0,
			    (int)(sizeof(page_cases) / sizeof(page_cases[0])));
	tcase_add_test(tc, test_shrunk_while_open);
	suite_add_tcase(s, tc);
	return s;
}

/* Fixture mode: the writing runs as a test too, so its checks report. */
static Suite *fixture_suite(void)
{
	Suite *s = suite_create("ckpt-fixtures");
	TCase *tc = tcase_create("fixtures");

	tcase_set_timeout(tc, 60);
	tcase_add_test(tc, test_write_fixtures);
	suite_add_tcase(s, tc);
	return s;
}

int main(void)
{
	const char *fixtures = getenv("SP_CKPT_FIXTURES");

	if (fixtures != NULL && *fixtures != '\0')
		return sp_test_run(fixture_suite());
	return sp_test_run(ckpt_suite());
}
