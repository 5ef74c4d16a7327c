/* SPDX-License-Identifier: MIT */
/*
 * The owner side of the Linux merge backend: the struct sp_merge_ops the
 * engine calls (see samepage/merge_linux.h). It runs in the process that
 * holds the engine; clones are other processes.
 *
 * Finding changed pages. A clone's RAM is a MAP_PRIVATE mapping of the
 * template; a page it has written is a private anonymous copy, a page it has
 * not written (or that was merged) is a file page (template or frame file)
 * or the zero page. So "changed" is "private anonymous now, and not yet
 * reported". Per region two bitmaps say which pages were private anonymous
 * at the last scan (`anon`) and which of those were reported (`seen`); a
 * scan rebuilds `anon`, forgets `seen` bits of pages that are no longer
 * private, and changed() reports anon & ~seen in ascending order. A merge
 * that succeeds clears both bits of its page (it is a file page now, and
 * its next copy must be reported); a merge refused with -EAGAIN clears
 * `seen` (the page changed after it was read) and forces the next scan.
 *
 * The scan is the PAGEMAP_SCAN ioctl on /proc/PID/pagemap (Linux 6.7+),
 * asking for ranges of pages that are present or swapped, not file-backed
 * and not the zero page; where the ioctl is missing it reads the 8-byte
 * pagemap entries instead. Either costs about 3 ms for a fully touched
 * 256 MiB clone here, which is too much to repeat for every idle clone. So
 * the scan is gated by the clone's page-fault counter (/proc/PID/stat
 * minflt + majflt, 4 µs): a page becomes a private copy only through a
 * write fault, and KVM's faults happen in the vCPU thread through GUP,
 * which counts them for that thread. Faults charged to another task
 * (another process writing through /proc/PID/mem or process_vm_writev, KVM
 * async page faults run by a kworker) are caught by the periodic rescan
 * (rescan_ms). A second write to a page that is already a private copy
 * makes no fault and no new copy; nothing cheap sees it. The revisit knob
 * re-reports a slice of the private pages every revisit_ms for that case.
 * docs/merge-linux.md has the measured costs, and why soft-dirty is not used
 * (clearing it write-protects every PTE and makes KVM drop its mappings).
 *
 * Frames. Each merge domain has a frame file, a memfd truncated large and
 * sparse when made; a frame number is the file's slot << 32 | its page.
 * A clone is given only its own domain's file, read-only (mode 0400), so
 * a guest that breaks out into its VMM can neither read other tenants'
 * frames nor write anyone's. Pages go up monotonically and are never
 * reused, so "no frame is handed out while a mapping still names it" holds
 * by construction. frame_free punches a hole: the memory goes back to the
 * host (a clone's private copy made from the frame is its own page and
 * stays), the number stays retired. A file's size bounds the frames ever
 * handed out in its domain (64 GiB: 16 Mi frames by default); then
 * frame_alloc says -ENOSPC.
 *
 * Death. A clone's pidfd becomes readable when it exits; changed(),
 * read_page() and merge() then return -ESRCH and the engine removes the
 * region and frees its frames. /proc/PID/mem and pagemap are opened at
 * region_add, so they name that process's memory even if its PID is reused.
 * An owner that dies costs the clones nothing: their mappings hold the
 * template and their frame file open.
 *
 * Merging. merge() hands the batch to the transport and waits. With a
 * transport split into send and recv, merge_submit only sends, and
 * merge_wait receives the answer: the clone applies while the engine reads
 * and looks up the next batch (the engine waits before it reads a page of
 * a batch in flight). Until merge_wait, the region's bitmaps do not know
 * the batch's results; a scan in between may see a page already merged
 * (it forgets it) or not yet (it stays reported), and merge_wait then
 * settles the bits as merge does.
 *
 * Locking: the ops run under the engine's lock, one at a time, so region
 * and frame-allocation state is only touched by the engine's thread (e);
 * the table of frame files, which the embedder's thread also reaches
 * (sp_merge_linux_frame_file), is under flock (l); statistics are atomic
 * (a); the rest is constant after creation (c).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "samepage/merge_linux.h"

#define PAGE SP_MERGE_PAGE_BYTES

/* PAGEMAP_SCAN uapi (Linux 6.7, include/uapi/linux/fs.h); defined here
 * because the build machines carry 6.1 headers. */
#define SP_PAGE_IS_FILE     (1u << 2)
#define SP_PAGE_IS_PRESENT  (1u << 3)
#define SP_PAGE_IS_SWAPPED  (1u << 4)
#define SP_PAGE_IS_PFNZERO  (1u << 5)

struct sp_page_region {
	uint64_t start, end, categories;
};

struct sp_pm_scan_arg {
	uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
	uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};

#define SP_PAGEMAP_SCAN _IOWR('f', 16, struct sp_pm_scan_arg)

/* pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst) */
#define PM_PRESENT   (1ull << 63)
#define PM_SWAP      (1ull << 62)
#define PM_FILE      (1ull << 61)
#define PM_PFN_MASK  ((1ull << 55) - 1)

#define SCAN_VEC 512
#define PM_CHUNK 4096
/* Read-ahead: the pages the last changed() call reported (at most RA_LIST)
 * are read RA_WIN at a time with one process_vm_readv each. */
#define RA_LIST 1024
#define RA_WIN 64
/* Frames written one after the other into adjacent pages of one file are
 * staged and written with one pwrite, at most this many (see
 * op_frame_write). */
#define STAGE_PAGES 64

/* One frame file per merge domain (the domain frame_alloc names: 0 for
 * all when merge_across_domains is set). A frame number is the file's
 * slot (creation order) in the high 32 bits and the page in it below. */
struct frame_file {
	uint32_t domain;            /* (c) */
	uint32_t slot;              /* (c) its index in files */
	int fd;                     /* (c) the memfd, writable: ours only */
	int fd_ro;                  /* (c) the same opened read-only: clones' */
	uint64_t next;              /* (l) next page to hand out */
};

#define FRAME_SLOT(f) ((uint32_t)((f) >> 32))
#define FRAME_PAGE(f) ((f) & 0xffffffffull)

struct sp_merge_linux {
	pthread_mutex_t flock;      /* guards files and nfiles */
	int flock_init;             /* (c) */
	struct frame_file **files;  /* (l) by slot */
	struct frame_file *last;    /* (l) the file file_of found last: frames
				       come in runs of one domain */
	uint32_t nfiles, files_cap; /* (l) */
	uint64_t frame_npages;      /* (c) pages of each frame file */
	struct sp_merge_linux_opts o; /* (c) */
	int scan_ioctl;             /* (c) PAGEMAP_SCAN works */
	uint64_t zero_pfn;          /* (c) PFN of the zero page; 0: unknown */
	struct sp_page_region *vec; /* (e) PAGEMAP_SCAN output */
	uint64_t *pm;               /* (e) pagemap read buffer, PM_CHUNK */
	int ra_ok;                  /* (e) process_vm_readv works */
	struct sp_merge_linux_region *ra_r; /* (e) region the list is of */
	uint64_t *ra_list;          /* (e) pages changed() reported last, RA_LIST */
	size_t ra_n;                /* (e) entries in ra_list */
	size_t ra_at, ra_len;       /* (e) ra_buf holds ra_list[ra_at, +ra_len) */
	uint8_t *ra_buf;            /* (e) RA_WIN pages of read-ahead content */
	uint8_t ra_used[RA_WIN];    /* (e) slot already served once */
	uint8_t *stage;             /* (e) STAGE_PAGES pages of frame content... */
	struct frame_file *stage_f; /* (e) ...for this file... */
	uint64_t stage_at;          /* (e) ...from this page on... */
	size_t stage_n;             /* (e) ...this many; 0: none staged */
	size_t ra_win;              /* (e) pages a fill reads: 1..RA_WIN, halved
				       when a window was mostly not read (the
				       clones hash, the owner reads only frame
				       sources), doubled when it all was */
	_Atomic uint64_t frames_live, frames_retired, scans, scans_skipped, scan_ns,
		pages_reported, pages_revisited, merge_batches, merge_ns,
		pages_digested, pages_read, frame_write_errors; /* (a) */
	_Atomic int nregions;       /* (a) */
};

struct sp_merge_linux_tmpl {
	const uint8_t *base;        /* (c) read-only shared mapping */
	uint64_t npages;            /* (c) */
};

struct sp_merge_linux_region {
	pid_t pid;                  /* (c) */
	int pidfd;                  /* (c) readable once the clone exited */
	int mem_fd;                 /* (c) /proc/PID/mem */
	int pagemap_fd;             /* (c) /proc/PID/pagemap */
	int stat_fd;                /* (c) /proc/PID/stat */
	uint64_t ram_addr;          /* (c) */
	uint64_t npages;            /* (c) */
	sp_merge_linux_apply_fn apply; /* (c) */
	sp_merge_linux_send_fn send; /* (c) NULL: apply only */
	sp_merge_linux_recv_fn recv; /* (c) */
	sp_merge_linux_digest_fn digest; /* (c) NULL: the owner reads pages */
	sp_merge_linux_ready_fn ready; /* (c) NULL: never asked */
	void *tctx;                 /* (c) */
	int submit_rc;              /* (e) apply's result, when submit applied */
	uint64_t submit_ns;         /* (e) time submit spent */
	uint64_t *anon;             /* (e) private anonymous at the last scan */
	uint64_t *seen;             /* (e) reported and still private */
	uint64_t cursor;            /* (e) next page to report from `anon` */
	uint64_t faults;            /* (e) fault counter at the last scan */
	uint64_t scanned_ns;        /* (e) time of the last scan */
	uint64_t revisit_ns;        /* (e) time of the last revisit */
	uint64_t revisit_at;        /* (e) revisit cursor */
	int scanned;                /* (e) at least one scan done */
	int force;                  /* (e) scan at the next call */
	int dead;                   /* (e) the clone has exited */
};

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static size_t words(uint64_t npages)
{
	return (size_t)((npages + 63) / 64);
}

static void bits_set(uint64_t *bm, uint64_t from, uint64_t to)
{
	for (uint64_t i = from; i < to; i++)
		bm[i / 64] |= 1ull << (i % 64);
}

static void bit_clear(uint64_t *bm, uint64_t i)
{
	bm[i / 64] &= ~(1ull << (i % 64));
}

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

/* ---- creation ------------------------------------------------------ */

/* Does PAGEMAP_SCAN work here? Asked on our own pagemap. */
static int probe_scan_ioctl(void)
{
	static uint8_t probe[PAGE] __attribute__((aligned(4096)));
	struct sp_page_region vec[1];
	struct sp_pm_scan_arg a = {
		.size = sizeof(a),
		.start = (uintptr_t)probe,
		.end = (uintptr_t)probe + PAGE,
		.vec = (uintptr_t)vec,
		.vec_len = 1,
		.category_mask = SP_PAGE_IS_PRESENT,
		.return_mask = SP_PAGE_IS_PRESENT,
	};
	int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	long r;

	if (fd < 0)
		return 0;
	r = ioctl(fd, SP_PAGEMAP_SCAN, &a);
	close(fd);
	return r >= 0;
}

/* The PFN the kernel's zero page has, when pagemap shows PFNs (root). */
static uint64_t probe_zero_pfn(void)
{
	volatile uint8_t *p = mmap(NULL, PAGE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	uint64_t e = 0;
	int fd;

	if (p == MAP_FAILED)
		return 0;
	(void)p[0];
	fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (fd >= 0) {
		if (pread(fd, &e, sizeof(e), (off_t)((uintptr_t)p / PAGE * 8)) != sizeof(e))
			e = 0;
		close(fd);
	}
	munmap((void *)p, PAGE);
	return (e & PM_PRESENT) ? e & PM_PFN_MASK : 0;
}

int sp_merge_linux_create(const struct sp_merge_linux_opts *opts,
			  struct sp_merge_linux **out, struct sp_error *err)
{
	struct sp_merge_linux *b;
	uint64_t bytes;
	int rc;

	*out = NULL;
	b = calloc(1, sizeof(*b));
	if (!b)
		return sp_error_set(err, -ENOMEM, "out of memory");
	if (opts)
		b->o = *opts;
	if (!b->o.frame_file_bytes)
		b->o.frame_file_bytes = SP_MERGE_LINUX_FRAME_FILE_BYTES;
	if (!b->o.revisit_ms)
		b->o.revisit_ms = 1000;
	bytes = b->o.frame_file_bytes / PAGE * PAGE;
	b->frame_npages = bytes / PAGE;
	if (bytes == 0 || bytes / PAGE > FRAME_PAGE(~0ull)) {
		rc = sp_error_set(err, -EINVAL, "frame file size %" PRIu64 " bytes: out of range",
				  b->o.frame_file_bytes);
		goto fail;
	}
	pthread_mutex_init(&b->flock, NULL);
	b->flock_init = 1;
	/* domain 0's file now, so that a file that cannot be made fails here */
	{
		struct sp_merge_linux_frame_file ff;

		rc = sp_merge_linux_frame_file(b, 0, &ff, err);
		if (rc)
			goto fail;
	}
	b->vec = calloc(SCAN_VEC, sizeof(*b->vec));
	b->pm = calloc(PM_CHUNK, sizeof(*b->pm));
	b->ra_list = calloc(RA_LIST, sizeof(*b->ra_list));
	b->ra_buf = aligned_alloc(PAGE, (size_t)RA_WIN * PAGE);
	b->stage = aligned_alloc(PAGE, (size_t)STAGE_PAGES * PAGE);
	b->ra_ok = 1;
	b->ra_win = RA_WIN;
	if (!b->vec || !b->pm || !b->ra_list || !b->ra_buf || !b->stage) {
		rc = sp_error_set(err, -ENOMEM, "out of memory");
		goto fail;
	}
	b->scan_ioctl = !(b->o.flags & SP_MERGE_LINUX_PAGEMAP_READ) && probe_scan_ioctl();
	b->zero_pfn = probe_zero_pfn();
	*out = b;
	return 0;
fail:
	sp_merge_linux_destroy(b);
	return rc;
}

void sp_merge_linux_destroy(struct sp_merge_linux *b)
{
	if (!b)
		return;
	for (uint32_t i = 0; i < b->nfiles; i++) {
		close_fd(&b->files[i]->fd);
		close_fd(&b->files[i]->fd_ro);
		free(b->files[i]);
	}
	free(b->files);
	if (b->flock_init)
		pthread_mutex_destroy(&b->flock);
	free(b->vec);
	free(b->pm);
	free(b->ra_list);
	free(b->ra_buf);
	free(b->stage);
	free(b);
}

/* The frame file of domain, made on first use; NULL with *rc set. Called
 * with flock held. */
static struct frame_file *file_of(struct sp_merge_linux *b, uint32_t domain, int *rc,
				  struct sp_error *err)
{
	struct frame_file *f;
	char path[64];

	if (b->last && b->last->domain == domain)
		return b->last;
	for (uint32_t i = 0; i < b->nfiles; i++)
		if (b->files[i]->domain == domain)
			return b->last = b->files[i];
	if (b->nfiles == b->files_cap) {
		uint32_t cap = b->files_cap ? b->files_cap * 2 : 4;
		struct frame_file **nf = realloc(b->files, cap * sizeof(*nf));
		if (!nf) {
			*rc = sp_error_set(err, -ENOMEM, "out of memory");
			return NULL;
		}
		b->files = nf;
		b->files_cap = cap;
	}
	f = calloc(1, sizeof(*f));
	if (!f) {
		*rc = sp_error_set(err, -ENOMEM, "out of memory");
		return NULL;
	}
	f->domain = domain;
	f->fd_ro = -1;
	f->fd = memfd_create("samepage-frames", MFD_CLOEXEC);
	if (f->fd < 0) {
		*rc = sp_error_set(err, -errno, "memfd_create frame file: %s", strerror(errno));
		free(f);
		return NULL;
	}
	/* Clones get a read-only descriptor: a clone (a guest that broke out
	 * into its VMM) must not write the frames other clones read. Mode
	 * 0400 also stops a clone running as another user from reopening it
	 * writable through /proc/self/fd. */
	snprintf(path, sizeof(path), "/proc/self/fd/%d", f->fd);
	if (ftruncate(f->fd, (off_t)(b->frame_npages * PAGE)) < 0 ||
	    fchmod(f->fd, 0400) < 0 || (f->fd_ro = open(path, O_RDONLY | O_CLOEXEC)) < 0) {
		*rc = sp_error_set(err, -errno, "setting up frame file %s: %s", path,
				   strerror(errno));
		close_fd(&f->fd);
		free(f);
		return NULL;
	}
	f->slot = b->nfiles;
	b->files[b->nfiles++] = f;
	return b->last = f;
}

int sp_merge_linux_frame_file(struct sp_merge_linux *b, uint32_t domain,
			      struct sp_merge_linux_frame_file *out, struct sp_error *err)
{
	struct frame_file *f;
	int rc = 0;

	pthread_mutex_lock(&b->flock);
	f = file_of(b, domain, &rc, err);
	if (f) {
		out->slot = f->slot;
		out->fd = f->fd_ro;
	}
	pthread_mutex_unlock(&b->flock);
	return f ? 0 : rc;
}

/* The file a frame number names, or NULL. */
static struct frame_file *file_at(struct sp_merge_linux *b, uint64_t frame)
{
	struct frame_file *f = NULL;

	pthread_mutex_lock(&b->flock);
	if (FRAME_SLOT(frame) < b->nfiles && FRAME_PAGE(frame) < b->files[FRAME_SLOT(frame)]->next)
		f = b->files[FRAME_SLOT(frame)];
	pthread_mutex_unlock(&b->flock);
	return f;
}

void sp_merge_linux_stats_get(struct sp_merge_linux *b, struct sp_merge_linux_stats *st)
{
	struct stat sb;

	memset(st, 0, sizeof(*st));
	st->frames_live = atomic_load(&b->frames_live);
	st->frames_retired = atomic_load(&b->frames_retired);
	pthread_mutex_lock(&b->flock);
	for (uint32_t i = 0; i < b->nfiles; i++)
		if (fstat(b->files[i]->fd, &sb) == 0)
			st->frame_file_bytes += (uint64_t)sb.st_blocks * 512;
	st->frame_files = b->nfiles;
	pthread_mutex_unlock(&b->flock);
	st->scans = atomic_load(&b->scans);
	st->scans_skipped = atomic_load(&b->scans_skipped);
	st->scan_ns = atomic_load(&b->scan_ns);
	st->pages_reported = atomic_load(&b->pages_reported);
	st->pages_revisited = atomic_load(&b->pages_revisited);
	st->pages_digested = atomic_load(&b->pages_digested);
	st->pages_read = atomic_load(&b->pages_read);
	st->frame_write_errors = atomic_load(&b->frame_write_errors);
	st->merge_batches = atomic_load(&b->merge_batches);
	st->merge_ns = atomic_load(&b->merge_ns);
	st->scan_ioctl = b->scan_ioctl;
}

/* ---- templates ----------------------------------------------------- */

int sp_merge_linux_template_add(struct sp_merge_linux *b, int fd, uint64_t offset_bytes,
				uint64_t npages, struct sp_merge_linux_tmpl **out,
				struct sp_error *err)
{
	struct sp_merge_linux_tmpl *t;
	void *p;

	(void)b;
	*out = NULL;
	if (fd < 0 || npages == 0 || offset_bytes % PAGE)
		return sp_error_set(err, -EINVAL, "template: bad fd, size or offset");
	t = calloc(1, sizeof(*t));
	if (!t)
		return sp_error_set(err, -ENOMEM, "out of memory");
	/* A shared read-only view: no copy, and allowed on a write-sealed
	 * memfd and on a file of a read-only mount. */
	p = mmap(NULL, npages * PAGE, PROT_READ, MAP_SHARED | MAP_NORESERVE, fd,
		 (off_t)offset_bytes);
	if (p == MAP_FAILED) {
		int e = errno;
		free(t);
		return sp_error_set(err, -e, "mapping template read-only: %s", strerror(e));
	}
	t->base = p;
	t->npages = npages;
	*out = t;
	return 0;
}

void sp_merge_linux_template_remove(struct sp_merge_linux *b, struct sp_merge_linux_tmpl *t)
{
	(void)b;
	if (!t)
		return;
	munmap((void *)t->base, t->npages * PAGE);
	free(t);
}

/* ---- regions ------------------------------------------------------- */

static int open_proc(pid_t pid, const char *what, int flags)
{
	char path[64];

	snprintf(path, sizeof(path), "/proc/%d/%s", (int)pid, what);
	return open(path, flags | O_CLOEXEC);
}

int sp_merge_linux_region_add(struct sp_merge_linux *b,
			      const struct sp_merge_linux_region_desc *d,
			      struct sp_merge_linux_region **out, struct sp_error *err)
{
	struct sp_merge_linux_region *r;
	int rc;

	*out = NULL;
	if (!d || d->pid <= 0 || d->npages == 0 || d->ram_addr % PAGE || !d->apply ||
	    !d->send != !d->recv || (d->tmpl && d->tmpl->npages < d->npages))
		return sp_error_set(err, -EINVAL, "merge region: bad pid, RAM, template or transport");
	r = calloc(1, sizeof(*r));
	if (!r)
		return sp_error_set(err, -ENOMEM, "out of memory");
	r->pid = d->pid;
	r->ram_addr = d->ram_addr;
	r->npages = d->npages;
	r->apply = d->apply;
	r->send = d->send;
	r->recv = d->recv;
	r->digest = d->digest;
	r->ready = d->ready;
	r->tctx = d->transport_ctx;
	r->mem_fd = r->pagemap_fd = r->stat_fd = -1;
	r->force = 1;
	r->cursor = d->npages;
	r->pidfd = (int)syscall(SYS_pidfd_open, d->pid, 0);
	if (r->pidfd < 0) {
		rc = sp_error_set(err, -errno, "pidfd_open(%d): %s", (int)d->pid, strerror(errno));
		goto fail;
	}
	r->mem_fd = open_proc(d->pid, "mem", O_RDONLY);
	if (r->mem_fd >= 0)
		r->pagemap_fd = open_proc(d->pid, "pagemap", O_RDONLY);
	if (r->pagemap_fd >= 0)
		r->stat_fd = open_proc(d->pid, "stat", O_RDONLY);
	if (r->stat_fd < 0) {
		rc = sp_error_set(err, errno == ENOENT ? -ESRCH : -errno,
				  "opening /proc/%d/{mem,pagemap,stat}: %s", (int)d->pid,
				  strerror(errno));
		goto fail;
	}
	r->anon = calloc(words(d->npages), sizeof(uint64_t));
	r->seen = calloc(words(d->npages), sizeof(uint64_t));
	if (!r->anon || !r->seen) {
		rc = sp_error_set(err, -ENOMEM, "out of memory");
		goto fail;
	}
	atomic_fetch_add(&b->nregions, 1);
	*out = r;
	return 0;
fail:
	r->dead = 1;
	close_fd(&r->pidfd);
	close_fd(&r->mem_fd);
	close_fd(&r->pagemap_fd);
	close_fd(&r->stat_fd);
	free(r->anon);
	free(r->seen);
	free(r);
	return rc;
}

void sp_merge_linux_region_remove(struct sp_merge_linux *b, struct sp_merge_linux_region *r)
{
	if (!r)
		return;
	if (b->ra_r == r)
		b->ra_r = NULL;
	atomic_fetch_sub(&b->nregions, 1);
	close_fd(&r->pidfd);
	close_fd(&r->mem_fd);
	close_fd(&r->pagemap_fd);
	close_fd(&r->stat_fd);
	free(r->anon);
	free(r->seen);
	free(r);
}

/* Has the clone exited? (Zombies count: their memory is gone.) */
static int is_dead(struct sp_merge_linux_region *r)
{
	struct pollfd pf = { .fd = r->pidfd, .events = POLLIN };

	if (!r->dead && poll(&pf, 1, 0) > 0)
		r->dead = 1;
	return r->dead;
}

/* minflt + majflt of the whole process; 0 on failure (forces a scan). */
static uint64_t read_faults(struct sp_merge_linux_region *r)
{
	char buf[1024];
	ssize_t n = pread(r->stat_fd, buf, sizeof(buf) - 1, 0);
	unsigned long long minflt, cminflt, majflt;
	char *p;

	if (n <= 0)
		return 0;
	buf[n] = '\0';
	p = strrchr(buf, ')');   /* the command name may hold anything */
	if (!p || sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %llu %llu %llu",
			 &minflt, &cminflt, &majflt) != 3)
		return 0;
	return minflt + majflt + 1; /* never 0 */
}

/* ---- scanning ------------------------------------------------------ */

/* r->anon := pages that are private anonymous, by PAGEMAP_SCAN. */
static int scan_ioctl(struct sp_merge_linux *b, struct sp_merge_linux_region *r)
{
	uint64_t end = r->ram_addr + r->npages * PAGE, at = r->ram_addr;

	while (at < end) {
		struct sp_pm_scan_arg a = {
			.size = sizeof(a),
			.start = at,
			.end = end,
			.vec = (uintptr_t)b->vec,
			.vec_len = SCAN_VEC,
			.category_inverted = SP_PAGE_IS_FILE | SP_PAGE_IS_PFNZERO,
			.category_mask = SP_PAGE_IS_FILE | SP_PAGE_IS_PFNZERO,
			.category_anyof_mask = SP_PAGE_IS_PRESENT | SP_PAGE_IS_SWAPPED,
			.return_mask = SP_PAGE_IS_PRESENT | SP_PAGE_IS_SWAPPED,
		};
		long n = ioctl(r->pagemap_fd, SP_PAGEMAP_SCAN, &a);
		uint64_t next = a.walk_end;

		if (n < 0)
			return -errno;
		for (long i = 0; i < n; i++) {
			uint64_t s = b->vec[i].start, e = b->vec[i].end;
			if (s < r->ram_addr || e > end || s >= e)
				continue;
			bits_set(r->anon, (s - r->ram_addr) / PAGE, (e - r->ram_addr) / PAGE);
			if (e > next)
				next = e; /* walk_end has been seen to lag the ranges */
		}
		if (next <= at)
			return -EIO;
		at = next;
	}
	return 0;
}

/* The same by reading pagemap entries (kernels before 6.7). */
static int scan_read(struct sp_merge_linux *b, struct sp_merge_linux_region *r)
{
	for (uint64_t p = 0; p < r->npages;) {
		uint64_t n = r->npages - p < PM_CHUNK ? r->npages - p : PM_CHUNK;
		ssize_t got = pread(r->pagemap_fd, b->pm, n * 8,
				    (off_t)((r->ram_addr / PAGE + p) * 8));

		if (got <= 0)
			return got < 0 ? -errno : -ESRCH;
		n = (uint64_t)got / 8;
		for (uint64_t i = 0; i < n; i++) {
			uint64_t e = b->pm[i];
			if (!(e & (PM_PRESENT | PM_SWAP)) || (e & PM_FILE))
				continue;
			if ((e & PM_PRESENT) && b->zero_pfn && (e & PM_PFN_MASK) == b->zero_pfn)
				continue;
			r->anon[(p + i) / 64] |= 1ull << ((p + i) % 64);
		}
		p += n;
	}
	return 0;
}

static int scan(struct sp_merge_linux *b, struct sp_merge_linux_region *r)
{
	uint64_t t0 = now_ns();
	int rc;

	memset(r->anon, 0, words(r->npages) * sizeof(uint64_t));
	rc = b->scan_ioctl ? scan_ioctl(b, r) : scan_read(b, r);
	if (rc)
		return is_dead(r) ? -ESRCH : rc;
	/* pages no longer private were merged or discarded: forget them */
	for (size_t w = 0; w < words(r->npages); w++)
		r->seen[w] &= r->anon[w];
	r->cursor = 0;
	r->scanned = 1;
	r->scanned_ns = now_ns();
	atomic_fetch_add(&b->scans, 1);
	atomic_fetch_add(&b->scan_ns, r->scanned_ns - t0);
	return 0;
}

/* Forget up to revisit_pages reported pages, from a rotating cursor, so
 * they are reported again. Returns how many. */
static uint64_t revisit(struct sp_merge_linux *b, struct sp_merge_linux_region *r)
{
	uint64_t done = 0, p = r->revisit_at;

	for (uint64_t k = 0; k < r->npages && done < b->o.revisit_pages; k++, p++) {
		if (p >= r->npages)
			p = 0;
		if ((r->seen[p / 64] >> (p % 64)) & 1) {
			bit_clear(r->seen, p);
			done++;
		}
	}
	r->revisit_at = p;
	return done;
}

static int op_changed(void *ctx, void *region, uint64_t *pages, size_t cap)
{
	struct sp_merge_linux *b = ctx;
	struct sp_merge_linux_region *r = region;
	size_t n = 0;
	uint64_t p;

	if (is_dead(r))
		return -ESRCH;
	if (r->cursor >= r->npages) {
		uint64_t t = now_ns(), f = read_faults(r);
		int due = r->force || !r->scanned || f == 0 || f != r->faults ||
			  (b->o.flags & SP_MERGE_LINUX_NO_FAULT_GATE) ||
			  (b->o.rescan_ms && t - r->scanned_ns >= b->o.rescan_ms * 1000000ull);
		int revisit_due = b->o.revisit_pages &&
				  t - r->revisit_ns >= b->o.revisit_ms * 1000000ull;

		if (due) {
			int rc = scan(b, r);
			if (rc)
				return rc;
			r->faults = f;
			r->force = 0;
		} else if (!revisit_due) {
			atomic_fetch_add(&b->scans_skipped, 1);
			return 0;
		}
		if (revisit_due) {
			atomic_fetch_add(&b->pages_revisited, revisit(b, r));
			r->revisit_ns = t;
			r->cursor = 0;
		}
	}
	/* report anon & ~seen from the cursor on */
	for (p = r->cursor; p < r->npages && n < cap;) {
		size_t w = (size_t)(p / 64);
		uint64_t bits = (r->anon[w] & ~r->seen[w]) >> (p % 64);

		if (!bits) {
			p = (uint64_t)(w + 1) * 64;
			continue;
		}
		p += (uint64_t)__builtin_ctzll(bits);
		if (p >= r->npages)
			break;
		pages[n++] = p;
		r->seen[w] |= 1ull << (p % 64);
		p++;
	}
	r->cursor = n < cap || p >= r->npages ? r->npages : p;
	atomic_fetch_add(&b->pages_reported, n);
	/* the engine reads these next, in this order: read them ahead */
	b->ra_r = n ? r : NULL;
	b->ra_n = n < RA_LIST ? n : RA_LIST;
	memcpy(b->ra_list, pages, b->ra_n * sizeof(*pages));
	b->ra_at = b->ra_len = 0;
	return (int)n;
}

/* ---- content ------------------------------------------------------- */

/* Fill ra_buf with the content of ra_list[at, at + RA_WIN): one
 * process_vm_readv, one remote iovec per run of adjacent pages. Content
 * may be stale by the time it is used; the applier verifies. */
static void ra_fill(struct sp_merge_linux *b, struct sp_merge_linux_region *r, size_t at)
{
	struct iovec local, remote[RA_WIN];
	size_t n, nr = 0, used = 0;
	ssize_t got;

	for (size_t i = 0; i < b->ra_len; i++)
		used += b->ra_used[i];
	if (b->ra_len && used == b->ra_len && b->ra_win < RA_WIN)
		b->ra_win *= 2;
	else if (b->ra_len && used * 2 < b->ra_len && b->ra_win > 1)
		b->ra_win /= 2;
	n = b->ra_n - at < b->ra_win ? b->ra_n - at : b->ra_win;
	b->ra_at = at;
	b->ra_len = 0;
	for (size_t i = 0; i < n; i++) {
		uint64_t a = r->ram_addr + b->ra_list[at + i] * PAGE;

		if (nr && (uint64_t)(uintptr_t)remote[nr - 1].iov_base +
			  remote[nr - 1].iov_len == a)
			remote[nr - 1].iov_len += PAGE;
		else
			remote[nr++] = (struct iovec){ (void *)(uintptr_t)a, PAGE };
	}
	local = (struct iovec){ b->ra_buf, n * PAGE };
	got = process_vm_readv(r->pid, &local, 1, remote, nr, 0);
	if (got < 0 && (errno == ENOSYS || errno == EPERM)) {
		b->ra_ok = 0;   /* pread from /proc/PID/mem from now on */
		return;
	}
	/* Read by PID: only trust it if the clone outlived the read (then
	 * the PID was its own throughout). */
	if (got <= 0 || is_dead(r))
		return;
	b->ra_len = (size_t)got / PAGE;
	memset(b->ra_used, 0, sizeof(b->ra_used));
}

/* Serve page from the read-ahead, if it was reported by the last
 * changed() of r and not served yet. */
static int ra_read(struct sp_merge_linux *b, struct sp_merge_linux_region *r,
		   uint64_t page, void *buf)
{
	size_t lo = 0, hi = b->ra_n;

	if (b->ra_r != r || !b->ra_ok)
		return 0;
	while (lo < hi) {   /* the list is ascending */
		size_t mid = (lo + hi) / 2;
		if (b->ra_list[mid] < page)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (lo >= b->ra_n || b->ra_list[lo] != page)
		return 0;
	if (lo < b->ra_at || lo >= b->ra_at + b->ra_len) {
		ra_fill(b, r, lo);
		if (lo >= b->ra_at + b->ra_len)
			return 0;
	}
	if (b->ra_used[lo - b->ra_at])
		return 0;       /* a second read: fresh content */
	b->ra_used[lo - b->ra_at] = 1;
	memcpy(buf, b->ra_buf + (lo - b->ra_at) * PAGE, PAGE);
	return 1;
}

static int op_read_page(void *ctx, void *region, uint64_t page, void *buf, const void **out)
{
	struct sp_merge_linux *b = ctx;
	struct sp_merge_linux_region *r = region;
	size_t done = 0;

	if (page >= r->npages)
		return -EINVAL;
	atomic_fetch_add(&b->pages_read, 1);
	if (ra_read(b, r, page, buf)) {
		*out = buf;
		return 0;
	}
	if (is_dead(r))
		return -ESRCH;
	while (done < PAGE) {
		ssize_t got = pread(r->mem_fd, (uint8_t *)buf + done, PAGE - done,
				    (off_t)(r->ram_addr + page * PAGE + done));
		if (got < 0 && errno == EINTR)
			continue;
		if (got <= 0) {
			int e = got < 0 ? errno : EIO;
			/* an exited process's mm reads as EOF or EIO */
			return is_dead(r) || got == 0 ? -ESRCH : -e;
		}
		done += (size_t)got;
	}
	*out = buf;
	return 0;
}

static int op_digest(void *ctx, void *region, const uint64_t *pages, size_t n,
		     uint64_t *out)
{
	struct sp_merge_linux_region *r = region;
	int rc;

	if (!r->digest)
		return -ENOSYS;
	if (is_dead(r))
		return -ESRCH;
	rc = r->digest(r->tctx, pages, n, out);
	if (rc)
		return is_dead(r) ? -ESRCH : (rc < 0 ? rc : -EIO);
	atomic_fetch_add(&((struct sp_merge_linux *)ctx)->pages_digested, n);
	return 0;
}

static int op_read_template(void *ctx, void *tmpl, uint64_t page, void *buf, const void **out)
{
	struct sp_merge_linux_tmpl *t = tmpl;

	(void)ctx;
	(void)buf;
	if (page >= t->npages)
		return -EINVAL;
	*out = t->base + page * PAGE;
	return 0;
}

/* Write n pages of src to page `at` of f on. */
static int write_pages(struct frame_file *f, uint64_t at, const uint8_t *src, size_t n)
{
	size_t len = n * PAGE, done = 0;

	while (done < len) {
		ssize_t w = pwrite(f->fd, src + done, len - done, (off_t)(at * PAGE + done));

		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return w < 0 ? -errno : -EIO;
		done += (size_t)w;
	}
	return 0;
}

/* Write the staged frames out. Before anything that reads a frame file
 * (a merge: the clone compares with the frame; read_frame) or frees a
 * frame. A frame that cannot be written holds zeros, or part of its
 * bytes: the clones compare every page with its frame before they map
 * it, so a merge onto it is refused unless the page holds those bytes. */
static void stage_flush(struct sp_merge_linux *b)
{
	if (b->stage_n == 0)
		return;
	if (write_pages(b->stage_f, b->stage_at, b->stage, b->stage_n))
		atomic_fetch_add(&b->frame_write_errors, 1);
	b->stage_n = 0;
}

void sp_merge_linux_frames_flush(struct sp_merge_linux *b)
{
	stage_flush(b);
}

/* Frames are read only to compare bytes (a lookup that verifies, the
 * checker), which is rare: a pread, so that the owner needs no view of
 * every domain's file. */
static int op_read_frame(void *ctx, uint64_t frame, void *buf, const void **out)
{
	struct frame_file *f = file_at(ctx, frame);
	size_t done = 0;

	if (!f)
		return -EINVAL;
	stage_flush(ctx);
	while (done < PAGE) {
		ssize_t n = pread(f->fd, (uint8_t *)buf + done, PAGE - done,
				  (off_t)(FRAME_PAGE(frame) * PAGE + done));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return n < 0 ? -errno : -EIO;
		done += (size_t)n;
	}
	*out = buf;
	return 0;
}

/* ---- frames -------------------------------------------------------- */

static int op_frame_alloc(void *ctx, uint32_t domain, uint64_t hint, uint64_t *frame)
{
	struct sp_merge_linux *b = ctx;
	struct frame_file *f;
	int rc = -ENOMEM;

	/* A file per domain: a clone holds only its own domain's, so it can
	 * neither read nor map another tenant's frames. hint can only be
	 * honoured when it is the next number: lower ones may still be named
	 * by a mapping, and skipping ahead would waste the file for nothing. */
	(void)hint;
	pthread_mutex_lock(&b->flock);
	f = file_of(b, domain, &rc, NULL);
	if (!f)
		rc = -ENOMEM;   /* the core knows -ENOMEM and -ENOSPC */
	else if (f->next >= b->frame_npages) {
		f = NULL;
		rc = -ENOSPC;
	}
	if (f)
		*frame = (uint64_t)f->slot << 32 | f->next++;
	pthread_mutex_unlock(&b->flock);
	if (!f)
		return rc;
	atomic_fetch_add(&b->frames_live, 1);
	return 0;
}

/* Frames come in runs of adjacent pages of one file (a run of equal pages
 * at equal offsets, and frame numbers are handed out in order): staged,
 * a run is one pwrite instead of one a page, each of which costs a system
 * call and a page-cache lookup (docs/merge-linux.md). */
static int op_frame_write(void *ctx, uint64_t frame, const void *src)
{
	struct sp_merge_linux *b = ctx;
	struct frame_file *f = file_at(b, frame);
	uint64_t at = FRAME_PAGE(frame);

	if (!f)
		return -EINVAL;
	if (b->stage_n && (f != b->stage_f || at != b->stage_at + b->stage_n ||
			   b->stage_n == STAGE_PAGES))
		stage_flush(b);
	if (b->stage_n == 0) {
		b->stage_f = f;
		b->stage_at = at;
	}
	memcpy(b->stage + b->stage_n * PAGE, src, PAGE);
	b->stage_n++;
	return 0;
}

static void op_frame_free(void *ctx, uint64_t frame)
{
	struct sp_merge_linux *b = ctx;
	struct frame_file *f = file_at(b, frame);

	if (!f)
		return;
	stage_flush(b);
	/* Pages still mapped from the frame are unmapped by the punch (the
	 * engine says none is); private copies made from it are not touched. */
	fallocate(f->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
		  (off_t)(FRAME_PAGE(frame) * PAGE), PAGE);
	atomic_fetch_sub(&b->frames_live, 1);
	atomic_fetch_add(&b->frames_retired, 1);
}

/* ---- merging ------------------------------------------------------- */

/* The transport returned rc for a batch: account it and settle the
 * region's bits by the results. */
static int merged(struct sp_merge_linux *b, struct sp_merge_linux_region *r,
		  struct sp_merge_req *reqs, size_t n, int rc, uint64_t ns)
{
	atomic_fetch_add(&b->merge_batches, 1);
	atomic_fetch_add(&b->merge_ns, ns);
	if (rc)
		return is_dead(r) ? -ESRCH : (rc < 0 ? rc : -EIO);
	for (size_t i = 0; i < n; i++) {
		uint64_t p = reqs[i].page;

		if (p >= r->npages)
			continue;
		if (reqs[i].result == 0) {
			/* a file page (or zero page) now: its next copy is news */
			bit_clear(r->anon, p);
			bit_clear(r->seen, p);
		} else if (reqs[i].result == -EAGAIN) {
			/* written in place since it was read: report it again */
			bit_clear(r->seen, p);
			r->force = 1;
		}
	}
	return 0;
}

static int op_merge(void *ctx, void *region, struct sp_merge_req *reqs, size_t n)
{
	struct sp_merge_linux *b = ctx;
	struct sp_merge_linux_region *r = region;
	uint64_t t0 = now_ns();
	int rc;

	stage_flush(b);
	if (is_dead(r))
		return -ESRCH;
	rc = r->apply(r->tctx, reqs, n);
	return merged(b, r, reqs, n, rc, now_ns() - t0);
}

/* Ship the batch; without a split transport, apply it now (and merge_wait
 * only accounts it). */
static int op_merge_submit(void *ctx, void *region, struct sp_merge_req *reqs, size_t n)
{
	struct sp_merge_linux_region *r = region;
	uint64_t t0 = now_ns();
	int rc;

	stage_flush(ctx);
	if (is_dead(r))
		return -ESRCH;
	if (!r->send) {
		r->submit_rc = r->apply(r->tctx, reqs, n);
	} else {
		r->submit_rc = 0;
		rc = r->send(r->tctx, reqs, n);
		if (rc)
			return is_dead(r) ? -ESRCH : (rc < 0 ? rc : -EIO);
	}
	r->submit_ns = now_ns() - t0;
	return 0;
}

static int op_merge_wait(void *ctx, void *region, struct sp_merge_req *reqs, size_t n)
{
	struct sp_merge_linux_region *r = region;
	uint64_t t0 = now_ns();
	int rc = r->send ? r->recv(r->tctx, reqs, n) : r->submit_rc;

	return merged(ctx, r, reqs, n, rc, r->submit_ns + now_ns() - t0);
}

static int op_merge_ready(void *ctx, void *region)
{
	struct sp_merge_linux_region *r = region;

	(void)ctx;
	if (!r->send)
		return 1;   /* applied by submit */
	/* a dead clone's transport says ready itself (the socket's end of
	 * file): no pidfd poll here, this is asked every 128 pages */
	return r->ready ? r->ready(r->tctx) : 0;
}

static const struct sp_merge_ops linux_ops = {
	.changed = op_changed,
	.read_page = op_read_page,
	.digest = op_digest,
	.read_template = op_read_template,
	.read_frame = op_read_frame,
	.frame_alloc = op_frame_alloc,
	.frame_write = op_frame_write,
	.frame_free = op_frame_free,
	.merge = op_merge,
	.merge_submit = op_merge_submit,
	.merge_wait = op_merge_wait,
	.merge_ready = op_merge_ready,
};

const struct sp_merge_ops *sp_merge_linux_ops(void)
{
	return &linux_ops;
}

/* ---- vm.max_map_count ---------------------------------------------- */

#define MAP_COUNT_PATH "/proc/sys/vm/max_map_count"

static int read_map_count(int64_t *v)
{
	FILE *f = fopen(MAP_COUNT_PATH, "re");
	long long x;
	int ok;

	if (!f)
		return -errno;
	ok = fscanf(f, "%lld", &x) == 1;
	fclose(f);
	if (!ok)
		return -EIO;
	*v = x;
	return 0;
}

static int write_map_count(int64_t v)
{
	char s[32];
	int fd = open(MAP_COUNT_PATH, O_WRONLY | O_CLOEXEC);
	int n, rc = 0;

	if (fd < 0)
		return -errno;
	n = snprintf(s, sizeof(s), "%lld\n", (long long)v);
	if (write(fd, s, (size_t)n) != n)
		rc = -errno;
	close(fd);
	return rc;
}

int sp_merge_linux_raise_map_count(uint64_t target, struct sp_merge_linux_mapcount *saved)
{
	int64_t cur;
	int rc;

	saved->old_count = -1;
	saved->set_count = -1;
	if (target > INT32_MAX)
		return -ERANGE;
	rc = read_map_count(&cur);
	if (rc)
		return rc;
	if (cur >= (int64_t)target)
		return 0;
	rc = write_map_count((int64_t)target);
	if (rc)
		return rc;
	saved->old_count = cur;
	saved->set_count = (int64_t)target;
	return 0;
}

int sp_merge_linux_restore_map_count(const struct sp_merge_linux_mapcount *saved)
{
	int64_t cur;
	int rc;

	if (!saved || saved->old_count < 0)
		return 0;
	rc = read_map_count(&cur);
	if (rc)
		return rc;
	if (cur != saved->set_count)
		return 0; /* someone else changed it since: theirs now */
	return write_map_count(saved->old_count);
}
