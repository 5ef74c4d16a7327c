/* SPDX-License-Identifier: MIT */
/*
 * samepage merge engine: the KSM equivalent that shares what clones make
 * identical. This header is the OS-neutral core (lib/merge/merge.c): trees,
 * scan policy, knobs and statistics. Everything that touches an address
 * space — finding changed pages, reading them, mapping a page onto a shared
 * frame — goes through struct sp_merge_ops, which a backend implements (the
 * Linux one maps frames MAP_PRIVATE from a frame file; tests use an
 * in-memory one, lib/merge/merge_mem.h). The algorithm and its invariants
 * are described at the top of lib/merge/merge.c; every knob and statistic
 * in docs/knobs.md.
 *
 * Callers create an engine, describe templates (the golden checkpoint's
 * memory and its per-page hash index) and regions (one clone's guest RAM
 * each, in a merge domain), then either drive it synchronously with
 * sp_merge_step()/sp_merge_pass() or run the scanner thread with
 * sp_merge_start(). All functions return 0 (or a count) or a negative errno
 * and are safe to call from any thread, except where noted.
 */
#ifndef SAMEPAGE_MERGE_H
#define SAMEPAGE_MERGE_H

#include <stddef.h>
#include <stdint.h>

#include "samepage/error.h"

#define SP_MERGE_PAGE_BYTES 4096u
/* Most pages one ops.digest call asks for (also the most one changed()
 * call reports). */
#define SP_MERGE_DIGEST_MAX 1024u

/* frame_alloc hint meaning "anywhere". */
#define SP_MERGE_NO_HINT UINT64_MAX

/* What a page is merged onto. */
enum sp_merge_kind {
	SP_MERGE_TEMPLATE = 1, /* target = page index in the region's template */
	SP_MERGE_ZERO = 2,     /* target = 0; the zero page (use_zero_pages) */
	SP_MERGE_FRAME = 3,    /* target = frame number in the frame store */
};

/* One page of a merge batch. The core fills page, kind and target; the
 * backend sets result to 0 (the page now reads from the target and its
 * private copy is gone) or a negative errno (nothing changed for this page):
 * -EAGAIN if the page's content no longer equals the target's, -ENOMEM or
 * -ENOSPC if a resource ran out (vm.max_map_count, ...), anything else for
 * other failures. */
struct sp_merge_req {
	uint64_t page;    /* page index in the region */
	uint64_t target;  /* template page or frame number, by kind */
	uint32_t kind;    /* enum sp_merge_kind */
	int32_t result;   /* set by the backend */
};

/*
 * The backend. ctx is the pointer given to sp_merge_create(); region and
 * tmpl are the opaque handles given in the region and template
 * descriptions. The core calls the ops with its own lock held, from the
 * thread running a step: ops must not call back into the engine, except
 * sp_merge_kick(). Every op is required but merge_submit and merge_wait,
 * which come as a pair or not at all.
 *
 * Content reads. read_page, read_template and read_frame set *out to
 * SP_MERGE_PAGE_BYTES bytes of content: either a pointer into the backend's
 * own memory (zero-copy) or buf after copying into it. *out must stay
 * readable until buf is passed to another read, or until the core calls
 * merge or frame_free, whichever comes first. Content read from a live
 * page may be torn or stale; the core uses it only to choose candidates,
 * and merge verifies.
 */
struct sp_merge_ops {
	/* Report page indices of region whose content may have changed since
	 * they were last reported, at most cap of them, preferably in
	 * ascending order, and forget them: each change is reported once.
	 * A page merged by merge() must not be reported because of that
	 * merge; a merged page that is written (and so copied privately by
	 * the kernel) must be reported. On the first call for a new region,
	 * report every page that does not read from the template at its own
	 * offset. Returns the number stored (< cap means none are left right
	 * now) or a negative errno (-ESRCH: the region's process is gone). */
	int (*changed)(void *ctx, void *region, uint64_t *pages, size_t cap);

	/* Current content of page `page` of region. */
	int (*read_page)(void *ctx, void *region, uint64_t page, void *buf,
			 const void **out);

	/* Optional: out[i] = XXH3-64 of the current content of pages[i] of
	 * region, for i < n (n <= SP_MERGE_DIGEST_MAX; out may be pages:
	 * each page is read before its digest is written), computed where the memory is (the
	 * clone hashes its own pages), so that the core reads only the pages
	 * it copies into frames. A digest only proposes: every merge is
	 * verified by merge(), so a wrong or stale digest costs a refused
	 * merge. Returns 0, or a negative errno (then the core reads those
	 * pages; -ENOSYS: this region cannot). */
	int (*digest)(void *ctx, void *region, const uint64_t *pages, size_t n,
		      uint64_t *out);

	/* Content of template page `page` (immutable). */
	int (*read_template)(void *ctx, void *tmpl, uint64_t page, void *buf,
			     const void **out);

	/* Content of a frame written by frame_write (immutable until freed). */
	int (*read_frame)(void *ctx, uint64_t frame, void *buf,
			  const void **out);

	/* Allocate one frame for pages of merge domain `domain` (0 when
	 * merge_across_domains is set). If hint is not SP_MERGE_NO_HINT,
	 * prefer frame number hint: the core passes previous + 1 while it
	 * allocates for a run of adjacent pages, so that the run can map
	 * onto adjacent frames with one mapping. Returns 0 and *frame, or
	 * -ENOSPC / -ENOMEM. */
	int (*frame_alloc)(void *ctx, uint32_t domain, uint64_t hint,
			   uint64_t *frame);

	/* Fill a frame just allocated (no page maps it yet). */
	int (*frame_write)(void *ctx, uint64_t frame, const void *src);

	/* The core holds no reference to frame any more: no page it knows of
	 * reads from it. A page that was merged onto it and later copied
	 * privately may still sit in a mapping that names it; the backend must
	 * not hand the frame number out again until no mapping names it. */
	void (*frame_free)(void *ctx, uint64_t frame);

	/* Apply a batch for one region, sorted by page, no page twice.
	 * For each request: verify, under whatever lock or pause makes it
	 * stick, that the page's content equals the target's, then map the
	 * page onto the target (TEMPLATE at its own offset: discard the
	 * private copy; other targets: a private, writable mapping of the
	 * shared page, so a later write is copied by the kernel). Adjacent
	 * pages with adjacent targets of one kind may share one mapping.
	 * Set each result. Returns 0, or a negative errno meaning no request
	 * was applied (then every result is taken to be that errno). */
	int (*merge)(void *ctx, void *region, struct sp_merge_req *reqs,
		     size_t n);

	/* Optional, as a pair: merge split in two, so that the core can go on
	 * reading and looking up candidates while a batch is applied (by
	 * another process or thread). merge_submit starts applying a batch,
	 * with merge's contract, and must not wait for it to be applied; it
	 * returns 0, or a negative errno meaning nothing was started (then
	 * every result is taken to be that errno and merge_wait is not
	 * called). merge_wait, called exactly once for each batch submitted,
	 * with the same arguments, blocks until every result is in reqs[] and
	 * returns what merge would have. reqs stays untouched by the core in
	 * between. The core keeps at most one flush of batches (at most one
	 * batch per region) in flight, never across the end of a step: between
	 * steps nothing is in flight. In between, the core may call any other
	 * op for any region (changed() may report a page in flight), but
	 * read_page never for a page in flight: it waits first. */
	int (*merge_submit)(void *ctx, void *region, struct sp_merge_req *reqs,
			    size_t n);
	int (*merge_wait)(void *ctx, void *region, struct sp_merge_req *reqs,
			  size_t n);
	/* Optional, with merge_submit: nonzero if the batch in flight for
	 * region has been answered, so merge_wait would not block (a hint:
	 * a wrong answer costs time, not correctness). The core uses it to
	 * hand idle clones the requests it has queued so far instead of
	 * waiting for a full flush. */
	int (*merge_ready)(void *ctx, void *region);
};

struct sp_merge;           /* an engine (opaque) */
struct sp_merge_template;  /* a template known to an engine (opaque) */
struct sp_merge_region;    /* a region known to an engine (opaque) */

/* A golden checkpoint's memory, as the core sees it. */
struct sp_merge_template_desc {
	void *handle;             /* passed to read_template */
	const uint64_t *hashes;   /* XXH3_64bits of each page, npages long;
				     borrowed: must stay valid and unchanged
				     until sp_merge_template_remove() */
	uint64_t npages;          /* 1 .. 2^32 */
};

/* One clone's guest RAM. Page i of a region is backed by page i of its
 * template until written. */
struct sp_merge_region_desc {
	void *handle;                    /* passed to changed/read_page/merge */
	uint64_t npages;                 /* 1 .. 2^32 */
	uint32_t domain;                 /* merge domain (trust domain) */
	struct sp_merge_template *tmpl;  /* NULL: no template */
};

/* Create an engine over a backend. ops is copied; ctx is the backend's. */
int sp_merge_create(const struct sp_merge_ops *ops, void *ctx,
		    struct sp_merge **out, struct sp_error *err);

/* Stop the scanner and free the engine. No op is called: frames still
 * merged stay the backend's (clones keep running on them). */
void sp_merge_destroy(struct sp_merge *eng);

int sp_merge_template_add(struct sp_merge *eng,
			  const struct sp_merge_template_desc *desc,
			  struct sp_merge_template **out, struct sp_error *err);
/* -EBUSY while a region uses the template. */
int sp_merge_template_remove(struct sp_merge *eng,
			     struct sp_merge_template *tmpl);

/* Opt a region in. Its pages become candidates as changed() reports them. */
int sp_merge_region_add(struct sp_merge *eng,
			const struct sp_merge_region_desc *desc,
			struct sp_merge_region **out, struct sp_error *err);

/* Opt a region out and forget its pages; frames no other region maps are
 * freed (frame_free). Call it once the region's mappings are gone (its
 * process exited) or will never read through the core's frames again.
 * Calls no op with the region's handle. */
void sp_merge_region_remove(struct sp_merge *eng,
			    struct sp_merge_region *region);

/* Do up to max_pages pages of work (reads, lookups, merges) and return
 * the number of pages processed, or a negative errno. A step ends early at
 * the end of a pass. Works whatever merge.run says (run gates only the
 * scanner thread). */
int64_t sp_merge_step(struct sp_merge *eng, uint64_t max_pages);

/* Finish the pass in progress, if any, then run one whole pass: every
 * change made before the call has then been seen. Returns pages processed
 * or a negative errno. */
int64_t sp_merge_pass(struct sp_merge *eng);

/* Scanner thread: steps of merge.pages_to_scan pages, merge.sleep_ms
 * apart; once a pass finds nothing changed it sleeps until sp_merge_kick()
 * or merge.poll_ms. Start/stop must not race each other. */
int sp_merge_start(struct sp_merge *eng, struct sp_error *err);
void sp_merge_stop(struct sp_merge *eng);

/* Something may have changed: wake the scanner if it is idle. Cheap; may be
 * called from any thread, including from inside an op. */
void sp_merge_kick(struct sp_merge *eng);

/*
 * Control namespace, jemalloc mallctl style: "merge.<knob>" (read/write)
 * and "stats.merge.<counter>" (read-only). All values are int64_t.
 * Unknown name: -ENOENT. Writing a statistic: -EPERM. Out of range:
 * -ERANGE. A knob that cannot change while pages are merged: -EBUSY.
 * err (may be NULL) gets one line naming the knob and the accepted range.
 */
int sp_merge_ctl_get(struct sp_merge *eng, const char *name, int64_t *val);
int sp_merge_ctl_set(struct sp_merge *eng, const char *name, int64_t val,
		     struct sp_error *err);

struct sp_merge_ctl_info {
	const char *name;    /* "merge.pages_to_scan", "stats.merge.full_scans" */
	int writable;        /* 1 for knobs */
	int64_t min, max;    /* accepted range (knobs) */
	const char *doc;     /* one line */
};

/* Every name, knobs first; *n receives the count. */
const struct sp_merge_ctl_info *sp_merge_ctl_list(size_t *n);

/* Invariant checker (for tests and debugging; takes the engine lock).
 * Always: tree order, node kinds and domains, refcounts equal rmap sizes,
 * statistics equal what the structures say, max_page_sharing respected.
 * With SP_MERGE_CHECK_CONTENT also every merged page's content equals its
 * node's and every unstable page's hash equals its key: only valid when
 * no page changed since the last pass began (nothing unreported).
 * Returns 0 or -EUCLEAN with the first violation in err. */
#define SP_MERGE_CHECK_CONTENT 1u
int sp_merge_check(struct sp_merge *eng, unsigned flags, struct sp_error *err);

/* Bytes of the per-candidate-page item (the rmap_item equivalent). */
size_t sp_merge_item_bytes(void);

#endif
