/* SPDX-License-Identifier: MIT */
/*
 * The clone side of the Linux merge backend: applies a batch of merges to
 * the calling process's own guest RAM (see samepage/merge_linux.h).
 *
 * A clone's RAM starts as one MAP_PRIVATE mapping of the template file.
 * Merging a page means making it read from a shared page again, so that its
 * private copy is freed and a later write is copied by the kernel (no exit,
 * no fault handler of ours):
 *
 *   TEMPLATE, own offset, page still in a template-at-own-offset mapping:
 *       madvise(MADV_DONTNEED) drops the private copy and the page reads the
 *       template again. No mapping is created: the cheapest merge (0.4 µs a
 *       page in runs, one KVM mapping zapped).
 *   TEMPLATE, own offset, page remapped earlier (to a frame, another template
 *       page or zero memory): DONTNEED would make it read what it is mapped
 *       on now, not the template, so map the template at its own offset over
 *       it instead. The page is then back in a template-at-own-offset
 *       mapping, and the next merge of it can be a DONTNEED again.
 *   TEMPLATE, other offset / FRAME: mmap(MAP_FIXED|MAP_PRIVATE,
 *       PROT_READ|PROT_WRITE) of the template / frame file at the target.
 *       Never read-only: a guest write to a read-only page makes KVM_RUN fail
 *       with EFAULT and no address.
 *   ZERO: an anonymous MAP_PRIVATE mapping: reads map the kernel's zero page,
 *       which costs no memory, and runs of zero pages of any length are one
 *       mapping (a zero frame would need adjacent zero frames to coalesce).
 *
 * `remapped` is one bit per page: set when the page sits in anything but a
 * template-at-own-offset mapping. Only this process's own calls change its
 * mappings, so the bitmap is exact.
 *
 * Runs: requests with consecutive pages, one kind, consecutive targets (and,
 * for own-offset template merges, one remapped state) form a run: one
 * madvise or one mmap, and the kernel also merges the new mapping with
 * neighbours that map the same file at contiguous offsets. Each page of a
 * run is verified first; a page whose content differs from its target gets
 * -EAGAIN and splits the run. A failed mmap leaves the old mapping in place
 * (the kernel checks the map count before it unmaps anything; the tests
 * check this), so a run is all or nothing.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lib/util/xxh.h"

#include "samepage/merge_linux.h"

#define PAGE SP_MERGE_PAGE_BYTES
/* Targets of one run are read with one pread of at most this many pages. */
#define CHUNK_PAGES 64u

struct sp_merge_clone {
	uint8_t *ram;            /* (c) guest RAM */
	uint64_t npages;         /* (c) */
	int tmpl_fd;             /* (c) borrowed; -1: no template */
	uint64_t tmpl_offset;    /* (c) bytes */
	uint64_t tmpl_npages;    /* (c) pages of tmpl_fd from tmpl_offset on */
	int frame_fd;            /* (c) borrowed */
	uint32_t frame_slot;     /* (c) the slot frame numbers name it by */
	uint64_t frame_npages;   /* (c) pages of the frame file */
	const uint8_t *tmpl_view;  /* (c) read-only shared view of the template
				      from tmpl_offset on; NULL: pread it */
	const uint8_t *frame_view; /* (c) the same of the frame file */
	uint64_t *remapped;      /* (o) owner thread: one bit per page, set when
				    the page is not in a template mapping at
				    its own offset */
	uint8_t *buf;            /* (o) CHUNK_PAGES pages of target content */
	struct sp_merge_clone_stats st; /* (o) */
};

static const uint8_t zero_page[PAGE];

static int bit_get(const uint64_t *bm, uint64_t i)
{
	return (int)((bm[i / 64] >> (i % 64)) & 1);
}

static void bit_put(uint64_t *bm, uint64_t i, int v)
{
	if (v)
		bm[i / 64] |= 1ull << (i % 64);
	else
		bm[i / 64] &= ~(1ull << (i % 64));
}

static uint64_t fd_pages(int fd, uint64_t offset)
{
	struct stat sb;

	if (fd < 0 || fstat(fd, &sb) < 0 || (uint64_t)sb.st_size <= offset)
		return 0;
	return ((uint64_t)sb.st_size - offset) / PAGE;
}

static const uint8_t *view(int fd, uint64_t offset, uint64_t npages)
{
	void *p;

	if (fd < 0 || npages == 0)
		return NULL;
	p = mmap(NULL, npages * PAGE, PROT_READ, MAP_SHARED | MAP_NORESERVE, fd,
		 (off_t)offset);
	return p == MAP_FAILED ? NULL : p;
}

int sp_merge_clone_create(const struct sp_merge_clone_desc *d,
			  struct sp_merge_clone **out, struct sp_error *err)
{
	struct sp_merge_clone *c;

	*out = NULL;
	if (!d || !d->ram || d->npages == 0 || ((uintptr_t)d->ram % PAGE) ||
	    (d->tmpl_offset % PAGE) || d->frame_fd < 0)
		return sp_error_set(err, -EINVAL,
				    "merge applier: bad RAM, template offset or frame fd");
	/* A writable frame descriptor in a clone would let it change pages
	 * other clones map: the owner must hand out a read-only one. */
	if ((fcntl(d->frame_fd, F_GETFL) & O_ACCMODE) != O_RDONLY)
		return sp_error_set(err, -EINVAL,
				    "merge applier: the frame file descriptor must be read-only "
				    "(sp_merge_linux_frame_file() gives one)");
	c = calloc(1, sizeof(*c));
	if (!c)
		return sp_error_set(err, -ENOMEM, "out of memory");
	c->ram = d->ram;
	c->npages = d->npages;
	c->tmpl_fd = d->tmpl_fd;
	c->tmpl_offset = d->tmpl_offset;
	c->tmpl_npages = fd_pages(d->tmpl_fd, d->tmpl_offset);
	c->frame_fd = d->frame_fd;
	c->frame_slot = d->frame_slot;
	c->frame_npages = fd_pages(d->frame_fd, 0);
	c->remapped = calloc((d->npages + 63) / 64, sizeof(uint64_t));
	c->buf = malloc((size_t)CHUNK_PAGES * PAGE);
	if (!c->remapped || !c->buf) {
		sp_merge_clone_destroy(c);
		return sp_error_set(err, -ENOMEM, "out of memory");
	}
	/* Targets are verified by reading them through read-only shared
	 * views (no copy, no system call per run); pread if mapping fails. */
	c->tmpl_view = view(c->tmpl_fd, c->tmpl_offset, c->tmpl_npages);
	c->frame_view = view(c->frame_fd, 0, c->frame_npages);
	/* anonymous RAM: no page reads the template until merged onto it */
	if (c->tmpl_fd < 0 || d->ram_anon)
		memset(c->remapped, 0xff, (d->npages + 63) / 64 * sizeof(uint64_t));
	*out = c;
	return 0;
}

void sp_merge_clone_destroy(struct sp_merge_clone *c)
{
	if (!c)
		return;
	if (c->tmpl_view)
		munmap((void *)c->tmpl_view, c->tmpl_npages * PAGE);
	if (c->frame_view)
		munmap((void *)c->frame_view, c->frame_npages * PAGE);
	free(c->remapped);
	free(c->buf);
	free(c);
}

void sp_merge_clone_stats_get(const struct sp_merge_clone *c,
			      struct sp_merge_clone_stats *st)
{
	*st = c->st;
}

/* The page of its frame file a frame number names (the slot is above). */
static uint64_t frame_page(uint64_t frame)
{
	return frame & 0xffffffffull;
}

/* Is request r well formed for this clone? */
static int check_req(const struct sp_merge_clone *c, const struct sp_merge_req *r)
{
	if (r->page >= c->npages)
		return -EINVAL;
	switch (r->kind) {
	case SP_MERGE_TEMPLATE:
		return c->tmpl_fd >= 0 && r->target < c->tmpl_npages ? 0 : -EINVAL;
	case SP_MERGE_FRAME:
		/* a frame of another domain's file: not ours to map */
		if (r->target >> 32 != c->frame_slot)
			return -EXDEV;
		return frame_page(r->target) < c->frame_npages ? 0 : -EINVAL;
	case SP_MERGE_ZERO:
		return r->target == 0 ? 0 : -EINVAL;
	}
	return -EINVAL;
}

/* How a request is carried out: runs join only requests of one way. */
enum way { W_DISCARD, W_TEMPLATE, W_FRAME, W_ZERO };

static enum way way_of(const struct sp_merge_clone *c, const struct sp_merge_req *r)
{
	switch (r->kind) {
	case SP_MERGE_TEMPLATE:
		if (r->target == r->page && !bit_get(c->remapped, r->page))
			return W_DISCARD;
		return W_TEMPLATE;
	case SP_MERGE_FRAME:
		return W_FRAME;
	default:
		return W_ZERO;
	}
}

/* Can b extend the run that a ends? */
static int joins(const struct sp_merge_clone *c, const struct sp_merge_req *a,
		 const struct sp_merge_req *b)
{
	if (b->page != a->page + 1 || b->kind != a->kind || way_of(c, a) != way_of(c, b))
		return 0;
	return b->kind == SP_MERGE_ZERO || b->target == a->target + 1;
}

/* Read n target pages of run head r into c->buf. */
static int read_targets(struct sp_merge_clone *c, const struct sp_merge_req *r, size_t n)
{
	size_t len = n * PAGE, done = 0;
	int fd;
	uint64_t off;

	if (r->kind == SP_MERGE_ZERO)
		return 0;
	if (r->kind == SP_MERGE_TEMPLATE) {
		fd = c->tmpl_fd;
		off = c->tmpl_offset + r->target * PAGE;
	} else {
		fd = c->frame_fd;
		off = frame_page(r->target) * PAGE;
	}
	while (done < len) {
		ssize_t got = pread(fd, c->buf + done, len - done, (off_t)(off + done));
		if (got < 0 && errno == EINTR)
			continue;
		if (got <= 0)
			return got < 0 ? -errno : -EIO;
		done += (size_t)got;
	}
	return 0;
}

/* Map (or discard) pages [page, page + n) of way w onto target..target+n.
 * Returns 0 or -errno; on failure nothing changed. */
static int map_run(struct sp_merge_clone *c, enum way w, uint64_t page,
		   uint64_t target, size_t n)
{
	uint8_t *addr = c->ram + page * PAGE;
	size_t len = n * PAGE;
	void *p;

	if (w == W_DISCARD) {
		c->st.madvise_calls++;
		return madvise(addr, len, MADV_DONTNEED) < 0 ? -errno : 0;
	}
	c->st.mmap_calls++;
	if (w == W_ZERO)
		p = mmap(addr, len, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0);
	else if (w == W_TEMPLATE)
		p = mmap(addr, len, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE, c->tmpl_fd,
			 (off_t)(c->tmpl_offset + target * PAGE));
	else
		p = mmap(addr, len, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE, c->frame_fd,
			 (off_t)(frame_page(target) * PAGE));
	if (p == MAP_FAILED)
		return -errno;
	return 0;
}

/* Verify and apply reqs[0..n), one run (same way, consecutive pages and
 * targets). *nomap is set once a mapping failed for lack of map count: no
 * later run of the batch tries to create one. */
static void apply_run(struct sp_merge_clone *c, struct sp_merge_req *reqs, size_t n,
		      int *nomap)
{
	enum way w = way_of(c, &reqs[0]);
	size_t i = 0;

	while (i < n) {
		size_t m = n - i < CHUNK_PAGES ? n - i : CHUNK_PAGES;
		const uint8_t *v = reqs[i].kind == SP_MERGE_TEMPLATE ? c->tmpl_view :
				   reqs[i].kind == SP_MERGE_FRAME ? c->frame_view : NULL;
		int rc = v ? 0 : read_targets(c, &reqs[i], m);

		for (size_t k = 0; k < m; k++) {
			const uint8_t *want = reqs[i].kind == SP_MERGE_ZERO ? zero_page :
					      v && reqs[i].kind == SP_MERGE_FRAME ?
					      v + (frame_page(reqs[i].target) + k) * PAGE :
					      v ? v + (reqs[i].target + k) * PAGE :
					      c->buf + k * PAGE;
			if (rc)
				reqs[i + k].result = rc;
			else if (memcmp(c->ram + reqs[i + k].page * PAGE, want, PAGE))
				reqs[i + k].result = -EAGAIN;
			else
				reqs[i + k].result = 1; /* verified, not applied yet */
		}
		i += m;
	}
	/* map each maximal stretch of verified pages with one call */
	for (i = 0; i < n;) {
		size_t j = i;
		int rc;

		if (reqs[i].result != 1) {
			i++;
			continue;
		}
		while (j < n && reqs[j].result == 1)
			j++;
		if (w != W_DISCARD && *nomap)
			rc = -ENOMEM;
		else
			rc = map_run(c, w, reqs[i].page, reqs[i].target, j - i);
		if (rc == -ENOMEM && w != W_DISCARD)
			*nomap = 1;
		if (rc == 0 && w == W_DISCARD)
			c->st.pages_discarded += j - i;
		for (size_t k = i; k < j; k++) {
			reqs[k].result = rc;
			if (rc == 0)
				bit_put(c->remapped, reqs[k].page,
					!(reqs[k].kind == SP_MERGE_TEMPLATE &&
					  reqs[k].target == reqs[k].page));
		}
		i = j;
	}
}

int sp_merge_clone_apply(struct sp_merge_clone *c, struct sp_merge_req *reqs, size_t n)
{
	int nomap = 0;

	for (size_t i = 1; i < n; i++)
		if (reqs[i].page <= reqs[i - 1].page)
			return -EINVAL;
	for (size_t i = 0; i < n;) {
		size_t j = i + 1;

		reqs[i].result = check_req(c, &reqs[i]);
		if (reqs[i].result) {
			i++;
			continue;
		}
		while (j < n && check_req(c, &reqs[j]) == 0 && joins(c, &reqs[j - 1], &reqs[j]))
			j++;
		apply_run(c, reqs + i, j - i, &nomap);
		i = j;
	}
	for (size_t i = 0; i < n; i++) {
		switch (reqs[i].result) {
		case 0:
			c->st.pages_merged++;
			break;
		case -EAGAIN:
			c->st.pages_stale++;
			break;
		case -ENOMEM:
			c->st.pages_enomem++;
			break;
		}
	}
	return 0;
}

int sp_merge_clone_digest(const struct sp_merge_clone *c, const uint64_t *pages,
			  size_t n, uint64_t *out)
{
	for (size_t i = 0; i < n; i++)
		if (pages[i] >= c->npages)
			return -EINVAL;
	for (size_t i = 0; i < n; i++)
		out[i] = XXH3_64bits(c->ram + pages[i] * PAGE, PAGE);
	return 0;
}
