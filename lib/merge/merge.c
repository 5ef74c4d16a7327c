/* SPDX-License-Identifier: MIT */
/*
 * samepage merge engine, OS-neutral core: the trees, the scan policy, the
 * knobs and the statistics of a KSM equivalent for clones of one golden
 * checkpoint. All address-space work goes through struct sp_merge_ops
 * (include/samepage/merge.h); this file makes no system call.
 *
 * Overview
 * ========
 *
 * A *region* is one clone's guest RAM: N pages in a merge *domain*, usually
 * backed by a *template* (the checkpoint's memory, mapped MAP_PRIVATE) so
 * that an unwritten page reads the template page at its own offset. Only
 * pages the backend reports as changed are *candidates*; the core gives
 * each one an item (struct sp_item, 32 bytes, the rmap_item equivalent)
 * the first time it is reported and keeps it while the region lives.
 * Pages never written cost nothing and are never read.
 *
 * A candidate can be merged onto one of three kinds of *target*:
 *
 *   TEMPLATE  a page of the region's own template. Equal to the template
 *             page at its own offset: the backend just drops the private
 *             copy (MADV_DONTNEED), the cheapest merge there is. Equal to
 *             another template page: it maps that template page.
 *   ZERO      the zero page (merge.use_zero_pages).
 *   FRAME     a slot of the backend's shared frame store, allocated and
 *             filled by the core through the ops when two candidates are
 *             found equal.
 *
 * Each target in use is a *stable node* (struct sp_stable) holding the
 * reverse map (rmap) of the items mapped onto it; its reference count is
 * the rmap's length. FRAME nodes live in the domain's *stable tree*,
 * TEMPLATE nodes in their template's node tree (keyed by page), the ZERO
 * node hangs off its domain.
 *
 * The stable tree is ordered by content: by the page's XXH3-64 digest
 * first, then by memcmp() of the frames. The digest only orders and skips;
 * equality is always decided by memcmp. Frames never change while a node
 * names them, so the stable tree can never be out of order. A FRAME node
 * maps at most merge.max_page_sharing pages; when it is full a *dup* node
 * with a fresh frame of the same content joins its chain (the tree node is
 * the chain's head; dups hang off it; when the head empties, a dup takes
 * its place in the tree).
 *
 * The *unstable tree* holds candidates that matched nothing yet, ordered
 * by (32-bit digest of the content when it was last read, region, page).
 * It is a red-black tree like the others, but linked by 32-bit item ids
 * (12 bytes of the item, where a <sys/tree.h> entry takes 32): with the
 * rmap also linked by ids, an item is 32 bytes in every state.
 * A lookup takes the first entry with the candidate's digest unread, as a
 * prediction: the entry's own merge compares it with the frame made from
 * the candidate, so a digest never decides equality, and a refused entry
 * is read and looked up again. Linux KSM rebuilds its unstable tree every
 * pass because its pages may change under it; here the backend tells us
 * which pages changed, and each pass takes exactly those out of the tree
 * before they are processed again, which rebuilds every entry that may
 * have gone stale. An entry whose page changed after this pass's report is
 * harmless: its key is a digest snapshot, so it cannot disorder the tree
 * or misdirect a descent; if a lookup takes it, its merge request is
 * checked by the backend (content verified under its lock, or with the
 * vCPU paused), which refuses with -EAGAIN. This is why the tree is
 * persistent instead of being thrown away each pass: with nothing
 * changing a pass costs one changed() call per region, and no page is
 * ever rescanned.
 *
 * Lifecycle of a candidate (item states):
 *
 *   reported for the first time, and the sibling region's page at the
 *       same offset (the region polled before it, same domain and
 *       template) is merged, or queued, onto a target with room: the page
 *       is queued for that target unread (a *prediction*: clones write the
 *       same bytes at the same offsets). The backend compares it with the
 *       target before mapping, as for any merge; if it differs, the item
 *       goes to the head of the settle list marked with the previous pass,
 *       so the settle phase of this very pass reads and looks it up.
 *       A settle phase starts only after every batch of the collect phase
 *       is accounted, so no wrong guess waits a pass.
 *   reported changed -> taken out of whatever it was in (stable node rmap:
 *       the page was written and copied privately, so the node loses a
 *       reference; unstable tree; waiting lists), read and hashed (or, with
 *       ops.digest, hashed where it lives: the backend returns the digests
 *       of a chunk of changed pages at once, and the page is read only if
 *       its bytes must be copied into a new frame), then
 *   - volatile check: if it was also reported in the previous pass and its
 *     digest differs from the one read then, it keeps changing: it waits
 *     (SETTLE) and is processed in the next pass that does not report it
 *     again. A page written once is processed in the very pass that first
 *     reports it; a page rewritten with the same bytes passes too. Clones
 *     write and settle, so this costs them no latency, while a page under
 *     constant rewrites never enters the trees. It is safe because no
 *     merge ever trusts a stale read: the backend rechecks content.
 *   - lookup, cheapest target first: template at its own offset; zero page
 *     (if use_zero_pages); another template page (binary search of the
 *     template's hash index); the stable tree; the unstable tree. A match
 *     in the unstable tree allocates a frame, fills it with the content
 *     and makes it a stable node for both pages. The partner is taken
 *     unread (a prediction again: the sibling's unstable page at the same
 *     offset if its digest is the same, else the first entry with the
 *     digest; its own merge verifies it; if it changed, or only its digest
 *     was equal, it is read again and the frame serves the candidate alone
 *     until an equal page comes). An existing target (template page,
 *     frame) is picked by the 64-bit digest alone the first time a page
 *     is looked up: the merge compares the page with it anyway, so the
 *     owner's own memcmp would only catch a digest collision. A refused
 *     guess is read again and looked up comparing bytes, and a dup is
 *     only made after comparing with its head.
 *     No match: the page joins the unstable tree (UNSTABLE).
 *   - merge: requests are batched per region, sorted by page, and handed to
 *     the backend's merge op (PENDING while in a batch). Frames for a run of
 *     adjacent candidates are allocated with a hint for adjacent slots, so
 *     a run of equal pages at equal addresses across clones (the common
 *     case: clones load the same software at the same place) maps as one
 *     mapping per clone. On success the item joins the node's rmap
 *     (MERGED). On -EAGAIN (content changed before the merge stuck) it
 *     waits to settle; on any other error (-ENOMEM, -ENOSPC: the mapping
 *     limit, the frame store) it goes on the RETRY list, retried with an
 *     exponential backoff in passes: the engine degrades, it does not spin.
 *     Either way the node loses the pending reference, and a node left with
 *     no reference is freed (its frame back to the backend).
 *
 * Overlap. A backend whose merges run elsewhere (the Linux one: in the
 * clone processes) can split merge into merge_submit and merge_wait. Then
 * a flush submits its batches and returns; the step goes on reading and
 * looking up candidates while the clones apply them, and the next flush
 * first waits for those (at most one flush is in flight, so the pending
 * batch is double-buffered). So that a flush holds batches for several
 * clones (which then apply at once, on other cores, instead of one after
 * the other), a pass asks the regions for their changes round robin, one
 * changed() chunk each, instead of draining one region before the next.
 * A flush normally waits until PEND_MAX requests are queued; with the
 * optional merge_ready, the core also looks, at the end of each chunk and
 * every FLUSH_IDLE_EVERY pages of a slow chunk (one whose pages are read,
 * to be copied into new frames), whether every batch in flight has been
 * answered, and if so flushes what is queued (at least FLUSH_IDLE_MIN
 * requests) at once: the clones are idle, and would otherwise wait for
 * the rest of the chunk. A fast chunk is not split: its clone would take
 * its batch in two turns.
 * Items of a batch in flight stay PENDING and their nodes keep their
 * pending references, so nothing above changes: results are accounted
 * exactly as the synchronous path does, only later. The core waits before
 * anything that must see them: a candidate of the batch reported again,
 * the end of a pass (convergence counts the settle list) and the end of a
 * step, so that between steps nothing is in flight (sp_merge_check, region
 * removal, knob changes and destroy never see a batch in flight).
 *
 * Frames. A frame is referenced by its node's rmap entries only. The core
 * frees it (frame_free) when the last entry goes: the page was reported
 * written, or its region was removed after its process exited. Reported
 * changed means the page no longer reads from the frame, and the backend
 * must not reuse a frame number while a mapping still names it (a written
 * page stays inside a mapping of the frame file), so no frame is ever
 * reused under a reader. The core never names a freed frame again.
 *
 * Domains. FRAME and ZERO merges happen only between pages of one domain
 * (one trust domain, e.g. one tenant), unless merge.merge_across_domains
 * is set: a shared frame is a timing side channel (a write to a merged page
 * is slower, which tells the writer someone else holds the same bytes).
 * TEMPLATE merges are allowed across domains: every clone of a checkpoint
 * already maps all of the template, so learning that a page equals a
 * template page tells a tenant nothing it could not read itself. Each
 * domain has its own stable and unstable tree; with merge_across_domains
 * all regions use one common domain. The knob (like KSM's
 * merge_across_nodes) can change only while no FRAME or ZERO page is
 * merged.
 *
 * Counters (statistics, docs/knobs.md has the full list):
 *   pages_shared    stable nodes in use: distinct frames, template pages and
 *                   zero pages that at least one candidate is merged onto
 *   pages_sharing   pages saved by FRAME and TEMPLATE merges: a FRAME node
 *                   with k pages saves k-1, a TEMPLATE node with k saves k
 *   zero_pages      pages merged onto the zero page (each saves one; kept
 *                   out of pages_sharing, as KSM's ksm_zero_pages)
 *   pages_unshared  candidates in the unstable tree
 *   pages_volatile  candidates neither merged nor in the unstable tree:
 *                   changing, waiting to settle or to retry a failed merge
 *   general_profit  (pages_sharing + zero_pages) * page size - metadata_bytes
 *
 * Invariants (checked by sp_merge_check after every test step):
 *   - every tree is in order; every unstable entry belongs to a region of
 *     the tree's domain; stable heads are unique by content in a domain;
 *   - between steps no request is pending; every node has nmap >= 1 and
 *     nmap == length of its rmap; FRAME nodes map <= max_page_sharing;
 *   - every item is in exactly one of: a node's rmap, the unstable tree of
 *     its region's domain, the settle list, the retry list;
 *   - a FRAME or ZERO node maps only pages of its domain, a TEMPLATE node
 *     only pages of regions of its template;
 *   - the statistics equal what the structures say;
 *   - when quiescent: a merged page's content equals its node's.
 *
 * Locking. One mutex, the tree lock (t), protects all trees, lists, items,
 * nodes, regions and the pass state; a step holds it throughout and calls
 * the ops under it. Knobs and statistics are atomics (a), written under (t)
 * where they describe the structures, read without it. The scanner's wake
 * state is under its own mutex (w), so sp_merge_kick() never waits for a
 * step. (c) fields are constant after creation; (s) fields belong to the
 * caller of sp_merge_start/stop. Functions that need (t) assert it.
 */
#include <assert.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lib/util/xxh.h"

#include "samepage/merge.h"

/* libbsd's <sys/tree.h> marks the functions RB_GENERATE_STATIC emits
 * __unused but leaves the macro undefined (it clashes with glibc struct
 * members), so define it here, after every libc header. */
#ifndef __unused
#define __unused __attribute__((__unused__))
#endif
#include <sys/queue.h>
#include <sys/tree.h>

#define PAGE SP_MERGE_PAGE_BYTES
#define PASS_BITS 28
#define PASS_MASK ((1u << PASS_BITS) - 1)
#define CHG_CHUNK SP_MERGE_DIGEST_MAX /* pages per changed() call: 1024 */
#define PEND_MAX 2048u        /* merge requests per flush */
#define FLUSH_IDLE_MIN 256u   /* fewest requests flushed to idle clones */
#define FLUSH_IDLE_EVERY 128u /* pages between two looks at idle clones */
#define ITEMS_PER_CHUNK 1024u /* item pool growth; slot 0 is the header */
#define RETRY_BACKOFF_MAX 64u /* passes */
#define NO_ITEM UINT32_MAX    /* no item id */

enum item_state {
	ST_FREE = 0,   /* in the pool's free list */
	ST_NONE,       /* transient, inside a step */
	ST_UNSTABLE,   /* in its domain's unstable tree */
	ST_MERGED,     /* in a stable node's rmap */
	ST_SETTLE,     /* on the settle list */
	ST_RETRY,      /* on the retry list */
	ST_PENDING,    /* in the pending merge batch */
};

struct sp_stable;

/*
 * One candidate page: the rmap_item equivalent. Exactly one of the union's
 * members is live, by state. All fields (t).
 */
struct sp_item {
	union {
		struct {                           /* ST_UNSTABLE: tree links */
			uint32_t child[2], parent; /* [0] left, [1] right */
		} unstable;
		struct {                           /* ST_MERGED: rmap links */
			uint32_t prev, next;
			struct sp_stable *node;    /* also set while PENDING */
		} rmap;
		TAILQ_ENTRY(sp_item) later;        /* ST_SETTLE, ST_RETRY */
		uint32_t free_next;                /* ST_FREE: next free id */
	} u;
	uint32_t page;                 /* page index in the region */
	uint32_t region;               /* region id (engine's rtab) */
	uint32_t csum;                 /* low 32 bits of XXH3-64 at last read */
	unsigned int state : 3;        /* enum item_state */
	unsigned int red : 1;          /* ST_UNSTABLE: colour in the tree */
	unsigned int pass : PASS_BITS; /* pass of the last report or wait */
};
static_assert(sizeof(struct sp_item) == 32,
	      "a candidate page's item is 32 bytes (KSM's rmap_item: 64)");

/* A merge target in use. The first 40 bytes are all a stable tree
 * descent reads. */
struct sp_stable {
	union {
		RB_ENTRY(sp_stable) tree;  /* (t) stable tree (FRAME heads) or
					      template node tree (TEMPLATE) */
		struct {
			LIST_ENTRY(sp_stable) link; /* (t) chain linkage */
			struct sp_stable *head;     /* (t) its chain's head */
		} dup;                     /* FRAME dup (is_dup) */
	} u;
	uint64_t hash;                   /* (c) XXH3-64 of the content */
	uint64_t target;                 /* (c) frame number, template page */
	uint32_t rmap;                   /* (t) first item id merged onto it */
	uint32_t nmap;                   /* (t) rmap length */
	uint32_t npending;               /* (t) requests in the pending batch */
	LIST_HEAD(, sp_stable) dups;     /* (t) FRAME head: its chain */
	union {
		struct sp_domain *dom;           /* (c) FRAME, ZERO */
		struct sp_merge_template *tmpl;  /* (c) TEMPLATE */
	};
	uint32_t ndups;                  /* (t) FRAME head: chain length */
	uint8_t kind;                    /* (c) enum sp_merge_kind */
	uint8_t is_dup;                  /* (t) a FRAME dup, off the tree */
};

RB_HEAD(sp_stree, sp_stable);   /* FRAME heads by (hash, content) */
RB_HEAD(sp_ttree, sp_stable);   /* TEMPLATE nodes by page */

/* A merge domain: its own trees. */
struct sp_domain {
	RB_ENTRY(sp_domain) link;  /* (t) engine's domain tree */
	struct sp_stree stable;    /* (t) */
	uint32_t unstable;         /* (t) unstable tree's root item id */
	struct sp_stable *zero;    /* (t) ZERO node, if any */
	uint32_t id;               /* (c) domain id (0 for the common one) */
	uint32_t nregions;         /* (t) regions bound to it */
};
RB_HEAD(sp_dtree, sp_domain);

struct sp_merge_template {
	LIST_ENTRY(sp_merge_template) link; /* (t) engine's templates */
	void *handle;                       /* (c) */
	const uint64_t *hashes;             /* (c) borrowed, npages long */
	uint64_t npages;                    /* (c) */
	uint32_t *by_hash;                  /* (c) page numbers by hashes[] */
	uint64_t *filter;                   /* (c) bit (hash & fmask) set for
					       every page's hash */
	uint64_t fmask;                     /* (c) bits in filter - 1 */
	struct sp_ttree nodes;              /* (t) TEMPLATE nodes in use */
	uint32_t nregions;                  /* (t) */
};

struct sp_merge_region {
	void *handle;                   /* (c) */
	uint64_t npages;                /* (c) */
	struct sp_merge_template *tmpl; /* (c) */
	uint32_t id;                    /* (c) index in the engine's rtab */
	uint32_t domain;                /* (c) */
	struct sp_domain *dom;          /* (t) bound domain */
	uint32_t *islot;                /* (t) its items' ids by page: open
					   addressing, linear probing,
					   2^ibits slots, NO_ITEM empty */
	uint32_t ibits;                 /* (t) */
	uint64_t nitems;                /* (t) */
	uint32_t collected;             /* (t) last pass that collected all
					   of its changes */
	bool no_digest;                 /* (t) ops.digest said -ENOSYS */
};

/* A merge request waiting in the batch, 16 bytes. Its target is its
 * item's u.rmap.node, which a pending item holds. */
struct pend {
	uint64_t key;     /* region << 32 | page: the batch's order */
	uint32_t item;    /* item id */
	bool predicted;   /* queued unread, on its sibling's target */
};

/* One region's batch of the flush in flight: pend and reqs [at, at + n). */
struct inflight {
	uint32_t region;
	uint32_t at, n;
	int rc;          /* merge_submit's: nonzero, nothing to wait for */
};

enum { K_RUN, K_PAGES_TO_SCAN, K_SLEEP_MS, K_POLL_MS, K_MAX_PAGE_SHARING,
       K_USE_ZERO_PAGES, K_ACROSS, NKNOB };

enum { S_PAGES_SHARED, S_PAGES_SHARING, S_PAGES_UNSHARED, S_PAGES_VOLATILE,
       S_PAGES_SCANNED, S_FULL_SCANS, S_GENERAL_PROFIT, S_ZERO_PAGES,
       S_CHAINS, S_DUPS, S_PAGES_TEMPLATE, S_PAGES_MERGED, S_RMAP_ITEMS,
       S_FRAMES, S_MERGES, S_MERGES_FAILED, S_METADATA, S_REGIONS,
       S_BACKEND_ERRORS, S_CONVERGED, S_PREDICTED, S_MISPREDICTED, NSTAT };

enum phase { PH_COLLECT, PH_SETTLE, PH_RETRY, PH_END };

enum { B_CAND, B_CMP, B_INS_A, B_INS_B, NBUF };

struct sp_merge {
	struct sp_merge_ops ops;        /* (c) */
	void *ctx;                      /* (c) */
	uint64_t zero_hash;             /* (c) XXH3-64 of a zero page */
	pthread_mutex_t lock;           /* the tree lock (t) */

	_Atomic int64_t knob[NKNOB];    /* (a) written under (t) */
	_Atomic int64_t st[NSTAT];      /* (a) written under (t) */

	struct sp_dtree domains;        /* (t) per-domain trees */
	struct sp_domain common;        /* (t) merge_across_domains */
	LIST_HEAD(, sp_merge_template) templates; /* (t) */
	struct sp_merge_region **rtab;  /* (t) regions by id, NULL holes */
	uint32_t rtab_len;              /* (t) */
	TAILQ_HEAD(, sp_item) settle;   /* (t) ordered by pass */
	TAILQ_HEAD(, sp_item) retry;    /* (t) */
	uint64_t nsettle, nretry;       /* (t) */

	uint32_t free_items;            /* (t) item pool: first free id */
	struct sp_item **chunks;        /* (t) */
	size_t nchunks, chunks_cap;     /* (t) */

	uint32_t pass;                  /* (t) current pass, PASS_BITS wide */
	enum phase phase;               /* (t) */
	bool in_pass;                   /* (t) a pass is under way */
	uint32_t cursor;                /* (t) next region id to poll */
	bool pass_changed;              /* (t) this pass saw work */
	uint64_t retry_todo;            /* (t) left in this pass's retry round */
	uint64_t retry_at_start;        /* (t) nretry when the round began */
	bool retry_round;               /* (t) a round ran this pass */
	uint32_t retry_due;             /* (t) pass of the next retry round */
	uint32_t retry_backoff;         /* (t) passes between rounds */

	struct pend *pend;              /* (t) pending batch */
	size_t npend;                   /* (t) */
	uint32_t reads_since;           /* (t) candidates read since the last
					   look at idle clones */
	struct sp_merge_req *reqs;      /* (t) scratch for ops.merge */
	bool async;                     /* (c) merge_submit/merge_wait given */
	struct pend *fl_pend;           /* (t) async: the flush in flight... */
	struct sp_merge_req *fl_reqs;   /* (t) ...its requests... */
	size_t fl_npend;                /* (t) ...how many (0: none)... */
	struct inflight *fl;            /* (t) ...and its batches, at most
					   one per region */
	int64_t fl_cap;                 /* (t) fl's length, > regions */
	size_t nfl;                     /* (t) */
	uint64_t *chg;                  /* (t) scratch for ops.changed */
	struct sp_item **cit, **csib;   /* (t) chg[i]'s item and, if it has
					   none, its sibling's: looked up once */
	uint64_t *dig;                  /* (t) ops.digest: digests of chg[i]
					   (first the pages asked for) */
	uint8_t *dig_have;              /* (t) ...1: dig[i] is chg[i]'s */
	bool hint_valid;                /* (t) last frame allocation... */
	uint32_t hint_region, hint_page;/* (t) ...was for this page */
	uint64_t hint_frame;            /* (t) ...and got this frame */
	unsigned char *buf[NBUF];       /* (t) page buffers for reads */

	pthread_mutex_t wlock;          /* scanner wake state (w) */
	pthread_cond_t wcv;             /* (w) */
	bool kicked;                    /* (w) */
	bool stopping;                  /* (w) */
	pthread_t thread;               /* (s) */
	bool running;                   /* (s) */
};

static const unsigned char zero_page[PAGE];

/* --- locking ---------------------------------------------------------- */

/* The engine whose tree lock this thread holds (never more than one). */
static _Thread_local const struct sp_merge *tls_locked;

#define TREE_LOCK_ASSERT(e) assert(tls_locked == (e))

static void tree_lock(struct sp_merge *e)
{
	pthread_mutex_lock(&e->lock);
	tls_locked = e;
}

static void tree_unlock(struct sp_merge *e)
{
	TREE_LOCK_ASSERT(e);
	tls_locked = NULL;
	pthread_mutex_unlock(&e->lock);
}

/* --- small helpers ---------------------------------------------------- */

static int64_t knob(struct sp_merge *e, int k)
{
	return atomic_load_explicit(&e->knob[k], memory_order_relaxed);
}

static int64_t stat_get(struct sp_merge *e, int s)
{
	return atomic_load_explicit(&e->st[s], memory_order_relaxed);
}

static void stat_add(struct sp_merge *e, int s, int64_t d)
{
	atomic_fetch_add_explicit(&e->st[s], d, memory_order_relaxed);
}

static void stat_set(struct sp_merge *e, int s, int64_t v)
{
	atomic_store_explicit(&e->st[s], v, memory_order_relaxed);
}

static uint32_t pass_prev(uint32_t p)
{
	return (p - 1) & PASS_MASK;
}

static bool is_zero(const void *p)
{
	return memcmp(p, zero_page, PAGE) == 0;
}

static uint64_t page_hash(const void *p)
{
	return XXH3_64bits(p, PAGE);
}

static struct sp_merge_region *item_region(struct sp_merge *e,
					   const struct sp_item *it)
{
	return e->rtab[it->region];
}

/* --- tree orders ------------------------------------------------------ */

static int cmp_u64(uint64_t a, uint64_t b)
{
	return a < b ? -1 : a > b;
}

/* Unstable tree: digest snapshot, then identity. Never reads a page, so a
 * page changing under the tree cannot disorder it. */
static int ucmp(const struct sp_item *a, const struct sp_item *b)
{
	if (a->csum != b->csum)
		return cmp_u64(a->csum, b->csum);
	if (a->region != b->region)
		return cmp_u64(a->region, b->region);
	return cmp_u64(a->page, b->page);
}

static int node_content(struct sp_merge *e, const struct sp_stable *n, int b,
			const void **out);

/* Stable tree: digest, then frame content (frames are immutable). */
static int scmp(const struct sp_stable *a, const struct sp_stable *b)
{
	/* only ever called under the tree lock, by this thread */
	struct sp_merge *e = (struct sp_merge *)tls_locked;
	const void *pa, *pb;

	if (a->hash != b->hash)
		return cmp_u64(a->hash, b->hash);
	if (node_content(e, a, B_INS_A, &pa) != 0 ||
	    node_content(e, b, B_INS_B, &pb) != 0)
		return cmp_u64(a->target, b->target); /* backend failure */
	return memcmp(pa, pb, PAGE);
}
RB_GENERATE_STATIC(sp_stree, sp_stable, u.tree, scmp)

static int tcmp(const struct sp_stable *a, const struct sp_stable *b)
{
	return cmp_u64(a->target, b->target);
}
RB_GENERATE_STATIC(sp_ttree, sp_stable, u.tree, tcmp)

static int dcmp(const struct sp_domain *a, const struct sp_domain *b)
{
	return cmp_u64(a->id, b->id);
}
RB_GENERATE_STATIC(sp_dtree, sp_domain, link, dcmp)


/* --- content reads ---------------------------------------------------- */

static int node_content(struct sp_merge *e, const struct sp_stable *n, int b,
			const void **out)
{
	switch (n->kind) {
	case SP_MERGE_TEMPLATE:
		return e->ops.read_template(e->ctx, n->tmpl->handle, n->target,
					    e->buf[b], out);
	case SP_MERGE_ZERO:
		*out = zero_page;
		return 0;
	default:
		return e->ops.read_frame(e->ctx, n->target, e->buf[b], out);
	}
}

static int read_item(struct sp_merge *e, const struct sp_item *it, int b,
		     const void **out)
{
	struct sp_merge_region *r = item_region(e, it);

	e->reads_since++;
	return e->ops.read_page(e->ctx, r->handle, it->page, e->buf[b], out);
}

static bool tmpl_page_eq(struct sp_merge *e, struct sp_merge_template *t,
			 uint64_t page, const void *content)
{
	const void *p;

	if (e->ops.read_template(e->ctx, t->handle, page, e->buf[B_CMP], &p)) {
		stat_add(e, S_BACKEND_ERRORS, 1);
		return false;
	}
	return memcmp(p, content, PAGE) == 0;
}

/* --- metadata accounting and the item pool ---------------------------- */

static void meta(struct sp_merge *e, int64_t bytes)
{
	stat_add(e, S_METADATA, bytes);
}

/*
 * Items live in chunks of ITEMS_PER_CHUNK and are named by a 32-bit id
 * (chunk * ITEMS_PER_CHUNK + slot): the pool's free list and the regions'
 * page indexes hold ids, 4 bytes instead of a pointer or a tree entry.
 */
static struct sp_item *item_at(const struct sp_merge *e, uint32_t id)
{
	return &e->chunks[id / ITEMS_PER_CHUNK][id % ITEMS_PER_CHUNK];
}

/* A chunk is aligned to its size and its slot 0 holds its index, so an
 * item's id follows from its address. */
#define CHUNK_BYTES (ITEMS_PER_CHUNK * sizeof(struct sp_item))

static uint32_t item_id(const struct sp_item *it)
{
	uintptr_t base = (uintptr_t)it & ~(uintptr_t)(CHUNK_BYTES - 1);
	uint32_t chunk = ((const struct sp_item *)base)->page;

	return chunk * ITEMS_PER_CHUNK +
	       (uint32_t)(((uintptr_t)it - base) / sizeof(*it));
}

/* A region's page index: home slot of page (Fibonacci hashing). */
static uint32_t pidx_home(const struct sp_merge_region *r, uint32_t page)
{
	return (uint32_t)(((uint64_t)page * 0x9E3779B97F4A7C15ull) >>
			  (64 - r->ibits));
}

static uint32_t pidx_mask(const struct sp_merge_region *r)
{
	return (1u << r->ibits) - 1;
}

/* The slot holding page's item, or -1. */
static int64_t pidx_slot(const struct sp_merge *e,
			 const struct sp_merge_region *r, uint32_t page)
{
	uint32_t k;

	if (r->islot == NULL)
		return -1;
	for (k = pidx_home(r, page); r->islot[k] != NO_ITEM;
	     k = (k + 1) & pidx_mask(r))
		if (item_at(e, r->islot[k])->page == page)
			return k;
	return -1;
}

static void pidx_put(const struct sp_merge_region *r, uint32_t id,
		     uint32_t page)
{
	uint32_t k = pidx_home(r, page);

	while (r->islot[k] != NO_ITEM)
		k = (k + 1) & pidx_mask(r);
	r->islot[k] = id;
}

/* Make room for one more item: at most 3/4 of the slots in use. */
static int pidx_reserve(struct sp_merge *e, struct sp_merge_region *r)
{
	uint32_t *old = r->islot, obits = r->ibits, nbits, k;

	if (old != NULL && (r->nitems + 1) * 4 <= 3ull << obits)
		return 0;
	nbits = old != NULL ? obits + 1 : 6;
	if (nbits > 32)
		return -ENOMEM;
	r->islot = malloc(sizeof(*r->islot) << nbits);
	if (r->islot == NULL) {
		r->islot = old;
		return -ENOMEM;
	}
	memset(r->islot, 0xff, sizeof(*r->islot) << nbits);
	r->ibits = nbits;
	for (k = 0; old != NULL && k < 1u << obits; k++)
		if (old[k] != NO_ITEM)
			pidx_put(r, old[k], item_at(e, old[k])->page);
	free(old);
	meta(e, (int64_t)(sizeof(*r->islot) << nbits) -
		(old != NULL ? (int64_t)(sizeof(*r->islot) << obits) : 0));
	return 0;
}

static void pidx_free(struct sp_merge *e, struct sp_merge_region *r)
{
	if (r->islot != NULL)
		meta(e, -(int64_t)(sizeof(*r->islot) << r->ibits));
	free(r->islot);
	r->islot = NULL;
}

/* Back to the pool: its state, the free list. */
static void item_release(struct sp_merge *e, struct sp_merge_region *r,
			 struct sp_item *it, uint32_t id)
{
	r->nitems--;
	stat_add(e, S_RMAP_ITEMS, -1);
	it->state = ST_FREE;
	it->u.free_next = e->free_items;
	e->free_items = id;
}

static struct sp_item *item_new(struct sp_merge *e, struct sp_merge_region *r,
				uint32_t page)
{
	struct sp_item *it;
	uint32_t id;

	TREE_LOCK_ASSERT(e);
	if (e->free_items == NO_ITEM) {
		struct sp_item *c;
		size_t i;

		if (e->nchunks >= (NO_ITEM / ITEMS_PER_CHUNK) - 1)
			return NULL;
		if (e->nchunks == e->chunks_cap) {
			size_t cap = e->chunks_cap ? e->chunks_cap * 2 : 16;
			struct sp_item **nc = realloc(e->chunks,
						      cap * sizeof(*nc));
			if (nc == NULL)
				return NULL;
			meta(e, (int64_t)((cap - e->chunks_cap) * sizeof(*nc)));
			e->chunks = nc;
			e->chunks_cap = cap;
		}
		c = aligned_alloc(CHUNK_BYTES, CHUNK_BYTES);
		if (c == NULL)
			return NULL;
		memset(c, 0, CHUNK_BYTES);
		c[0].page = (uint32_t)e->nchunks;   /* the header */
		c[0].state = ST_FREE;
		meta(e, CHUNK_BYTES);
		for (i = ITEMS_PER_CHUNK; i-- > 1;) {
			c[i].u.free_next = e->free_items;
			e->free_items = (uint32_t)(e->nchunks * ITEMS_PER_CHUNK + i);
		}
		e->chunks[e->nchunks++] = c;
	}
	if (pidx_reserve(e, r) != 0)
		return NULL;
	id = e->free_items;
	it = item_at(e, id);
	e->free_items = it->u.free_next;
	memset(it, 0, sizeof(*it));
	it->page = page;
	it->region = r->id;
	it->state = ST_NONE;
	it->pass = e->pass;
	pidx_put(r, id, page);
	r->nitems++;
	stat_add(e, S_RMAP_ITEMS, 1);
	return it;
}

static struct sp_item *item_find(const struct sp_merge *e,
				 const struct sp_merge_region *r,
				 uint32_t page)
{
	int64_t k = pidx_slot(e, r, page);

	return k < 0 ? NULL : item_at(e, r->islot[k]);
}

/* --- domains ---------------------------------------------------------- */

static struct sp_domain *dom_get(struct sp_merge *e, uint32_t id)
{
	struct sp_domain key, *d;

	TREE_LOCK_ASSERT(e);
	if (knob(e, K_ACROSS))
		return &e->common;
	key.id = id;
	d = RB_FIND(sp_dtree, &e->domains, &key);
	if (d != NULL)
		return d;
	d = calloc(1, sizeof(*d));
	if (d == NULL)
		return NULL;
	d->id = id;
	RB_INIT(&d->stable);
	d->unstable = NO_ITEM;
	RB_INSERT(sp_dtree, &e->domains, d);
	meta(e, sizeof(*d));
	return d;
}

/* The domain a region of domain id should be bound to; never allocates. */
static struct sp_domain *dom_lookup(struct sp_merge *e, uint32_t id)
{
	struct sp_domain key;

	if (knob(e, K_ACROSS))
		return &e->common;
	key.id = id;
	return RB_FIND(sp_dtree, &e->domains, &key);
}

static void dom_put(struct sp_merge *e, struct sp_domain *d)
{
	TREE_LOCK_ASSERT(e);
	if (d == &e->common || d->nregions > 0)
		return;
	assert(RB_EMPTY(&d->stable) && d->unstable == NO_ITEM &&
	       d->zero == NULL);
	RB_REMOVE(sp_dtree, &e->domains, d);
	free(d);
	meta(e, -(int64_t)sizeof(*d));
}

/* --- stable nodes ----------------------------------------------------- */

/* Chain statistics for a head with k dups. */
static void chain_account(struct sp_merge *e, uint32_t before, uint32_t after)
{
	stat_add(e, S_CHAINS, (after > 0) - (before > 0));
	stat_add(e, S_DUPS, (int64_t)(after ? after + 1 : 0) -
			    (int64_t)(before ? before + 1 : 0));
}

static struct sp_stable *node_alloc(struct sp_merge *e, int kind)
{
	struct sp_stable *n = calloc(1, sizeof(*n));

	if (n == NULL)
		return NULL;
	n->kind = (uint8_t)kind;
	n->rmap = NO_ITEM;
	LIST_INIT(&n->dups);
	meta(e, sizeof(*n));
	return n;
}

/* A fresh frame holding content, for pages of domain d; not yet linked.
 * Asks for the slot after the previous allocation when page follows the
 * page that allocation was for, so runs map onto runs. */
static struct sp_stable *frame_node_new(struct sp_merge *e,
					struct sp_domain *d,
					const struct sp_item *it,
					const void *content, uint64_t hash)
{
	uint64_t hint = SP_MERGE_NO_HINT, frame;
	struct sp_stable *n;
	int rc;

	TREE_LOCK_ASSERT(e);
	if (e->hint_valid && e->hint_region == it->region &&
	    e->hint_page + 1 == it->page)
		hint = e->hint_frame + 1;
	n = node_alloc(e, SP_MERGE_FRAME);
	if (n == NULL)
		return NULL;
	rc = e->ops.frame_alloc(e->ctx, d->id, hint, &frame);
	if (rc != 0) {
		free(n);
		meta(e, -(int64_t)sizeof(*n));
		return NULL;
	}
	if (e->ops.frame_write(e->ctx, frame, content) != 0) {
		stat_add(e, S_BACKEND_ERRORS, 1);
		e->ops.frame_free(e->ctx, frame);
		free(n);
		meta(e, -(int64_t)sizeof(*n));
		return NULL;
	}
	e->hint_valid = true;
	e->hint_region = it->region;
	e->hint_page = it->page;
	e->hint_frame = frame;
	n->dom = d;
	n->hash = hash;
	n->target = frame;
	stat_add(e, S_FRAMES, 1);
	return n;
}

static void node_free(struct sp_merge *e, struct sp_stable *n)
{
	TREE_LOCK_ASSERT(e);
	assert(n->nmap == 0 && n->npending == 0 && n->rmap == NO_ITEM);
	switch (n->kind) {
	case SP_MERGE_TEMPLATE:
		RB_REMOVE(sp_ttree, &n->tmpl->nodes, n);
		break;
	case SP_MERGE_ZERO:
		n->dom->zero = NULL;
		break;
	default:
		if (n->is_dup) {
			struct sp_stable *h = n->u.dup.head;

			LIST_REMOVE(n, u.dup.link);
			chain_account(e, h->ndups, h->ndups - 1);
			h->ndups--;
		} else {
			RB_REMOVE(sp_stree, &n->dom->stable, n);
			if (n->ndups > 0) {
				/* The first dup takes the head's place. */
				struct sp_stable *m = LIST_FIRST(&n->dups), *x;

				LIST_REMOVE(m, u.dup.link);
				m->is_dup = 0;
				while ((x = LIST_FIRST(&n->dups)) != NULL) {
					LIST_REMOVE(x, u.dup.link);
					x->u.dup.head = m;
					LIST_INSERT_HEAD(&m->dups, x, u.dup.link);
				}
				m->ndups = n->ndups - 1;
				chain_account(e, n->ndups, m->ndups);
				RB_INSERT(sp_stree, &n->dom->stable, m);
			}
		}
		e->ops.frame_free(e->ctx, n->target);
		stat_add(e, S_FRAMES, -1);
		break;
	}
	free(n);
	meta(e, -(int64_t)sizeof(*n));
}

static void rmap_add(struct sp_merge *e, struct sp_stable *n,
		     struct sp_item *it)
{
	TREE_LOCK_ASSERT(e);
	it->state = ST_MERGED;
	it->u.rmap.node = n;
	it->u.rmap.prev = NO_ITEM;
	it->u.rmap.next = n->rmap;
	if (n->rmap != NO_ITEM)
		item_at(e, n->rmap)->u.rmap.prev = item_id(it);
	n->rmap = item_id(it);
	if (n->nmap == 0)
		stat_add(e, S_PAGES_SHARED, 1);
	switch (n->kind) {
	case SP_MERGE_FRAME:
		if (n->nmap > 0)
			stat_add(e, S_PAGES_SHARING, 1);
		break;
	case SP_MERGE_TEMPLATE:
		stat_add(e, S_PAGES_SHARING, 1);
		stat_add(e, S_PAGES_TEMPLATE, 1);
		break;
	default:
		stat_add(e, S_ZERO_PAGES, 1);
		break;
	}
	n->nmap++;
	stat_add(e, S_PAGES_MERGED, 1);
}

static void rmap_del(struct sp_merge *e, struct sp_item *it)
{
	struct sp_stable *n = it->u.rmap.node;

	TREE_LOCK_ASSERT(e);
	assert(it->state == ST_MERGED && n->nmap > 0);
	if (it->u.rmap.prev != NO_ITEM)
		item_at(e, it->u.rmap.prev)->u.rmap.next = it->u.rmap.next;
	else
		n->rmap = it->u.rmap.next;
	if (it->u.rmap.next != NO_ITEM)
		item_at(e, it->u.rmap.next)->u.rmap.prev = it->u.rmap.prev;
	it->state = ST_NONE;
	n->nmap--;
	if (n->nmap == 0)
		stat_add(e, S_PAGES_SHARED, -1);
	switch (n->kind) {
	case SP_MERGE_FRAME:
		if (n->nmap > 0)
			stat_add(e, S_PAGES_SHARING, -1);
		break;
	case SP_MERGE_TEMPLATE:
		stat_add(e, S_PAGES_SHARING, -1);
		stat_add(e, S_PAGES_TEMPLATE, -1);
		break;
	default:
		stat_add(e, S_ZERO_PAGES, -1);
		break;
	}
	stat_add(e, S_PAGES_MERGED, -1);
	if (n->nmap == 0 && n->npending == 0)
		node_free(e, n);
}

static struct sp_stable *tmpl_node(struct sp_merge *e,
				   struct sp_merge_template *t, uint64_t page)
{
	struct sp_stable key, *n;

	key.target = page;
	n = RB_FIND(sp_ttree, &t->nodes, &key);
	if (n != NULL)
		return n;
	n = node_alloc(e, SP_MERGE_TEMPLATE);
	if (n == NULL)
		return NULL;
	n->tmpl = t;
	n->target = page;
	n->hash = t->hashes[page];
	RB_INSERT(sp_ttree, &t->nodes, n);
	return n;
}

static struct sp_stable *zero_node(struct sp_merge *e, struct sp_domain *d)
{
	struct sp_stable *n = d->zero;

	if (n != NULL)
		return n;
	n = node_alloc(e, SP_MERGE_ZERO);
	if (n == NULL)
		return NULL;
	n->dom = d;
	n->hash = e->zero_hash;
	d->zero = n;
	return n;
}

/* Find the template page equal to content, by the sorted hash index;
 * -1 if none. */
static int64_t tmpl_search(struct sp_merge *e, struct sp_merge_template *t,
			   uint64_t hash, const void *content)
{
	uint64_t lo = 0, hi = t->npages, bit = hash & t->fmask;

	/* Most candidates equal no template page: one bit, eight per
	 * template page, turns ~88% of them away with one cache miss
	 * instead of a binary search's dozen. */
	if (!(t->filter[bit / 64] >> (bit % 64) & 1))
		return -1;
	while (lo < hi) {
		uint64_t mid = lo + (hi - lo) / 2;

		if (t->hashes[t->by_hash[mid]] < hash)
			lo = mid + 1;
		else
			hi = mid;
	}
	for (; lo < t->npages && t->hashes[t->by_hash[lo]] == hash; lo++)
		if (content == NULL || tmpl_page_eq(e, t, t->by_hash[lo], content))
			return t->by_hash[lo];
	return -1;
}

static struct sp_stable *stable_find(struct sp_merge *e, struct sp_domain *d,
				     uint64_t hash, const void *content)
{
	struct sp_stable *n = RB_ROOT(&d->stable);

	TREE_LOCK_ASSERT(e);
	while (n != NULL) {
		int c;

		if (hash != n->hash) {
			c = cmp_u64(hash, n->hash);
		} else {
			const void *p;

			if (content == NULL)
				return n;
			if (node_content(e, n, B_CMP, &p) != 0) {
				stat_add(e, S_BACKEND_ERRORS, 1);
				return NULL;
			}
			c = memcmp(content, p, PAGE);
			if (c == 0)
				return n;
		}
		n = c < 0 ? RB_LEFT(n, u.tree) : RB_RIGHT(n, u.tree);
	}
	return NULL;
}

/* A node of head's chain with room for one more page, or NULL. */
static struct sp_stable *chain_pick(struct sp_merge *e, struct sp_stable *h)
{
	uint64_t max = (uint64_t)knob(e, K_MAX_PAGE_SHARING);
	struct sp_stable *m;

	if ((uint64_t)h->nmap + h->npending < max)
		return h;
	LIST_FOREACH(m, &h->dups, u.dup.link)
		if ((uint64_t)m->nmap + m->npending < max)
			return m;
	return NULL;
}

/* --- the unstable tree ------------------------------------------------ */

/*
 * A red-black tree of items linked by 32-bit ids, so that its links cost
 * 12 bytes of the item instead of the 32 of a <sys/tree.h> entry (three
 * pointers and an int): that is what keeps an item at 32 bytes, half of
 * Linux KSM's 64-byte rmap_item, which packs its colour into a pointer
 * the same way the kernel's rb_node does. The colour is a bit of the
 * item. Ordered by ucmp(): (digest snapshot, region, page).
 */
#define UL(e, id) (item_at((e), (id))->u.unstable)

static bool u_red(const struct sp_merge *e, uint32_t id)
{
	return id != NO_ITEM && item_at(e, id)->red;
}

static void u_set_child(struct sp_merge *e, uint32_t *root, uint32_t parent,
			uint32_t old, uint32_t child)
{
	if (parent == NO_ITEM)
		*root = child;
	else if (UL(e, parent).child[0] == old)
		UL(e, parent).child[0] = child;
	else
		UL(e, parent).child[1] = child;
}

/* Rotate at x: dir 0 lifts its right child (a left rotation), dir 1 its
 * left child. */
static void u_rotate(struct sp_merge *e, uint32_t *root, uint32_t x, int dir)
{
	uint32_t y = UL(e, x).child[!dir], b = UL(e, y).child[dir];

	UL(e, x).child[!dir] = b;
	if (b != NO_ITEM)
		UL(e, b).parent = x;
	UL(e, y).parent = UL(e, x).parent;
	u_set_child(e, root, UL(e, x).parent, x, y);
	UL(e, y).child[dir] = x;
	UL(e, x).parent = y;
}

/* Insert item it (id z); -EEXIST if an equal key is in the tree. */
static int u_insert(struct sp_merge *e, uint32_t *root, struct sp_item *it,
		    uint32_t z)
{
	uint32_t p = NO_ITEM, x = *root;
	int c = 0;

	while (x != NO_ITEM) {
		p = x;
		c = ucmp(it, item_at(e, x));
		if (c == 0)
			return -EEXIST;
		x = UL(e, x).child[c > 0];
	}
	it->u.unstable.child[0] = it->u.unstable.child[1] = NO_ITEM;
	it->u.unstable.parent = p;
	it->red = 1;
	if (p == NO_ITEM)
		*root = z;
	else
		UL(e, p).child[c > 0] = z;
	while (u_red(e, UL(e, z).parent)) {
		uint32_t q = UL(e, z).parent, g = UL(e, q).parent, y;
		int d = q != UL(e, g).child[0];   /* q is g's child on side d */

		y = UL(e, g).child[!d];
		if (u_red(e, y)) {
			item_at(e, q)->red = 0;
			item_at(e, y)->red = 0;
			item_at(e, g)->red = 1;
			z = g;
			continue;
		}
		if (z == UL(e, q).child[!d]) {
			z = q;
			u_rotate(e, root, z, d);
			q = UL(e, z).parent;
		}
		item_at(e, q)->red = 0;
		item_at(e, g)->red = 1;
		u_rotate(e, root, g, !d);
	}
	item_at(e, *root)->red = 0;
	return 0;
}

static uint32_t u_min(const struct sp_merge *e, uint32_t x)
{
	while (x != NO_ITEM && UL(e, x).child[0] != NO_ITEM)
		x = UL(e, x).child[0];
	return x;
}

static uint32_t u_next(const struct sp_merge *e, uint32_t x)
{
	uint32_t p;

	if (UL(e, x).child[1] != NO_ITEM)
		return u_min(e, UL(e, x).child[1]);
	for (p = UL(e, x).parent; p != NO_ITEM && x == UL(e, p).child[1];
	     p = UL(e, p).parent)
		x = p;
	return p;
}

/* Replace the subtree at u by the one at v (v may be empty). */
static void u_transplant(struct sp_merge *e, uint32_t *root, uint32_t u,
			 uint32_t v)
{
	u_set_child(e, root, UL(e, u).parent, u, v);
	if (v != NO_ITEM)
		UL(e, v).parent = UL(e, u).parent;
}

static void u_remove(struct sp_merge *e, uint32_t *root, uint32_t z)
{
	uint32_t y = z, x, xp;
	bool y_red = item_at(e, y)->red;

	if (UL(e, z).child[0] == NO_ITEM) {
		x = UL(e, z).child[1];
		xp = UL(e, z).parent;
		u_transplant(e, root, z, x);
	} else if (UL(e, z).child[1] == NO_ITEM) {
		x = UL(e, z).child[0];
		xp = UL(e, z).parent;
		u_transplant(e, root, z, x);
	} else {
		y = u_min(e, UL(e, z).child[1]);
		y_red = item_at(e, y)->red;
		x = UL(e, y).child[1];
		if (UL(e, y).parent == z) {
			xp = y;
		} else {
			xp = UL(e, y).parent;
			u_transplant(e, root, y, x);
			UL(e, y).child[1] = UL(e, z).child[1];
			UL(e, UL(e, y).child[1]).parent = y;
		}
		u_transplant(e, root, z, y);
		UL(e, y).child[0] = UL(e, z).child[0];
		UL(e, UL(e, y).child[0]).parent = y;
		item_at(e, y)->red = item_at(e, z)->red;
	}
	if (y_red)
		return;
	/* x (maybe empty, child of xp) is short of one black */
	while (x != *root && !u_red(e, x)) {
		int d = x != UL(e, xp).child[0];   /* x is xp's child on side d */
		uint32_t w = UL(e, xp).child[!d];

		if (u_red(e, w)) {
			item_at(e, w)->red = 0;
			item_at(e, xp)->red = 1;
			u_rotate(e, root, xp, d);
			w = UL(e, xp).child[!d];
		}
		if (!u_red(e, UL(e, w).child[0]) && !u_red(e, UL(e, w).child[1])) {
			item_at(e, w)->red = 1;
			x = xp;
			xp = UL(e, x).parent;
			continue;
		}
		if (!u_red(e, UL(e, w).child[!d])) {
			item_at(e, UL(e, w).child[d])->red = 0;
			item_at(e, w)->red = 1;
			u_rotate(e, root, w, !d);
			w = UL(e, xp).child[!d];
		}
		item_at(e, w)->red = item_at(e, xp)->red;
		item_at(e, xp)->red = 0;
		item_at(e, UL(e, w).child[!d])->red = 0;
		u_rotate(e, root, xp, d);
		x = *root;
	}
	if (x != NO_ITEM)
		item_at(e, x)->red = 0;
}

/* Black height of the subtree at x, or -1 if it breaks a red-black rule
 * or a parent link (for sp_merge_check). */
static int u_check(const struct sp_merge *e, uint32_t x)
{
	int hl, hr;
	uint32_t l, r;

	if (x == NO_ITEM)
		return 1;
	l = UL(e, x).child[0];
	r = UL(e, x).child[1];
	if ((l != NO_ITEM && UL(e, l).parent != x) ||
	    (r != NO_ITEM && UL(e, r).parent != x) ||
	    (item_at(e, x)->red && (u_red(e, l) || u_red(e, r))))
		return -1;
	hl = u_check(e, l);
	hr = u_check(e, r);
	if (hl < 0 || hl != hr)
		return -1;
	return hl + !item_at(e, x)->red;
}

/* The first entry not below key, or NO_ITEM. */
static uint32_t u_nfind(const struct sp_merge *e, uint32_t root,
			const struct sp_item *key)
{
	uint32_t x = root, res = NO_ITEM;

	while (x != NO_ITEM) {
		if (ucmp(item_at(e, x), key) >= 0) {
			res = x;
			x = UL(e, x).child[0];
		} else {
			x = UL(e, x).child[1];
		}
	}
	return res;
}

/* --- item placement --------------------------------------------------- */

static void to_settle(struct sp_merge *e, struct sp_item *it)
{
	TREE_LOCK_ASSERT(e);
	it->state = ST_SETTLE;
	it->pass = e->pass;
	TAILQ_INSERT_TAIL(&e->settle, it, u.later);
	e->nsettle++;
}

static void to_retry(struct sp_merge *e, struct sp_item *it)
{
	TREE_LOCK_ASSERT(e);
	it->state = ST_RETRY;
	TAILQ_INSERT_TAIL(&e->retry, it, u.later);
	e->nretry++;
}

static void to_unstable(struct sp_merge *e, struct sp_item *it)
{
	struct sp_domain *d = item_region(e, it)->dom;

	TREE_LOCK_ASSERT(e);
	it->state = ST_UNSTABLE;
	if (u_insert(e, &d->unstable, it, item_id(it)) != 0) {
		/* Cannot happen: (region, page) is unique. */
		it->state = ST_NONE;
		to_settle(e, it);
		return;
	}
	stat_add(e, S_PAGES_UNSHARED, 1);
}

/* Take an item out of wherever it is (its page changed, or its region is
 * going away). */
static void detach(struct sp_merge *e, struct sp_item *it)
{
	TREE_LOCK_ASSERT(e);
	switch (it->state) {
	case ST_UNSTABLE:
		u_remove(e, &item_region(e, it)->dom->unstable, item_id(it));
		stat_add(e, S_PAGES_UNSHARED, -1);
		break;
	case ST_MERGED:
		rmap_del(e, it);
		break;
	case ST_SETTLE:
		TAILQ_REMOVE(&e->settle, it, u.later);
		e->nsettle--;
		break;
	case ST_RETRY:
		TAILQ_REMOVE(&e->retry, it, u.later);
		e->nretry--;
		break;
	default:
		break;
	}
	it->state = ST_NONE;
}

/* --- the merge batch -------------------------------------------------- */

static int pend_cmp(const void *a, const void *b)
{
	const struct pend *x = a, *y = b;

	return cmp_u64(x->key, y->key);
}

/* Queue a merge of it onto n. A pending item names its node (in the
 * rmap member, unused until it is merged), so that predict() can see
 * where its neighbours are going before the batch is applied. */
static void queue_as(struct sp_merge *e, struct sp_item *it,
		     struct sp_stable *n, bool predicted)
{
	TREE_LOCK_ASSERT(e);
	assert(e->npend < PEND_MAX);
	n->npending++;
	it->state = ST_PENDING;
	it->u.rmap.node = n;
	e->pend[e->npend].key = (uint64_t)it->region << 32 | it->page;
	e->pend[e->npend].item = item_id(it);
	e->pend[e->npend].predicted = predicted;
	e->npend++;
}

static void queue(struct sp_merge *e, struct sp_item *it, struct sp_stable *n)
{
	queue_as(e, it, n, false);
}

static void finish(struct sp_merge *e, struct sp_item *it, bool predicted,
		   int res)
{
	struct sp_stable *n = it->u.rmap.node;

	TREE_LOCK_ASSERT(e);
	assert(it->state == ST_PENDING);
	n->npending--;
	it->state = ST_NONE;
	if (res == 0) {
		rmap_add(e, n, it);
		stat_add(e, S_MERGES, 1);
	} else if (res == -EAGAIN && predicted) {
		/* Its content is not its sibling's: read and look it up in
		 * this very pass (the settle phase takes entries of earlier
		 * passes first; the head keeps the list in pass order). */
		stat_add(e, S_MERGES_FAILED, 1);
		stat_add(e, S_MISPREDICTED, 1);
		it->state = ST_SETTLE;
		it->pass = pass_prev(e->pass);
		TAILQ_INSERT_HEAD(&e->settle, it, u.later);
		e->nsettle++;
	} else {
		stat_add(e, S_MERGES_FAILED, 1);
		if (res == -EAGAIN)
			to_settle(e, it);  /* changed: it will settle */
		else
			to_retry(e, it);   /* out of a resource: back off */
	}
	if (n->nmap == 0 && n->npending == 0)
		node_free(e, n);
}

/* Account the results of batch b (rc: what merge or merge_wait returned).
 * pend and reqs are the flush's arrays, indexed alike. */
static void finish_batch(struct sp_merge *e, struct pend *pend,
			 struct sp_merge_req *reqs, const struct inflight *b,
			 int rc)
{
	size_t k;

	TREE_LOCK_ASSERT(e);
	if (rc < 0) {
		stat_add(e, S_BACKEND_ERRORS, 1);
		for (k = b->at; k < b->at + b->n; k++)
			reqs[k].result = rc;
	}
	for (k = b->at; k < b->at + b->n; k++)
		finish(e, item_at(e, pend[k].item), pend[k].predicted,
		       reqs[k].result);
}

/* Wait for the flush in flight, if any, and account its results. */
static void reap(struct sp_merge *e)
{
	size_t i;

	TREE_LOCK_ASSERT(e);
	if (e->fl_npend == 0)
		return;
	for (i = 0; i < e->nfl; i++) {
		const struct inflight *b = &e->fl[i];
		int rc = b->rc;

		if (rc == 0)
			rc = e->ops.merge_wait(e->ctx, e->rtab[b->region]->handle,
					       e->fl_reqs + b->at, b->n);
		finish_batch(e, e->fl_pend, e->fl_reqs, b, rc);
	}
	e->fl_npend = 0;
	e->nfl = 0;
}

/* Hand the pending requests to the backend, one batch per region, sorted
 * by page; then account each result. With merge_submit the batches are
 * only started, and accounted by the next flush or drain(): the buffers
 * swap, and the pending batch is empty again either way. Invalidates read
 * pointers. */
static void flush(struct sp_merge *e)
{
	size_t i = 0, j;

	TREE_LOCK_ASSERT(e);
	reap(e);
	if (e->npend == 0)
		return;
	qsort(e->pend, e->npend, sizeof(*e->pend), pend_cmp);
	while (i < e->npend) {
		uint32_t rid = (uint32_t)(e->pend[i].key >> 32);
		struct sp_merge_region *r = e->rtab[rid];
		struct inflight b;

		for (j = i; j < e->npend && (uint32_t)(e->pend[j].key >> 32) == rid; j++) {
			struct sp_merge_req *q = &e->reqs[j];
			const struct sp_stable *n = item_at(e, e->pend[j].item)->u.rmap.node;

			q->page = (uint32_t)e->pend[j].key;
			q->kind = n->kind;
			q->target = n->target;
			q->result = -EIO;  /* a backend that forgets fails */
		}
		b.region = rid;
		b.at = (uint32_t)i;
		b.n = (uint32_t)(j - i);
		if (e->async) {
			b.rc = e->ops.merge_submit(e->ctx, r->handle,
						   e->reqs + i, j - i);
			if (b.rc > 0)
				b.rc = -EIO;
			e->fl[e->nfl++] = b;
		} else {
			b.rc = 0;
			finish_batch(e, e->pend, e->reqs, &b,
				     e->ops.merge(e->ctx, r->handle,
						  e->reqs + i, j - i));
		}
		i = j;
	}
	if (e->async) {
		struct pend *p = e->fl_pend;
		struct sp_merge_req *q = e->fl_reqs;

		e->fl_pend = e->pend;
		e->fl_reqs = e->reqs;
		e->fl_npend = e->npend;
		e->pend = p;
		e->reqs = q;
	}
	e->npend = 0;
}

/* Flush now if every batch in flight has been answered: the clones are
 * idle, so hand them what is queued rather than wait for a full flush. */
static void flush_if_idle(struct sp_merge *e)
{
	TREE_LOCK_ASSERT(e);
	e->reads_since = 0;
	if (!e->async || e->ops.merge_ready == NULL || e->npend < FLUSH_IDLE_MIN)
		return;
	for (size_t i = 0; i < e->nfl; i++) {
		const struct inflight *b = &e->fl[i];

		if (b->rc == 0 &&
		    !e->ops.merge_ready(e->ctx, e->rtab[b->region]->handle))
			return;
	}
	flush(e);
}

/* Flush, and wait until nothing is in flight. */
static void drain(struct sp_merge *e)
{
	flush(e);
	reap(e);
}

/* Make room for the two requests a lookup may queue. Must run before the
 * candidate is read (a flush invalidates read pointers). */
static void reserve(struct sp_merge *e)
{
	if (e->npend + 2 > PEND_MAX)
		flush(e);
}

/* --- the lookup ------------------------------------------------------- */

/* Is an entry with digest csum waiting in d's unstable tree? */
static bool unstable_has(struct sp_merge *e, struct sp_domain *d, uint32_t csum)
{
	struct sp_item key;
	uint32_t id;

	memset(&key, 0, sizeof(key));
	key.csum = csum;
	id = u_nfind(e, d->unstable, &key);
	return id != NO_ITEM && item_at(e, id)->csum == csum;
}

/* The first unstable entry of d with digest csum, taken out of the tree,
 * or NULL. It is not read: the caller proposes it, as a prediction, for a
 * frame holding the candidate's content, and its merge compares it with
 * that frame before mapping anything (a digest never decides equality). */
static struct sp_item *unstable_take(struct sp_merge *e, struct sp_domain *d,
				     uint32_t csum)
{
	struct sp_item key, *u;
	uint32_t id;

	memset(&key, 0, sizeof(key));
	key.csum = csum;
	id = u_nfind(e, d->unstable, &key);
	if (id == NO_ITEM || (u = item_at(e, id))->csum != csum)
		return NULL;
	u_remove(e, &d->unstable, id);
	stat_add(e, S_PAGES_UNSHARED, -1);
	u->state = ST_NONE;
	return u;
}

/* Decide what the candidate it (content just read, hash its XXH3-64)
 * merges onto, cheapest target first, and queue the merge; or put it in
 * the unstable tree. twin: its sibling's unstable item at the same
 * offset, or NULL. verify: compare the content with an existing target
 * whose digest is the candidate's before proposing it; if false, the
 * 64-bit digest picks the target and the merge, which compares the page
 * with its target before mapping anything, is the comparison (a page
 * refused that way is read again and looked up with verify set, so a
 * digest collision costs one refused merge, never a wrong one).
 * content NULL (with verify false): only the digest is known (ops.digest);
 * the page is read only if it must be copied into a new frame. */
static void classify(struct sp_merge *e, struct sp_item *it,
		     const void *content, uint64_t hash, struct sp_item *twin,
		     bool verify)
{
	struct sp_merge_region *r = item_region(e, it);
	struct sp_merge_template *t = r->tmpl;
	struct sp_domain *d = r->dom;
	const void *cmp = verify ? content : NULL;
	struct sp_stable *n, *m;
	struct sp_item *u;
	bool guess = !verify;
	int64_t j;

	TREE_LOCK_ASSERT(e);
	assert(it->state == ST_NONE && e->npend + 2 <= PEND_MAX);
	assert(content != NULL || !verify);

	/* 1. Back to the template page at its own offset. */
	if (t != NULL && it->page < t->npages && t->hashes[it->page] == hash &&
	    (cmp == NULL || tmpl_page_eq(e, t, it->page, cmp))) {
		n = tmpl_node(e, t, it->page);
		goto merge;
	}
	/* 2. The zero page. */
	if (knob(e, K_USE_ZERO_PAGES) && hash == e->zero_hash &&
	    (content == NULL || is_zero(content))) {
		n = zero_node(e, d);
		guess = content == NULL;
		goto merge;
	}
	/* 3. Another page of the template. */
	if (t != NULL && (j = tmpl_search(e, t, hash, cmp)) >= 0) {
		n = tmpl_node(e, t, (uint64_t)j);
		goto merge;
	}
	/* 4. A frame already shared in this domain. */
	n = stable_find(e, d, hash, cmp);
	if (n != NULL && cmp == NULL && chain_pick(e, n) == NULL) {
		/* A full chain gets a dup made from this page, which must
		 * hold its head's bytes: compare before making one. */
		if (content == NULL)
			goto read;
		n = stable_find(e, d, hash, content);
		guess = false;
	}
	if (n != NULL) {
		m = chain_pick(e, n);
		if (m == NULL) {
			/* Every node of the chain is full: a new dup. */
			m = frame_node_new(e, d, it, content, hash);
			if (m != NULL) {
				m->is_dup = 1;
				m->u.dup.head = n;
				LIST_INSERT_HEAD(&n->dups, m, u.dup.link);
				chain_account(e, n->ndups, n->ndups + 1);
				n->ndups++;
			}
		}
		n = m;
		goto merge;
	}
	/* 5. A page waiting in the unstable tree with the same digest: share
	 * a new frame holding this page's content. The partner is taken
	 * unread, as a prediction (the sibling's page at the same offset
	 * first, else the first entry with the digest): its own merge
	 * compares it with the frame, and if that fails it is read and
	 * looked up again in this pass; the frame then serves this page
	 * alone until an equal page comes. Reading it here would cost a
	 * second read of a page of another clone, and prove nothing the
	 * merge does not prove again. */
	if (twin != NULL && (twin->csum != (uint32_t)hash || item_region(e, twin)->dom != d))
		twin = NULL;
	if (content == NULL && (twin != NULL || unstable_has(e, d, (uint32_t)hash)))
		goto read;   /* a new frame: its bytes come from this page */
	if (twin != NULL) {
		u_remove(e, &d->unstable, item_id(twin));
		stat_add(e, S_PAGES_UNSHARED, -1);
		twin->state = ST_NONE;
		u = twin;
	} else {
		u = unstable_take(e, d, (uint32_t)hash);
	}
	if (u != NULL) {
		n = frame_node_new(e, d, it, content, hash);
		if (n == NULL) {
			to_unstable(e, u);
			to_retry(e, it);
			return;
		}
		n->dom = d;
		RB_INSERT(sp_stree, &d->stable, n);
		stat_add(e, S_PREDICTED, 1);
		queue_as(e, u, n, true);
		queue(e, it, n);
		return;
	}
	/* 6. Unique for now. */
	to_unstable(e, it);
	return;

merge:
	if (n == NULL) {   /* out of memory or frames */
		to_retry(e, it);
		return;
	}
	if (guess)
		stat_add(e, S_PREDICTED, 1);
	queue_as(e, it, n, guess);
	return;

read:
	/* Known by its digest only, and now its bytes are needed: read it
	 * and look it up again with them (its digest may have moved). */
	if (read_item(e, it, B_CAND, &content) != 0) {
		stat_add(e, S_BACKEND_ERRORS, 1);
		to_settle(e, it);
		return;
	}
	hash = page_hash(content);
	it->csum = (uint32_t)hash;
	classify(e, it, content, hash, twin, false);
}

/* Read and hash a candidate; 0, or -errno after parking it to settle. */
static int load(struct sp_merge *e, struct sp_item *it, const void **content,
		uint64_t *hash)
{
	stat_add(e, S_PAGES_SCANNED, 1);
	if (read_item(e, it, B_CAND, content) != 0) {
		stat_add(e, S_BACKEND_ERRORS, 1);
		to_settle(e, it);
		return -EIO;
	}
	*hash = page_hash(*content);
	return 0;
}

/* The item of sib at the same offset as page of r, if it can guide r's
 * page: sib polled before r, same domain and template. NULL if none. */
static struct sp_item *sib_item(const struct sp_merge *e,
				struct sp_merge_region *sib, uint32_t page)
{
	if (sib == NULL || page >= sib->npages)
		return NULL;
	return item_find(e, sib, page);
}

/* The target s (the sibling's item at the same offset) is merged onto, or
 * on its way to, if page of r may merge onto it too (same domain for
 * frames and the zero page, room left in a frame's chain); else NULL. */
static struct sp_stable *predict(struct sp_merge *e, struct sp_merge_region *r,
				 const struct sp_item *s)
{
	struct sp_stable *n;

	TREE_LOCK_ASSERT(e);
	if (s == NULL || (s->state != ST_MERGED && s->state != ST_PENDING))
		return NULL;
	n = s->u.rmap.node;
	switch (n->kind) {
	case SP_MERGE_TEMPLATE:
		return n->tmpl == r->tmpl ? n : NULL;
	case SP_MERGE_ZERO:
		return n->dom == r->dom && knob(e, K_USE_ZERO_PAGES) ? n : NULL;
	default:
		return n->dom == r->dom ? chain_pick(e, n->is_dup ? n->u.dup.head : n)
					: NULL;
	}
}

/* Page `page` of r was reported changed. it: its item, NULL the first
 * time; s: then the item of the page at the same offset of the region
 * polled before r in r's domain (NULL if none), which predicts this one's
 * content; dig: its digest from ops.digest, or NULL (read it). */
static void changed_page(struct sp_merge *e, struct sp_merge_region *r,
			 uint32_t page, struct sp_item *it, struct sp_item *s,
			 const uint64_t *dig)
{
	struct sp_stable *n;
	const void *content;
	uint32_t prev_pass = 0, prev_csum = 0;
	bool fresh = it == NULL;
	uint64_t hash;

	TREE_LOCK_ASSERT(e);
	if (it != NULL && it->state == ST_PENDING)
		drain(e);   /* reported again within one step */
	if (it != NULL) {
		prev_pass = it->pass;
		prev_csum = it->csum;
		detach(e, it);
	} else {
		it = item_new(e, r, page);
		if (it == NULL)
			return;   /* out of memory: it stays unmerged */
	}
	reserve(e);
	it->pass = e->pass;
	/* Clones write the same bytes at the same offsets: a page written
	 * for the first time is proposed, unread, for its sibling's target.
	 * The backend compares it with the target before it maps anything
	 * (the merge op's contract), so a wrong guess costs one comparison
	 * and the page is read and looked up later in this pass. */
	if ((n = predict(e, r, s)) != NULL) {
		it->csum = (uint32_t)n->hash;
		stat_add(e, S_PAGES_SCANNED, 1);
		stat_add(e, S_PREDICTED, 1);
		queue_as(e, it, n, true);
		return;
	}
	if (dig != NULL) {
		/* hashed where it lives: read only if it makes a frame */
		stat_add(e, S_PAGES_SCANNED, 1);
		content = NULL;
		hash = *dig;
	} else if (load(e, it, &content, &hash) != 0) {
		return;
	}
	it->csum = (uint32_t)hash;
	if (!fresh && prev_pass == pass_prev(e->pass) && prev_csum != it->csum) {
		to_settle(e, it);   /* volatile: changing pass after pass */
		return;
	}
	classify(e, it, content, hash,
		 s != NULL && s->state == ST_UNSTABLE ? s : NULL, false);
}

/* An item that waited (settle or retry) gets its turn. */
static void revisit(struct sp_merge *e, struct sp_item *it)
{
	const void *content;
	uint64_t hash;

	TREE_LOCK_ASSERT(e);
	it->state = ST_NONE;
	reserve(e);
	if (load(e, it, &content, &hash) != 0)
		return;
	it->csum = (uint32_t)hash;
	classify(e, it, content, hash, NULL, true);
}

/* --- passes and steps ------------------------------------------------- */

struct step_res {
	uint64_t pages;
	bool pass_done;
	bool converged;
};

static void pass_end(struct sp_merge *e, struct step_res *res)
{
	bool converged;

	drain(e);
	if (e->retry_round) {
		if (e->nretry < e->retry_at_start)
			e->retry_backoff = 1;
		else if (e->retry_backoff < RETRY_BACKOFF_MAX)
			e->retry_backoff *= 2;
		e->retry_due = (e->pass + e->retry_backoff) & PASS_MASK;
		e->retry_round = false;
	}
	converged = !e->pass_changed && e->nsettle == 0;
	stat_set(e, S_CONVERGED, converged);
	stat_add(e, S_FULL_SCANS, 1);
	e->pass = (e->pass + 1) & PASS_MASK;
	e->phase = PH_COLLECT;
	e->cursor = 0;
	e->in_pass = false;
	e->pass_changed = false;
	res->pass_done = true;
	res->converged = converged;
}

/* The region to ask for changes next in this pass, from the cursor on, or
 * NULL once every region said it has none left. Synchronously, one region
 * after the other. With merges in flight, round robin, one changed() chunk
 * each: a flush then holds batches for several regions, and several
 * clones apply at once while the core works, instead of one. */
static struct sp_merge_region *next_region(struct sp_merge *e)
{
	struct sp_merge_region *r;
	uint32_t k;

	TREE_LOCK_ASSERT(e);
	if (!e->async) {
		while (e->cursor < e->rtab_len &&
		       (r = e->rtab[e->cursor]) == NULL)
			e->cursor++;
		return e->cursor < e->rtab_len ? e->rtab[e->cursor] : NULL;
	}
	for (k = 0; k < e->rtab_len; k++) {
		uint32_t at = (e->cursor + k) % e->rtab_len;

		r = e->rtab[at];
		if (r != NULL && r->collected != e->pass) {
			e->cursor = at;
			return r;
		}
	}
	return NULL;
}

/* The region before r in polling order (wrapping) bound to r's domain and
 * template, or NULL. */
static struct sp_merge_region *sibling(struct sp_merge *e,
				       const struct sp_merge_region *r)
{
	uint32_t k;

	TREE_LOCK_ASSERT(e);
	for (k = 1; k < e->rtab_len; k++) {
		struct sp_merge_region *s =
			e->rtab[(r->id + e->rtab_len - k) % e->rtab_len];

		if (s != NULL && s->dom == r->dom && s->tmpl == r->tmpl)
			return s;
	}
	return NULL;
}

/* Ask the backend for the digests of the n pages changed() just reported
 * (e->chg), except those a prediction will propose unread and those whose
 * sibling page waits in the unstable tree (read: they make frames): one
 * request per chunk. On failure they are read as usual. */
static void digest_chunk(struct sp_merge *e, struct sp_merge_region *r, size_t n)
{
	size_t i, m = 0;
	int rc;

	TREE_LOCK_ASSERT(e);
	memset(e->dig_have, 0, n);
	if (r->no_digest)
		return;
	for (i = 0; i < n; i++) {
		struct sp_item *s = e->csib[i];

		if (e->chg[i] >= r->npages)
			continue;
		/* predicted: proposed unread. The sibling's page waits in the
		 * unstable tree: this one most likely pairs with it in a new
		 * frame, made from this page's bytes: read it, once. */
		if (s != NULL && (s->state == ST_UNSTABLE || predict(e, r, s) != NULL))
			continue;
		e->dig[m++] = e->chg[i];
		e->dig_have[i] = 1;
	}
	if (m == 0)
		return;
	rc = e->ops.digest(e->ctx, r->handle, e->dig, m, e->dig);
	if (rc != 0) {
		if (rc == -ENOSYS)
			r->no_digest = true;
		else
			stat_add(e, S_BACKEND_ERRORS, 1);
		memset(e->dig_have, 0, n);
		return;
	}
	/* spread dig[0, m) out to the indices asked for (in place, from the
	 * end: the k-th digest belongs at an index >= k) */
	for (i = n; i-- > 0;)
		if (e->dig_have[i])
			e->dig[i] = e->dig[--m];
}

static void step(struct sp_merge *e, uint64_t budget, struct step_res *res)
{
	struct sp_item *it;

	TREE_LOCK_ASSERT(e);
	memset(res, 0, sizeof(*res));
	e->hint_valid = false;
	e->in_pass = true;
	while (!res->pass_done) {
		switch (e->phase) {
		case PH_COLLECT: {
			struct sp_merge_region *r = next_region(e), *sib;
			size_t cap, i;
			bool asc;
			int n;

			if (r == NULL) {
				/* Results first: a wrong prediction joins the
				 * settle list for this very pass. */
				drain(e);
				e->phase = PH_SETTLE;
				break;
			}
			if (budget == 0)
				goto out;
			cap = budget < CHG_CHUNK ? (size_t)budget : CHG_CHUNK;
			sib = sibling(e, r);
			n = e->ops.changed(e->ctx, r->handle, e->chg, cap);
			if (n < 0 || (size_t)n > cap) {
				stat_add(e, S_BACKEND_ERRORS, 1);
				r->collected = e->pass;
				e->cursor++;
				break;
			}
			/* Each page's item and sibling item, looked up once
			 * for the chunk: processing a page makes or drops no
			 * other page's item, and items never move; a page
			 * named twice in a chunk (changed() should not, and
			 * ascending order proves it does not) is looked up
			 * when its turn comes instead. */
			asc = true;
			for (i = 0; i < (size_t)n; i++) {
				uint32_t page = (uint32_t)e->chg[i];

				asc = asc && (i == 0 || e->chg[i] > e->chg[i - 1]);
				e->cit[i] = e->csib[i] = NULL;
				if (e->chg[i] >= r->npages)
					continue;
				e->cit[i] = item_find(e, r, page);
				if (e->cit[i] == NULL)
					e->csib[i] = sib_item(e, sib, page);
			}
			if (e->ops.digest != NULL && asc)
				digest_chunk(e, r, (size_t)n);
			for (i = 0; i < (size_t)n; i++) {
				uint32_t page = (uint32_t)e->chg[i];

				if (e->chg[i] >= r->npages) {
					stat_add(e, S_BACKEND_ERRORS, 1);
					continue;
				}
				if (!asc) {
					e->cit[i] = item_find(e, r, page);
					e->csib[i] = e->cit[i] == NULL ?
						     sib_item(e, sib, page) : NULL;
				}
				changed_page(e, r, page, e->cit[i], e->csib[i],
					     asc && e->dig_have != NULL && e->dig_have[i] ?
					     &e->dig[i] : NULL);
				/* within a chunk only when it is slow: one
				 * whose pages are read (to be copied into
				 * frames). Splitting a fast chunk's batch
				 * makes its clone take it in two turns. */
				if ((i & (FLUSH_IDLE_EVERY - 1)) == FLUSH_IDLE_EVERY - 1 &&
				    e->reads_since >= FLUSH_IDLE_EVERY / 2)
					flush_if_idle(e);
			}
			flush_if_idle(e);
			if (n > 0)
				e->pass_changed = true;
			budget -= (uint64_t)n;
			res->pages += (uint64_t)n;
			if ((size_t)n < cap) {
				r->collected = e->pass;
				e->cursor++;
			} else if (e->async) {
				e->cursor++;   /* round robin: see next_region() */
			}
			break;
		}
		case PH_SETTLE:
			it = TAILQ_FIRST(&e->settle);
			if (it == NULL || it->pass == e->pass) {
				e->phase = PH_RETRY;
				e->retry_todo = 0;
				if (e->nretry > 0 &&
				    ((e->pass - e->retry_due) & PASS_MASK) <
					    (PASS_MASK >> 1)) {
					e->retry_todo = e->nretry;
					e->retry_at_start = e->nretry;
					e->retry_round = true;
				}
				break;
			}
			if (budget == 0)
				goto out;
			TAILQ_REMOVE(&e->settle, it, u.later);
			e->nsettle--;
			e->pass_changed = true;
			revisit(e, it);
			budget--;
			res->pages++;
			break;
		case PH_RETRY:
			it = TAILQ_FIRST(&e->retry);
			if (e->retry_todo == 0 || it == NULL) {
				e->phase = PH_END;
				break;
			}
			if (budget == 0)
				goto out;
			TAILQ_REMOVE(&e->retry, it, u.later);
			e->nretry--;
			e->retry_todo--;
			revisit(e, it);
			budget--;
			res->pages++;
			break;
		case PH_END:
			pass_end(e, res);
			break;
		}
	}
out:
	drain(e);
}

/* --- public: life cycle ----------------------------------------------- */

static const int64_t knob_default[NKNOB] = {
	[K_RUN] = 0,
	[K_PAGES_TO_SCAN] = 10000,
	[K_SLEEP_MS] = 20,
	[K_POLL_MS] = 1000,
	[K_MAX_PAGE_SHARING] = 256,
	[K_USE_ZERO_PAGES] = 0,
	[K_ACROSS] = 0,
};

int sp_merge_create(const struct sp_merge_ops *ops, void *ctx,
		    struct sp_merge **out, struct sp_error *err)
{
	struct sp_merge *e;
	pthread_condattr_t ca;
	int i;

	*out = NULL;
	if (ops == NULL || !ops->changed || !ops->read_page ||
	    !ops->read_template || !ops->read_frame || !ops->frame_alloc ||
	    !ops->frame_write || !ops->frame_free || !ops->merge ||
	    !ops->merge_submit != !ops->merge_wait ||
	    (ops->merge_ready && !ops->merge_submit))
		return sp_error_set(err, -EINVAL,
				    "merge engine: every backend op is required (merge_submit and merge_wait: both or neither; merge_ready only with them)");
	e = calloc(1, sizeof(*e));
	if (e == NULL)
		return sp_error_set(err, -ENOMEM, "merge engine: out of memory");
	pthread_mutex_init(&e->lock, NULL);
	pthread_mutex_init(&e->wlock, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&e->wcv, &ca);
	pthread_condattr_destroy(&ca);
	e->ops = *ops;
	e->ctx = ctx;
	e->zero_hash = page_hash(zero_page);
	for (i = 0; i < NKNOB; i++)
		atomic_init(&e->knob[i], knob_default[i]);
	for (i = 0; i < NSTAT; i++)
		atomic_init(&e->st[i], 0);
	RB_INIT(&e->domains);
	RB_INIT(&e->common.stable);
	e->common.unstable = NO_ITEM;
	LIST_INIT(&e->templates);
	TAILQ_INIT(&e->settle);
	TAILQ_INIT(&e->retry);
	e->retry_backoff = 1;
	e->free_items = NO_ITEM;
	e->async = ops->merge_submit != NULL;
	e->pend = calloc(PEND_MAX, sizeof(*e->pend));
	e->reqs = calloc(PEND_MAX, sizeof(*e->reqs));
	e->chg = calloc(CHG_CHUNK, sizeof(*e->chg));
	e->cit = calloc(CHG_CHUNK, sizeof(*e->cit));
	e->csib = calloc(CHG_CHUNK, sizeof(*e->csib));
	if (ops->digest != NULL) {
		e->dig = calloc(CHG_CHUNK, sizeof(*e->dig));
		e->dig_have = calloc(CHG_CHUNK, sizeof(*e->dig_have));
	}
	if (e->async) {
		e->fl_pend = calloc(PEND_MAX, sizeof(*e->fl_pend));
		e->fl_reqs = calloc(PEND_MAX, sizeof(*e->fl_reqs));
	}
	for (i = 0; i < NBUF; i++)
		e->buf[i] = aligned_alloc(PAGE, PAGE);
	if (!e->pend || !e->reqs || !e->chg || !e->cit || !e->csib ||
	    !e->buf[0] || !e->buf[1] ||
	    !e->buf[2] || !e->buf[3] ||
	    (e->async && (!e->fl_pend || !e->fl_reqs)) ||
	    (ops->digest != NULL && (!e->dig || !e->dig_have))) {
		sp_merge_destroy(e);
		return sp_error_set(err, -ENOMEM, "merge engine: out of memory");
	}
	atomic_init(&e->st[S_METADATA],
		    (int64_t)(sizeof(*e) + PEND_MAX * (sizeof(*e->pend) +
		    sizeof(*e->reqs)) * (e->async ? 2 : 1) +
		    CHG_CHUNK * (sizeof(*e->chg) + sizeof(*e->cit) +
				 sizeof(*e->csib)) + NBUF * PAGE +
		    (ops->digest != NULL ? CHG_CHUNK * (sizeof(*e->dig) +
						      sizeof(*e->dig_have)) : 0)));
	*out = e;
	return 0;
}

static void free_domain_nodes(struct sp_domain *d)
{
	struct sp_stable *n, *m;

	while ((n = RB_MIN(sp_stree, &d->stable)) != NULL) {
		RB_REMOVE(sp_stree, &d->stable, n);
		while ((m = LIST_FIRST(&n->dups)) != NULL) {
			LIST_REMOVE(m, u.dup.link);
			free(m);
		}
		free(n);
	}
	free(d->zero);
}

void sp_merge_destroy(struct sp_merge *e)
{
	struct sp_merge_template *t;
	struct sp_domain *d;
	struct sp_stable *n;
	uint32_t i;
	size_t c;
	int b;

	if (e == NULL)
		return;
	if (e->running)
		sp_merge_stop(e);
	/* Free everything without calling the backend: merged pages stay
	 * merged, the frames stay the backend's. */
	free_domain_nodes(&e->common);
	while ((d = RB_MIN(sp_dtree, &e->domains)) != NULL) {
		RB_REMOVE(sp_dtree, &e->domains, d);
		free_domain_nodes(d);
		free(d);
	}
	while ((t = LIST_FIRST(&e->templates)) != NULL) {
		LIST_REMOVE(t, link);
		while ((n = RB_MIN(sp_ttree, &t->nodes)) != NULL) {
			RB_REMOVE(sp_ttree, &t->nodes, n);
			free(n);
		}
		free(t->filter);
		free(t->by_hash);
		free(t);
	}
	for (i = 0; i < e->rtab_len; i++) {
		if (e->rtab[i] != NULL)
			free(e->rtab[i]->islot);
		free(e->rtab[i]);
	}
	for (c = 0; c < e->nchunks; c++)
		free(e->chunks[c]);
	free(e->chunks);
	free(e->rtab);
	free(e->pend);
	free(e->reqs);
	free(e->fl_pend);
	free(e->fl_reqs);
	free(e->fl);
	free(e->chg);
	free(e->cit);
	free(e->csib);
	free(e->dig);
	free(e->dig_have);
	for (b = 0; b < NBUF; b++)
		free(e->buf[b]);
	pthread_mutex_destroy(&e->lock);
	pthread_mutex_destroy(&e->wlock);
	pthread_cond_destroy(&e->wcv);
	free(e);
}

struct hash_page {
	uint64_t hash;
	uint32_t page;
};

static int hash_page_cmp(const void *a, const void *b)
{
	const struct hash_page *x = a, *y = b;

	if (x->hash != y->hash)
		return cmp_u64(x->hash, y->hash);
	return cmp_u64(x->page, y->page);
}

/* Metadata of a template: the hash index and its filter. */
static int64_t tmpl_bytes(const struct sp_merge_template *t)
{
	return (int64_t)(sizeof(*t) + t->npages * sizeof(*t->by_hash) +
			 (t->fmask + 1) / 8);
}

int sp_merge_template_add(struct sp_merge *e,
			  const struct sp_merge_template_desc *desc,
			  struct sp_merge_template **out, struct sp_error *err)
{
	struct sp_merge_template *t;
	struct hash_page *hp;
	uint64_t i;

	*out = NULL;
	if (desc->hashes == NULL || desc->npages == 0 ||
	    desc->npages > UINT32_MAX)
		return sp_error_set(err, -EINVAL,
				    "merge template: need a hash index and 1..2^32-1 pages (got %llu)",
				    (unsigned long long)desc->npages);
	t = calloc(1, sizeof(*t));
	if (t == NULL)
		return sp_error_set(err, -ENOMEM, "merge template: out of memory");
	t->by_hash = malloc(desc->npages * sizeof(*t->by_hash));
	if (t->by_hash == NULL) {
		free(t);
		return sp_error_set(err, -ENOMEM,
				    "merge template: out of memory for the hash index");
	}
	for (t->fmask = 63; t->fmask < desc->npages * 8 - 1;)
		t->fmask = t->fmask * 2 + 1;
	t->filter = calloc((t->fmask + 1) / 64, sizeof(uint64_t));
	hp = malloc(desc->npages * sizeof(*hp));
	if (hp == NULL || t->filter == NULL) {
		free(hp);
		free(t->filter);
		free(t->by_hash);
		free(t);
		return sp_error_set(err, -ENOMEM,
				    "merge template: out of memory for the hash index");
	}
	t->handle = desc->handle;
	t->hashes = desc->hashes;
	t->npages = desc->npages;
	RB_INIT(&t->nodes);
	for (i = 0; i < t->npages; i++) {
		uint64_t bit = t->hashes[i] & t->fmask;

		hp[i].hash = t->hashes[i];
		hp[i].page = (uint32_t)i;
		t->filter[bit / 64] |= 1ull << (bit % 64);
	}
	qsort(hp, t->npages, sizeof(*hp), hash_page_cmp);
	for (i = 0; i < t->npages; i++)
		t->by_hash[i] = hp[i].page;
	free(hp);
	tree_lock(e);
	LIST_INSERT_HEAD(&e->templates, t, link);
	meta(e, tmpl_bytes(t));
	tree_unlock(e);
	*out = t;
	return 0;
}

int sp_merge_template_remove(struct sp_merge *e, struct sp_merge_template *t)
{
	tree_lock(e);
	if (t->nregions > 0) {
		tree_unlock(e);
		return -EBUSY;
	}
	assert(RB_EMPTY(&t->nodes));
	LIST_REMOVE(t, link);
	meta(e, -tmpl_bytes(t));
	tree_unlock(e);
	free(t->filter);
	free(t->by_hash);
	free(t);
	return 0;
}

int sp_merge_region_add(struct sp_merge *e,
			const struct sp_merge_region_desc *desc,
			struct sp_merge_region **out, struct sp_error *err)
{
	struct sp_merge_region *r;
	uint32_t id;

	*out = NULL;
	if (desc->npages == 0 || desc->npages > UINT32_MAX)
		return sp_error_set(err, -EINVAL,
				    "merge region: size must be 1..2^32-1 pages (got %llu)",
				    (unsigned long long)desc->npages);
	r = calloc(1, sizeof(*r));
	if (r == NULL)
		return sp_error_set(err, -ENOMEM, "merge region: out of memory");
	r->handle = desc->handle;
	r->npages = desc->npages;
	r->tmpl = desc->tmpl;
	r->domain = desc->domain;
	tree_lock(e);
	/* a flush in flight holds at most one batch per region */
	if (e->async && e->fl_cap <= stat_get(e, S_REGIONS)) {
		int64_t cap = e->fl_cap ? e->fl_cap * 2 : 8;
		struct inflight *nf = realloc(e->fl, cap * sizeof(*nf));

		if (nf == NULL) {
			tree_unlock(e);
			free(r);
			return sp_error_set(err, -ENOMEM, "merge region: out of memory");
		}
		meta(e, (int64_t)((cap - e->fl_cap) * sizeof(*nf)));
		e->fl = nf;
		e->fl_cap = cap;
	}
	for (id = 0; id < e->rtab_len && e->rtab[id] != NULL; id++)
		;
	if (id == e->rtab_len) {
		uint32_t len = e->rtab_len ? e->rtab_len * 2 : 8;
		struct sp_merge_region **nt;

		if (e->rtab_len >= UINT32_MAX / 2 ||
		    (nt = realloc(e->rtab, len * sizeof(*nt))) == NULL) {
			tree_unlock(e);
			free(r);
			return sp_error_set(err, -ENOMEM,
					    "merge region: out of memory");
		}
		memset(nt + e->rtab_len, 0,
		       (len - e->rtab_len) * sizeof(*nt));
		meta(e, (int64_t)((len - e->rtab_len) * sizeof(*nt)));
		e->rtab = nt;
		e->rtab_len = len;
	}
	r->dom = dom_get(e, r->domain);
	if (r->dom == NULL) {
		tree_unlock(e);
		free(r);
		return sp_error_set(err, -ENOMEM, "merge region: out of memory");
	}
	r->id = id;
	r->collected = pass_prev(e->pass);
	r->dom->nregions++;
	if (r->tmpl != NULL)
		r->tmpl->nregions++;
	e->rtab[id] = r;
	meta(e, sizeof(*r));
	stat_add(e, S_REGIONS, 1);
	tree_unlock(e);
	*out = r;
	sp_merge_kick(e);
	return 0;
}

static void region_drop(struct sp_merge *e, struct sp_merge_region *r)
{
	struct sp_item *it;
	uint32_t k;

	TREE_LOCK_ASSERT(e);
	assert(e->npend == 0 && e->fl_npend == 0);
	for (k = 0; r->islot != NULL && k < 1u << r->ibits; k++) {
		uint32_t id = r->islot[k];

		if (id == NO_ITEM)
			continue;
		it = item_at(e, id);
		detach(e, it);
		item_release(e, r, it, id);
	}
	pidx_free(e, r);
	e->rtab[r->id] = NULL;
	r->dom->nregions--;
	dom_put(e, r->dom);
	if (r->tmpl != NULL)
		r->tmpl->nregions--;
	meta(e, -(int64_t)sizeof(*r));
	stat_add(e, S_REGIONS, -1);
	free(r);
}

void sp_merge_region_remove(struct sp_merge *e, struct sp_merge_region *r)
{
	if (r == NULL)
		return;
	tree_lock(e);
	region_drop(e, r);
	tree_unlock(e);
}

int64_t sp_merge_step(struct sp_merge *e, uint64_t max_pages)
{
	struct step_res res;

	tree_lock(e);
	step(e, max_pages, &res);
	tree_unlock(e);
	return (int64_t)res.pages;
}

int64_t sp_merge_pass(struct sp_merge *e)
{
	struct step_res res;
	uint64_t pages = 0;
	int todo;

	tree_lock(e);
	todo = e->in_pass ? 2 : 1;
	while (todo > 0) {
		step(e, UINT32_MAX, &res);
		pages += res.pages;
		if (res.pass_done)
			todo--;
	}
	tree_unlock(e);
	return (int64_t)pages;
}

/* --- the scanner thread ----------------------------------------------- */

/* Wait on (w) until kicked or stopping, at most ms (< 0: no limit). */
static void wait_wake(struct sp_merge *e, int64_t ms)
{
	struct timespec ts;

	if (ms >= 0) {
		clock_gettime(CLOCK_MONOTONIC, &ts);
		ts.tv_sec += ms / 1000;
		ts.tv_nsec += (ms % 1000) * 1000000;
		if (ts.tv_nsec >= 1000000000) {
			ts.tv_sec++;
			ts.tv_nsec -= 1000000000;
		}
	}
	while (!e->kicked && !e->stopping) {
		if (ms < 0)
			pthread_cond_wait(&e->wcv, &e->wlock);
		else if (pthread_cond_timedwait(&e->wcv, &e->wlock, &ts) ==
			 ETIMEDOUT)
			break;
	}
}

static void *scanner(void *arg)
{
	struct sp_merge *e = arg;

	for (;;) {
		bool run = knob(e, K_RUN) != 0, idle = false;
		struct step_res res;

		if (run) {
			tree_lock(e);
			step(e, (uint64_t)knob(e, K_PAGES_TO_SCAN), &res);
			tree_unlock(e);
			idle = res.pass_done && res.converged;
		}
		pthread_mutex_lock(&e->wlock);
		if (e->stopping) {
			pthread_mutex_unlock(&e->wlock);
			break;
		}
		if (!run) {
			wait_wake(e, -1);
		} else if (idle) {
			int64_t poll = knob(e, K_POLL_MS);

			wait_wake(e, poll > 0 ? poll : -1);
		} else if (knob(e, K_SLEEP_MS) > 0) {
			wait_wake(e, knob(e, K_SLEEP_MS));
		}
		e->kicked = false;
		pthread_mutex_unlock(&e->wlock);
	}
	return NULL;
}

int sp_merge_start(struct sp_merge *e, struct sp_error *err)
{
	int rc;

	if (e->running)
		return sp_error_set(err, -EALREADY,
				    "merge scanner: already running");
	e->stopping = false;
	rc = pthread_create(&e->thread, NULL, scanner, e);
	if (rc != 0)
		return sp_error_set(err, -rc, "merge scanner: cannot start thread");
	e->running = true;
	return 0;
}

void sp_merge_stop(struct sp_merge *e)
{
	if (!e->running)
		return;
	pthread_mutex_lock(&e->wlock);
	e->stopping = true;
	pthread_cond_signal(&e->wcv);
	pthread_mutex_unlock(&e->wlock);
	pthread_join(e->thread, NULL);
	pthread_mutex_lock(&e->wlock);
	e->stopping = false;
	pthread_mutex_unlock(&e->wlock);
	e->running = false;
}

void sp_merge_kick(struct sp_merge *e)
{
	pthread_mutex_lock(&e->wlock);
	e->kicked = true;
	pthread_cond_signal(&e->wcv);
	pthread_mutex_unlock(&e->wlock);
}

/* --- control namespace ------------------------------------------------ */

#define KNOB(n, k, lo, hi, d) { { "merge." n, 1, lo, hi, d }, k }
#define STAT(n, s, d) { { "stats.merge." n, 0, 0, INT64_MAX, d }, s }

static const struct ctl {
	struct sp_merge_ctl_info info;
	int idx;
} ctls[] = {
	KNOB("run", K_RUN, 0, 1,
	     "1: the scanner thread merges; 0: it idles (merged pages stay merged)"),
	KNOB("pages_to_scan", K_PAGES_TO_SCAN, 1, 10000000,
	     "candidate pages the scanner processes per step"),
	KNOB("sleep_ms", K_SLEEP_MS, 0, 60000,
	     "milliseconds the scanner sleeps between steps while there is work"),
	KNOB("poll_ms", K_POLL_MS, 0, 3600000,
	     "once converged, milliseconds between cheap change polls (0: only sp_merge_kick wakes it)"),
	KNOB("max_page_sharing", K_MAX_PAGE_SHARING, 2, 1000000,
	     "most pages one shared frame maps; more start a duplicate (-EBUSY while frames are in use)"),
	KNOB("use_zero_pages", K_USE_ZERO_PAGES, 0, 1,
	     "1: zero-filled pages merge onto the zero page instead of a frame"),
	KNOB("merge_across_domains", K_ACROSS, 0, 1,
	     "1: frames and zero pages are shared across merge domains (-EBUSY while any is merged)"),
	STAT("pages_shared", S_PAGES_SHARED,
	     "targets in use: distinct frames, template pages and zero pages with at least one page merged onto them"),
	STAT("pages_sharing", S_PAGES_SHARING,
	     "pages saved by frame and template merges: sum over frames of (pages - 1) plus pages on the template"),
	STAT("pages_unshared", S_PAGES_UNSHARED,
	     "candidate pages in the unstable tree: unique so far"),
	STAT("pages_volatile", S_PAGES_VOLATILE,
	     "candidate pages neither merged nor unique: changing, settling or waiting to retry a failed merge"),
	STAT("pages_scanned", S_PAGES_SCANNED,
	     "candidate pages processed (read and looked up, or proposed unread), cumulative"),
	STAT("full_scans", S_FULL_SCANS, "passes completed, cumulative"),
	STAT("general_profit", S_GENERAL_PROFIT,
	     "bytes saved minus metadata: (pages_sharing + zero_pages) * 4096 - metadata_bytes"),
	STAT("zero_pages", S_ZERO_PAGES,
	     "pages merged onto the zero page (use_zero_pages)"),
	STAT("stable_node_chains", S_CHAINS,
	     "shared contents split over more than one frame by max_page_sharing"),
	STAT("stable_node_dups", S_DUPS,
	     "frames belonging to such chains"),
	STAT("pages_template", S_PAGES_TEMPLATE,
	     "pages merged onto a template page (included in pages_sharing)"),
	STAT("pages_merged", S_PAGES_MERGED,
	     "candidate pages currently merged onto any target"),
	STAT("rmap_items", S_RMAP_ITEMS,
	     "candidate pages tracked (one 32-byte item each)"),
	STAT("frames_allocated", S_FRAMES,
	     "frames of the frame store held by the engine"),
	STAT("merges", S_MERGES, "merge requests that succeeded, cumulative"),
	STAT("merges_failed", S_MERGES_FAILED,
	     "merge requests the backend refused (-EAGAIN, -ENOMEM, ...), cumulative"),
	STAT("metadata_bytes", S_METADATA,
	     "bytes of engine metadata: items, nodes, regions, indexes, buffers"),
	STAT("regions", S_REGIONS, "regions opted in"),
	STAT("backend_errors", S_BACKEND_ERRORS,
	     "backend ops that failed unexpectedly, cumulative"),
	STAT("converged", S_CONVERGED,
	     "1 if the last full pass found no changed page and none waits to settle"),
	STAT("pages_predicted", S_PREDICTED,
	     "pages proposed without the owner comparing them with the target: unread, for the sibling region's target at the same offset or as the unstable partner of a page with the same digest; or read, for the existing target their digest names; cumulative"),
	STAT("pages_mispredicted", S_MISPREDICTED,
	     "of those, pages whose content differed (then read and looked up comparing bytes), cumulative"),
};
#define NCTL (sizeof(ctls) / sizeof(ctls[0]))

static struct sp_merge_ctl_info ctl_infos[NCTL];
static pthread_once_t ctl_once = PTHREAD_ONCE_INIT;

static void ctl_init(void)
{
	size_t i;

	for (i = 0; i < NCTL; i++)
		ctl_infos[i] = ctls[i].info;
}

const struct sp_merge_ctl_info *sp_merge_ctl_list(size_t *n)
{
	pthread_once(&ctl_once, ctl_init);
	*n = NCTL;
	return ctl_infos;
}

static const struct ctl *ctl_find(const char *name)
{
	size_t i;

	for (i = 0; i < NCTL; i++)
		if (strcmp(ctls[i].info.name, name) == 0)
			return &ctls[i];
	return NULL;
}

int sp_merge_ctl_get(struct sp_merge *e, const char *name, int64_t *val)
{
	const struct ctl *c = ctl_find(name);

	if (c == NULL)
		return -ENOENT;
	if (c->info.writable) {
		*val = knob(e, c->idx);
		return 0;
	}
	switch (c->idx) {
	case S_PAGES_VOLATILE:
		*val = stat_get(e, S_RMAP_ITEMS) - stat_get(e, S_PAGES_MERGED) -
		       stat_get(e, S_PAGES_UNSHARED);
		if (*val < 0)   /* a racy read of three counters */
			*val = 0;
		break;
	case S_GENERAL_PROFIT:
		*val = (stat_get(e, S_PAGES_SHARING) +
			stat_get(e, S_ZERO_PAGES)) * (int64_t)PAGE -
		       stat_get(e, S_METADATA);
		break;
	default:
		*val = stat_get(e, c->idx);
		break;
	}
	return 0;
}

/* Re-bind every region to the domain the new merge_across_domains says,
 * moving its unstable entries. Nothing is merged onto frames or zero. */
static int rebind_domains(struct sp_merge *e)
{
	uint32_t i;

	TREE_LOCK_ASSERT(e);
	for (i = 0; i < e->rtab_len; i++) {
		struct sp_merge_region *r = e->rtab[i];
		struct sp_domain *old, *nd;
		struct sp_item *it;
		uint32_t k;

		if (r == NULL)
			continue;
		old = r->dom;
		nd = dom_get(e, r->domain);
		if (nd == NULL)
			return -ENOMEM;
		if (nd == old)
			continue;
		for (k = 0; r->islot != NULL && k < 1u << r->ibits; k++) {
			if (r->islot[k] == NO_ITEM)
				continue;
			it = item_at(e, r->islot[k]);
			if (it->state != ST_UNSTABLE)
				continue;
			u_remove(e, &old->unstable, r->islot[k]);
			(void)u_insert(e, &nd->unstable, it, r->islot[k]);
		}
		r->dom = nd;
		nd->nregions++;
		old->nregions--;
		dom_put(e, old);
	}
	return 0;
}

int sp_merge_ctl_set(struct sp_merge *e, const char *name, int64_t val,
		     struct sp_error *err)
{
	const struct ctl *c = ctl_find(name);
	int rc = 0;

	if (c == NULL)
		return sp_error_set(err, -ENOENT, "%s: no such knob or statistic",
				    name);
	if (!c->info.writable)
		return sp_error_set(err, -EPERM, "%s: statistics are read-only",
				    name);
	if (val < c->info.min || val > c->info.max)
		return sp_error_set(err, -ERANGE,
				    "%s: %lld is out of range (%lld..%lld)", name,
				    (long long)val, (long long)c->info.min,
				    (long long)c->info.max);
	tree_lock(e);
	if (knob(e, c->idx) == val)
		goto out;
	if ((c->idx == K_ACROSS || c->idx == K_MAX_PAGE_SHARING) &&
	    (stat_get(e, S_FRAMES) > 0 || stat_get(e, S_ZERO_PAGES) > 0)) {
		rc = sp_error_set(err, -EBUSY,
				  "%s: cannot change while pages are merged onto frames or the zero page (%lld frames, %lld zero pages)",
				  name, (long long)stat_get(e, S_FRAMES),
				  (long long)stat_get(e, S_ZERO_PAGES));
		goto out;
	}
	atomic_store_explicit(&e->knob[c->idx], val, memory_order_relaxed);
	if (c->idx == K_ACROSS && (rc = rebind_domains(e)) != 0) {
		atomic_store_explicit(&e->knob[c->idx], !val,
				      memory_order_relaxed);
		rebind_domains(e);
		rc = sp_error_set(err, rc, "%s: out of memory", name);
	}
out:
	tree_unlock(e);
	if (rc == 0)
		sp_merge_kick(e);
	return rc;
}

size_t sp_merge_item_bytes(void)
{
	return sizeof(struct sp_item);
}

/* --- invariant checker ------------------------------------------------ */

struct tally {
	int64_t shared, sharing, zero, tmpl, merged, unshared, frames, chains,
		dups;
};

#define FAIL(...) do { rc = sp_error_set(err, -EUCLEAN, __VA_ARGS__); goto out; } while (0)

static int check_node(struct sp_merge *e, struct sp_stable *n, unsigned flags,
		      struct tally *t, struct sp_error *err)
{
	uint64_t max = (uint64_t)knob(e, K_MAX_PAGE_SHARING);
	const void *nc = NULL, *pc;
	struct sp_item *it = NULL;
	uint32_t len = 0, id, prev;
	int rc = 0;

	if (n->npending != 0)
		FAIL("node %p: %u requests pending between steps", (void *)n,
		     n->npending);
	if (n->nmap == 0)
		FAIL("node kind %u target %llu: no page merged but not freed",
		     n->kind, (unsigned long long)n->target);
	if (n->kind == SP_MERGE_FRAME && n->nmap > max)
		FAIL("frame %llu maps %u pages > max_page_sharing %llu",
		     (unsigned long long)n->target, n->nmap,
		     (unsigned long long)max);
	if ((flags & SP_MERGE_CHECK_CONTENT) &&
	    node_content(e, n, B_INS_A, &nc) != 0)
		FAIL("node kind %u target %llu: content unreadable", n->kind,
		     (unsigned long long)n->target);
	if (nc != NULL && page_hash(nc) != n->hash)
		FAIL("node kind %u target %llu: content does not match its hash",
		     n->kind, (unsigned long long)n->target);
	for (id = n->rmap, prev = NO_ITEM; id != NO_ITEM;
	     prev = id, id = it->u.rmap.next) {
		struct sp_merge_region *r;

		if (id % ITEMS_PER_CHUNK == 0 || id / ITEMS_PER_CHUNK >= e->nchunks)
			FAIL("rmap of node %llu: bad item id %u",
			     (unsigned long long)n->target, id);
		it = item_at(e, id);
		r = item_region(e, it);
		len++;
		if (it->state != ST_MERGED || it->u.rmap.node != n ||
		    it->u.rmap.prev != prev || len > n->nmap)
			FAIL("rmap of node %llu: item state %u, node or links wrong",
			     (unsigned long long)n->target, it->state);
		if (n->kind == SP_MERGE_TEMPLATE && r->tmpl != n->tmpl)
			FAIL("region %u page %u merged onto another checkpoint's template",
			     it->region, it->page);
		if (n->kind != SP_MERGE_TEMPLATE && r->dom != n->dom)
			FAIL("region %u (domain %u) page %u merged onto a target of domain %u",
			     it->region, r->domain, it->page, n->dom->id);
		if (nc != NULL) {
			if (read_item(e, it, B_INS_B, &pc) != 0)
				FAIL("region %u page %u: unreadable", it->region,
				     it->page);
			if (memcmp(pc, nc, PAGE) != 0)
				FAIL("region %u page %u: content differs from its merge target (kind %u target %llu)",
				     it->region, it->page, n->kind,
				     (unsigned long long)n->target);
		}
	}
	if (len != n->nmap)
		FAIL("node %llu: nmap %u but rmap holds %u",
		     (unsigned long long)n->target, n->nmap, len);
	t->shared++;
	t->merged += n->nmap;
	switch (n->kind) {
	case SP_MERGE_FRAME:
		t->sharing += n->nmap - 1;
		t->frames++;
		break;
	case SP_MERGE_TEMPLATE:
		t->sharing += n->nmap;
		t->tmpl += n->nmap;
		break;
	default:
		t->zero += n->nmap;
		break;
	}
out:
	return rc;
}

static int check_domain(struct sp_merge *e, struct sp_domain *d, unsigned flags,
			struct tally *t, struct sp_error *err)
{
	struct sp_stable *n, *prev = NULL, *m;
	struct sp_item *it, *uprev = NULL;
	uint32_t id;
	int rc = 0;

	RB_FOREACH(n, sp_stree, &d->stable) {
		uint32_t k = 0;

		if (n->kind != SP_MERGE_FRAME || n->is_dup || n->dom != d)
			FAIL("stable tree of domain %u: bad head (kind %u)",
			     d->id, n->kind);
		if (prev != NULL && scmp(prev, n) >= 0)
			FAIL("stable tree of domain %u out of order at frame %llu",
			     d->id, (unsigned long long)n->target);
		if ((rc = check_node(e, n, flags, t, err)) != 0)
			goto out;
		LIST_FOREACH(m, &n->dups, u.dup.link) {
			k++;
			if (!m->is_dup || m->u.dup.head != n || m->kind != SP_MERGE_FRAME ||
			    m->dom != d || m->hash != n->hash || m->ndups != 0)
				FAIL("chain of frame %llu: bad dup %llu",
				     (unsigned long long)n->target,
				     (unsigned long long)m->target);
			if (scmp(m, n) != 0)
				FAIL("chain of frame %llu: dup %llu holds other content",
				     (unsigned long long)n->target,
				     (unsigned long long)m->target);
			if ((rc = check_node(e, m, flags, t, err)) != 0)
				goto out;
		}
		if (k != n->ndups)
			FAIL("frame %llu: ndups %u but chain holds %u",
			     (unsigned long long)n->target, n->ndups, k);
		if (k > 0) {
			t->chains++;
			t->dups += k + 1;
		}
		prev = n;
	}
	if (d->zero != NULL) {
		if (d->zero->kind != SP_MERGE_ZERO || d->zero->dom != d)
			FAIL("domain %u: bad zero node", d->id);
		if ((rc = check_node(e, d->zero, flags, t, err)) != 0)
			goto out;
	}
	if (d->unstable != NO_ITEM &&
	    (UL(e, d->unstable).parent != NO_ITEM ||
	     u_check(e, d->unstable) < 0))
		FAIL("unstable tree of domain %u: links or colours broken "
		     "(a red node with a red child, unequal black heights)",
		     d->id);
	for (id = u_min(e, d->unstable); id != NO_ITEM; id = u_next(e, id)) {
		struct sp_merge_region *r;
		const void *p;

		it = item_at(e, id);
		r = it->region < e->rtab_len ? e->rtab[it->region] : NULL;

		if (r == NULL || r->dom != d || it->state != ST_UNSTABLE)
			FAIL("unstable tree of domain %u: item of region %u page %u does not belong (state %u)",
			     d->id, it->region, it->page, it->state);
		if (uprev != NULL && ucmp(uprev, it) >= 0)
			FAIL("unstable tree of domain %u out of order", d->id);
		if (flags & SP_MERGE_CHECK_CONTENT) {
			if (read_item(e, it, B_INS_B, &p) != 0)
				FAIL("region %u page %u: unreadable", it->region,
				     it->page);
			if ((uint32_t)page_hash(p) != it->csum)
				FAIL("region %u page %u: unstable key is stale",
				     it->region, it->page);
		}
		t->unshared++;
		uprev = it;
	}
out:
	return rc;
}

int sp_merge_check(struct sp_merge *e, unsigned flags, struct sp_error *err)
{
	struct tally t;
	struct sp_domain *d;
	struct sp_merge_template *tm;
	struct sp_stable *n, *prev;
	struct sp_item *it;
	uint64_t items = 0, bystate[8] = { 0 }, nsettle = 0, nretry = 0;
	uint32_t i, ndom = 0;
	int rc = 0;

	memset(&t, 0, sizeof(t));
	tree_lock(e);
	if (e->npend != 0 || e->fl_npend != 0)
		FAIL("%zu merge requests pending, %zu in flight between steps",
		     e->npend, e->fl_npend);
	for (i = 0; i < e->rtab_len; i++) {
		struct sp_merge_region *r = e->rtab[i];
		uint64_t cnt = 0;
		uint32_t k;

		if (r == NULL)
			continue;
		if (r->id != i)
			FAIL("region table slot %u holds region %u", i, r->id);
		if (r->dom != dom_lookup(e, r->domain))
			FAIL("region %u bound to the wrong domain", i);
		if (r->islot != NULL && (r->nitems * 4 > 3ull << r->ibits))
			FAIL("region %u: page index over 3/4 full", i);
		for (k = 0; r->islot != NULL && k < 1u << r->ibits; k++) {
			if (r->islot[k] == NO_ITEM)
				continue;
			if (r->islot[k] >= e->nchunks * ITEMS_PER_CHUNK ||
			    r->islot[k] % ITEMS_PER_CHUNK == 0)
				FAIL("region %u: page index names item %u", i,
				     r->islot[k]);
			it = item_at(e, r->islot[k]);
			if (pidx_slot(e, r, it->page) != k)
				FAIL("region %u page %u: not found in its index "
				     "slot (lost or twice)", i, it->page);
			if (it->region != i || it->page >= r->npages)
				FAIL("region %u: item names region %u page %u", i,
				     it->region, it->page);
			if (it->state < ST_UNSTABLE || it->state > ST_RETRY)
				FAIL("region %u page %u: state %u between steps",
				     i, it->page, it->state);
			bystate[it->state]++;
			cnt++;
		}
		if (cnt != r->nitems)
			FAIL("region %u: %llu items indexed, nitems %llu", i,
			     (unsigned long long)cnt,
			     (unsigned long long)r->nitems);
		items += cnt;
	}
	if ((rc = check_domain(e, &e->common, flags, &t, err)) != 0)
		goto out;
	RB_FOREACH(d, sp_dtree, &e->domains) {
		ndom++;
		if (knob(e, K_ACROSS) && d->nregions > 0)
			FAIL("domain %u has regions while merging across domains",
			     d->id);
		if ((rc = check_domain(e, d, flags, &t, err)) != 0)
			goto out;
	}
	LIST_FOREACH(tm, &e->templates, link) {
		prev = NULL;
		RB_FOREACH(n, sp_ttree, &tm->nodes) {
			if (n->kind != SP_MERGE_TEMPLATE || n->tmpl != tm ||
			    n->target >= tm->npages)
				FAIL("template node tree: bad node");
			if (prev != NULL && prev->target >= n->target)
				FAIL("template node tree out of order");
			if ((rc = check_node(e, n, flags, &t, err)) != 0)
				goto out;
			prev = n;
		}
	}
	TAILQ_FOREACH(it, &e->settle, u.later) {
		if (it->state != ST_SETTLE)
			FAIL("settle list: item in state %u", it->state);
		nsettle++;
	}
	TAILQ_FOREACH(it, &e->retry, u.later) {
		if (it->state != ST_RETRY)
			FAIL("retry list: item in state %u", it->state);
		nretry++;
	}
	if (nsettle != e->nsettle || nsettle != bystate[ST_SETTLE])
		FAIL("settle list holds %llu, counted %llu, items say %llu",
		     (unsigned long long)nsettle,
		     (unsigned long long)e->nsettle,
		     (unsigned long long)bystate[ST_SETTLE]);
	if (nretry != e->nretry || nretry != bystate[ST_RETRY])
		FAIL("retry list holds %llu, counted %llu, items say %llu",
		     (unsigned long long)nretry, (unsigned long long)e->nretry,
		     (unsigned long long)bystate[ST_RETRY]);
	if ((uint64_t)t.merged != bystate[ST_MERGED])
		FAIL("rmaps hold %lld pages, items say %llu merged",
		     (long long)t.merged,
		     (unsigned long long)bystate[ST_MERGED]);
	if ((uint64_t)t.unshared != bystate[ST_UNSTABLE])
		FAIL("unstable trees hold %lld pages, items say %llu",
		     (long long)t.unshared,
		     (unsigned long long)bystate[ST_UNSTABLE]);
#define CK(s, v) \
	if (stat_get(e, s) != (int64_t)(v)) \
		FAIL("statistic %s is %lld, structures say %lld", #s, \
		     (long long)stat_get(e, s), (long long)(v))
	CK(S_PAGES_SHARED, t.shared);
	CK(S_PAGES_SHARING, t.sharing);
	CK(S_PAGES_UNSHARED, t.unshared);
	CK(S_ZERO_PAGES, t.zero);
	CK(S_PAGES_TEMPLATE, t.tmpl);
	CK(S_PAGES_MERGED, t.merged);
	CK(S_FRAMES, t.frames);
	CK(S_CHAINS, t.chains);
	CK(S_DUPS, t.dups);
	CK(S_RMAP_ITEMS, items);
#undef CK
out:
	tree_unlock(e);
	return rc;
}
