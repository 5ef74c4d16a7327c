/* SPDX-License-Identifier: MIT */
/*
 * In-memory merge backend (see merge_mem.h): plain arrays standing in for
 * clones' MAP_PRIVATE guest RAM, a frame store and a template, with the
 * semantics the Linux backend gets from the kernel, and checks that the
 * core keeps its side of the ops contract.
 */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lib/util/xxh.h"

#include "lib/merge/merge_mem.h"

#define PAGE SP_MERGE_PAGE_BYTES
#define NO_FRAME UINT64_MAX

enum { PG_PRIVATE = 0 };   /* else an sp_merge_kind */
enum { FR_FREE, FR_LIVE, FR_ZOMBIE };  /* zombie: freed, still named */

struct frame {
	unsigned char *data;   /* NULL unless live and written */
	uint32_t domain;
	uint32_t maps;         /* pages reading it */
	uint32_t names;        /* pages whose mapping names it */
	uint8_t state;
};

struct vpage {
	unsigned char *priv;   /* PG_PRIVATE */
	uint64_t target;
	uint64_t named;        /* frame the mapping names, or NO_FRAME */
	uint8_t kind;
	uint8_t dirty;
};

struct sp_merge_mem_tmpl {
	struct sp_merge_mem_tmpl *next;
	unsigned char *pages;
	uint64_t *hashes;
	uint64_t npages;
};

struct sp_merge_mem_vm {
	struct sp_merge_mem_vm *next;
	struct sp_merge_mem *mm;
	struct sp_merge_mem_tmpl *tmpl;
	struct vpage *pages;
	uint64_t npages;
	bool dead;
};

struct sp_merge_mem {
	pthread_mutex_t lock;   /* recursive: the merge hook writes */
	struct frame *frames;
	uint64_t nframes, max_frames, rover;
	struct sp_merge_mem_tmpl *tmpls;
	struct sp_merge_mem_vm *vms;
	bool copy_reads;
	uint64_t rng;
	unsigned eagain_pm, enomem_pm, alloc_fail_pm;
	void (*hook)(void *, struct sp_merge_mem_vm *, uint64_t);
	void *hook_arg;
	struct sp_merge_mem_stats st;
};

static const unsigned char zero[PAGE];

static void violation(struct sp_merge_mem *mm, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

static void violation(struct sp_merge_mem *mm, const char *fmt, ...)
{
	va_list ap;

	if (mm->st.violations++ == 0) {
		va_start(ap, fmt);
		vsnprintf(mm->st.violation, sizeof(mm->st.violation), fmt, ap);
		va_end(ap);
	}
}

static unsigned roll(struct sp_merge_mem *mm)
{
	uint64_t x = mm->rng;

	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	mm->rng = x;
	return (unsigned)((x >> 11) % 1000);
}

static const unsigned char *page_src(struct sp_merge_mem_vm *vm, uint64_t p)
{
	struct vpage *vp = &vm->pages[p];

	switch (vp->kind) {
	case PG_PRIVATE:
		return vp->priv;
	case SP_MERGE_TEMPLATE:
		return vm->tmpl->pages + vp->target * PAGE;
	case SP_MERGE_ZERO:
		return zero;
	default:
		return vm->mm->frames[vp->target].data;
	}
}

static void unname(struct sp_merge_mem *mm, uint64_t f)
{
	struct frame *fr;

	if (f == NO_FRAME)
		return;
	fr = &mm->frames[f];
	if (--fr->names == 0 && fr->state == FR_ZOMBIE) {
		fr->state = FR_FREE;
		mm->st.frame_slots--;
	}
}

/* Drop what page p reads from (not what its mapping names). */
static void unmap(struct sp_merge_mem_vm *vm, uint64_t p)
{
	struct vpage *vp = &vm->pages[p];

	if (vp->kind == PG_PRIVATE)
		free(vp->priv);
	else if (vp->kind == SP_MERGE_FRAME)
		vm->mm->frames[vp->target].maps--;
	vp->priv = NULL;
}

/* --- ops -------------------------------------------------------------- */

static int op_changed(void *ctx, void *region, uint64_t *pages, size_t cap)
{
	struct sp_merge_mem *mm = ctx;
	struct sp_merge_mem_vm *vm = region;
	size_t n = 0;
	uint64_t p;

	pthread_mutex_lock(&mm->lock);
	mm->st.changed_calls++;
	if (vm->dead) {
		pthread_mutex_unlock(&mm->lock);
		return -ESRCH;
	}
	for (p = 0; p < vm->npages && n < cap; p++) {
		if (vm->pages[p].dirty) {
			vm->pages[p].dirty = 0;
			pages[n++] = p;
		}
	}
	pthread_mutex_unlock(&mm->lock);
	return (int)n;
}

static int give(struct sp_merge_mem *mm, const void *src, void *buf,
		const void **out)
{
	if (mm->copy_reads) {
		memcpy(buf, src, PAGE);
		*out = buf;
	} else {
		*out = src;
	}
	return 0;
}

static int op_read_page(void *ctx, void *region, uint64_t page, void *buf,
			const void **out)
{
	struct sp_merge_mem *mm = ctx;
	struct sp_merge_mem_vm *vm = region;
	int rc = -ESRCH;

	pthread_mutex_lock(&mm->lock);
	mm->st.reads++;
	if (!vm->dead && page < vm->npages)
		rc = give(mm, page_src(vm, page), buf, out);
	pthread_mutex_unlock(&mm->lock);
	return rc;
}

/* The clone hashing its own pages: digests of the current content. */
static int op_digest(void *ctx, void *region, const uint64_t *pages, size_t n,
		     uint64_t *out)
{
	struct sp_merge_mem *mm = ctx;
	struct sp_merge_mem_vm *vm = region;
	int rc = 0;

	pthread_mutex_lock(&mm->lock);
	if (vm->dead) {
		rc = -ESRCH;
	} else if (n > SP_MERGE_DIGEST_MAX) {
		violation(mm, "digest: %zu pages at once", n);
		rc = -EINVAL;
	}
	for (size_t i = 0; rc == 0 && i < n; i++) {
		if (pages[i] >= vm->npages) {
			violation(mm, "digest: page %llu past the end",
				  (unsigned long long)pages[i]);
			rc = -EINVAL;
			break;
		}
		out[i] = XXH3_64bits(page_src(vm, pages[i]), PAGE);
		mm->st.digests++;
	}
	pthread_mutex_unlock(&mm->lock);
	return rc;
}

static int op_read_template(void *ctx, void *tmpl, uint64_t page, void *buf,
			    const void **out)
{
	struct sp_merge_mem *mm = ctx;
	struct sp_merge_mem_tmpl *t = tmpl;
	int rc = -EINVAL;

	pthread_mutex_lock(&mm->lock);
	if (page < t->npages)
		rc = give(mm, t->pages + page * PAGE, buf, out);
	else
		violation(mm, "read_template: page %llu past the end",
			  (unsigned long long)page);
	pthread_mutex_unlock(&mm->lock);
	return rc;
}

static int op_read_frame(void *ctx, uint64_t frame, void *buf,
			 const void **out)
{
	struct sp_merge_mem *mm = ctx;
	int rc = -EINVAL;

	pthread_mutex_lock(&mm->lock);
	if (frame < mm->nframes && mm->frames[frame].state == FR_LIVE &&
	    mm->frames[frame].data != NULL)
		rc = give(mm, mm->frames[frame].data, buf, out);
	else
		violation(mm, "read_frame: frame %llu is not live",
			  (unsigned long long)frame);
	pthread_mutex_unlock(&mm->lock);
	return rc;
}

static int op_frame_alloc(void *ctx, uint32_t domain, uint64_t hint,
			  uint64_t *frame)
{
	struct sp_merge_mem *mm = ctx;
	uint64_t f, i;
	int rc = 0;

	pthread_mutex_lock(&mm->lock);
	if (mm->alloc_fail_pm && roll(mm) < mm->alloc_fail_pm) {
		rc = -ENOSPC;
		goto out;
	}
	if (hint != SP_MERGE_NO_HINT && hint < mm->max_frames &&
	    (hint >= mm->nframes || mm->frames[hint].state == FR_FREE)) {
		f = hint;
	} else {
		for (i = 0; i < mm->max_frames; i++) {
			f = (mm->rover + i) % mm->max_frames;
			if (f >= mm->nframes || mm->frames[f].state == FR_FREE)
				break;
		}
		if (i == mm->max_frames) {
			rc = -ENOSPC;
			goto out;
		}
	}
	if (f >= mm->nframes) {
		uint64_t n = f + 1 > mm->nframes * 2 ? f + 1 : mm->nframes * 2;
		struct frame *nf;

		if (n > mm->max_frames)
			n = mm->max_frames;
		nf = realloc(mm->frames, n * sizeof(*nf));
		if (nf == NULL) {
			rc = -ENOMEM;
			goto out;
		}
		memset(nf + mm->nframes, 0, (n - mm->nframes) * sizeof(*nf));
		mm->frames = nf;
		mm->nframes = n;
	}
	mm->frames[f].state = FR_LIVE;
	mm->frames[f].domain = domain;
	mm->rover = f + 1;
	mm->st.frames_live++;
	mm->st.frame_slots++;
	*frame = f;
out:
	pthread_mutex_unlock(&mm->lock);
	return rc;
}

static int op_frame_write(void *ctx, uint64_t frame, const void *src)
{
	struct sp_merge_mem *mm = ctx;
	struct frame *fr;
	int rc = 0;

	pthread_mutex_lock(&mm->lock);
	fr = frame < mm->nframes ? &mm->frames[frame] : NULL;
	if (fr == NULL || fr->state != FR_LIVE || fr->maps || fr->data) {
		violation(mm, "frame_write: frame %llu is not freshly allocated",
			  (unsigned long long)frame);
		rc = -EINVAL;
	} else if ((fr->data = malloc(PAGE)) == NULL) {
		rc = -ENOMEM;
	} else {
		memcpy(fr->data, src, PAGE);
	}
	pthread_mutex_unlock(&mm->lock);
	return rc;
}

static void op_frame_free(void *ctx, uint64_t frame)
{
	struct sp_merge_mem *mm = ctx;
	struct frame *fr;

	pthread_mutex_lock(&mm->lock);
	fr = frame < mm->nframes ? &mm->frames[frame] : NULL;
	if (fr == NULL || fr->state != FR_LIVE) {
		violation(mm, "frame_free: frame %llu is not live",
			  (unsigned long long)frame);
	} else {
		if (fr->maps > 0)
			violation(mm, "frame_free: frame %llu is still read by %u pages",
				  (unsigned long long)frame, fr->maps);
		free(fr->data);   /* the hole punch */
		fr->data = NULL;
		mm->st.frames_live--;
		if (fr->names > 0) {
			fr->state = FR_ZOMBIE;
		} else {
			fr->state = FR_FREE;
			mm->st.frame_slots--;
		}
	}
	pthread_mutex_unlock(&mm->lock);
}

static int op_merge(void *ctx, void *region, struct sp_merge_req *reqs,
		    size_t n)
{
	struct sp_merge_mem *mm = ctx;
	struct sp_merge_mem_vm *vm = region;
	const struct sp_merge_req *prev = NULL;
	size_t i;

	pthread_mutex_lock(&mm->lock);
	mm->st.merge_calls++;
	if (vm->dead) {
		pthread_mutex_unlock(&mm->lock);
		return -ESRCH;
	}
	for (i = 0; i < n; i++) {
		struct sp_merge_req *q = &reqs[i];
		const unsigned char *want = NULL;
		struct vpage *vp;
		unsigned r;

		mm->st.merge_reqs++;
		if (i > 0 && q->page <= reqs[i - 1].page)
			violation(mm, "merge: batch not sorted by page at %llu",
				  (unsigned long long)q->page);
		if (q->page >= vm->npages) {
			violation(mm, "merge: page %llu past the end",
				  (unsigned long long)q->page);
			q->result = -EINVAL;
			continue;
		}
		switch (q->kind) {
		case SP_MERGE_TEMPLATE:
			if (vm->tmpl != NULL && q->target < vm->tmpl->npages)
				want = vm->tmpl->pages + q->target * PAGE;
			break;
		case SP_MERGE_ZERO:
			want = zero;
			break;
		case SP_MERGE_FRAME:
			if (q->target < mm->nframes &&
			    mm->frames[q->target].state == FR_LIVE)
				want = mm->frames[q->target].data;
			break;
		}
		if (want == NULL) {
			violation(mm, "merge: bad target kind %u %llu for page %llu",
				  q->kind, (unsigned long long)q->target,
				  (unsigned long long)q->page);
			q->result = -EINVAL;
			continue;
		}
		if (mm->hook != NULL)
			mm->hook(mm->hook_arg, vm, q->page);
		r = (mm->eagain_pm || mm->enomem_pm) ? roll(mm) : 1000;
		if (r < mm->eagain_pm) {
			q->result = -EAGAIN;
			continue;
		}
		if (r < mm->eagain_pm + mm->enomem_pm) {
			q->result = -ENOMEM;
			continue;
		}
		if (memcmp(page_src(vm, q->page), want, PAGE) != 0) {
			q->result = -EAGAIN;
			continue;
		}
		vp = &vm->pages[q->page];
		unmap(vm, q->page);
		unname(mm, vp->named);
		vp->named = NO_FRAME;
		vp->kind = (uint8_t)q->kind;
		vp->target = q->target;
		if (q->kind == SP_MERGE_FRAME) {
			mm->frames[q->target].maps++;
			mm->frames[q->target].names++;
			vp->named = q->target;
		}
		q->result = 0;
		mm->st.merged++;
		if (!(prev != NULL && prev->result == 0 &&
		      prev->page + 1 == q->page && prev->kind == q->kind &&
		      (q->kind == SP_MERGE_ZERO ||
		       prev->target + 1 == q->target)))
			mm->st.mappings++;
		prev = q;
	}
	pthread_mutex_unlock(&mm->lock);
	return 0;
}

static const struct sp_merge_ops mem_ops = {
	.changed = op_changed,
	.read_page = op_read_page,
	.read_template = op_read_template,
	.read_frame = op_read_frame,
	.frame_alloc = op_frame_alloc,
	.frame_write = op_frame_write,
	.frame_free = op_frame_free,
	.merge = op_merge,
};

static const struct sp_merge_ops mem_ops_digest = {
	.changed = op_changed,
	.read_page = op_read_page,
	.digest = op_digest,
	.read_template = op_read_template,
	.read_frame = op_read_frame,
	.frame_alloc = op_frame_alloc,
	.frame_write = op_frame_write,
	.frame_free = op_frame_free,
	.merge = op_merge,
};

const struct sp_merge_ops *sp_merge_mem_ops(void)
{
	return &mem_ops;
}

const struct sp_merge_ops *sp_merge_mem_ops_digest(void)
{
	return &mem_ops_digest;
}

/* --- the world -------------------------------------------------------- */

int sp_merge_mem_create(uint64_t max_frames, struct sp_merge_mem **out)
{
	struct sp_merge_mem *mm = calloc(1, sizeof(*mm));
	pthread_mutexattr_t a;

	*out = NULL;
	if (mm == NULL)
		return -ENOMEM;
	pthread_mutexattr_init(&a);
	pthread_mutexattr_settype(&a, PTHREAD_MUTEX_RECURSIVE);
	pthread_mutex_init(&mm->lock, &a);
	pthread_mutexattr_destroy(&a);
	mm->max_frames = max_frames;
	mm->rng = 0x9e3779b97f4a7c15ull;
	*out = mm;
	return 0;
}

static void vm_release(struct sp_merge_mem_vm *vm)
{
	uint64_t p;

	for (p = 0; p < vm->npages; p++) {
		unmap(vm, p);
		unname(vm->mm, vm->pages[p].named);
		vm->pages[p].named = NO_FRAME;
		vm->pages[p].kind = SP_MERGE_ZERO;
	}
}

void sp_merge_mem_destroy(struct sp_merge_mem *mm)
{
	struct sp_merge_mem_vm *vm;
	struct sp_merge_mem_tmpl *t;
	uint64_t f;

	if (mm == NULL)
		return;
	while ((vm = mm->vms) != NULL) {
		mm->vms = vm->next;
		if (!vm->dead)
			vm_release(vm);
		free(vm->pages);
		free(vm);
	}
	while ((t = mm->tmpls) != NULL) {
		mm->tmpls = t->next;
		free(t->pages);
		free(t->hashes);
		free(t);
	}
	for (f = 0; f < mm->nframes; f++)
		free(mm->frames[f].data);
	free(mm->frames);
	pthread_mutex_destroy(&mm->lock);
	free(mm);
}

void sp_merge_mem_set_copy_reads(struct sp_merge_mem *mm, int on)
{
	pthread_mutex_lock(&mm->lock);
	mm->copy_reads = on != 0;
	pthread_mutex_unlock(&mm->lock);
}

void sp_merge_mem_set_faults(struct sp_merge_mem *mm, uint64_t seed,
			     unsigned eagain_pm, unsigned enomem_pm,
			     unsigned alloc_fail_pm)
{
	pthread_mutex_lock(&mm->lock);
	mm->rng = seed * 0x9e3779b97f4a7c15ull + 1;
	mm->eagain_pm = eagain_pm;
	mm->enomem_pm = enomem_pm;
	mm->alloc_fail_pm = alloc_fail_pm;
	pthread_mutex_unlock(&mm->lock);
}

void sp_merge_mem_set_merge_hook(struct sp_merge_mem *mm,
				 void (*hook)(void *, struct sp_merge_mem_vm *,
					      uint64_t),
				 void *arg)
{
	pthread_mutex_lock(&mm->lock);
	mm->hook = hook;
	mm->hook_arg = arg;
	pthread_mutex_unlock(&mm->lock);
}

int sp_merge_mem_tmpl_create(struct sp_merge_mem *mm, const void *pages,
			     uint64_t npages, struct sp_merge_mem_tmpl **out)
{
	struct sp_merge_mem_tmpl *t = calloc(1, sizeof(*t));
	uint64_t p;

	*out = NULL;
	if (t == NULL)
		return -ENOMEM;
	t->pages = malloc(npages * PAGE);
	t->hashes = malloc(npages * sizeof(*t->hashes));
	if (t->pages == NULL || t->hashes == NULL) {
		free(t->pages);
		free(t->hashes);
		free(t);
		return -ENOMEM;
	}
	memcpy(t->pages, pages, npages * PAGE);
	for (p = 0; p < npages; p++)
		t->hashes[p] = XXH3_64bits(t->pages + p * PAGE, PAGE);
	t->npages = npages;
	pthread_mutex_lock(&mm->lock);
	t->next = mm->tmpls;
	mm->tmpls = t;
	pthread_mutex_unlock(&mm->lock);
	*out = t;
	return 0;
}

const uint64_t *sp_merge_mem_tmpl_hashes(const struct sp_merge_mem_tmpl *t)
{
	return t->hashes;
}

uint64_t sp_merge_mem_tmpl_pages(const struct sp_merge_mem_tmpl *t)
{
	return t->npages;
}

int sp_merge_mem_vm_create(struct sp_merge_mem *mm, struct sp_merge_mem_tmpl *t,
			   uint64_t npages, struct sp_merge_mem_vm **out)
{
	struct sp_merge_mem_vm *vm = calloc(1, sizeof(*vm));
	uint64_t p;

	*out = NULL;
	if (vm == NULL)
		return -ENOMEM;
	vm->pages = calloc(npages, sizeof(*vm->pages));
	if (vm->pages == NULL) {
		free(vm);
		return -ENOMEM;
	}
	vm->mm = mm;
	vm->tmpl = t;
	vm->npages = npages;
	for (p = 0; p < npages; p++) {
		vm->pages[p].named = NO_FRAME;
		if (t != NULL && p < t->npages) {
			vm->pages[p].kind = SP_MERGE_TEMPLATE;
			vm->pages[p].target = p;
		} else {
			vm->pages[p].kind = SP_MERGE_ZERO;
		}
	}
	pthread_mutex_lock(&mm->lock);
	vm->next = mm->vms;
	mm->vms = vm;
	pthread_mutex_unlock(&mm->lock);
	*out = vm;
	return 0;
}

void sp_merge_mem_vm_kill(struct sp_merge_mem_vm *vm)
{
	struct sp_merge_mem *mm = vm->mm;

	pthread_mutex_lock(&mm->lock);
	if (!vm->dead) {
		vm_release(vm);
		vm->dead = true;
	}
	pthread_mutex_unlock(&mm->lock);
}

int sp_merge_mem_write(struct sp_merge_mem_vm *vm, uint64_t page, size_t off,
		       const void *src, size_t len)
{
	struct sp_merge_mem *mm = vm->mm;
	struct vpage *vp;
	int rc = 0;

	if (page >= vm->npages || off > PAGE || len > PAGE - off)
		return -EINVAL;
	pthread_mutex_lock(&mm->lock);
	if (vm->dead) {
		rc = -ESRCH;
		goto out;
	}
	vp = &vm->pages[page];
	if (vp->kind != PG_PRIVATE) {
		unsigned char *copy = malloc(PAGE);

		if (copy == NULL) {
			rc = -ENOMEM;
			goto out;
		}
		memcpy(copy, page_src(vm, page), PAGE);   /* CoW */
		unmap(vm, page);
		vp->kind = PG_PRIVATE;
		vp->priv = copy;
	}
	memcpy(vp->priv + off, src, len);
	vp->dirty = 1;
out:
	pthread_mutex_unlock(&mm->lock);
	return rc;
}

int sp_merge_mem_read(struct sp_merge_mem_vm *vm, uint64_t page, void *dst)
{
	struct sp_merge_mem *mm = vm->mm;
	int rc = 0;

	if (page >= vm->npages)
		return -EINVAL;
	pthread_mutex_lock(&mm->lock);
	if (vm->dead)
		rc = -ESRCH;
	else
		memcpy(dst, page_src(vm, page), PAGE);
	pthread_mutex_unlock(&mm->lock);
	return rc;
}

int sp_merge_mem_page_map(struct sp_merge_mem_vm *vm, uint64_t page,
			  uint64_t *target)
{
	struct sp_merge_mem *mm = vm->mm;
	int kind;

	pthread_mutex_lock(&mm->lock);
	kind = vm->pages[page].kind;
	*target = vm->pages[page].target;
	pthread_mutex_unlock(&mm->lock);
	return kind;
}

uint32_t sp_merge_mem_frame_domain(struct sp_merge_mem *mm, uint64_t frame)
{
	uint32_t d;

	pthread_mutex_lock(&mm->lock);
	d = frame < mm->nframes ? mm->frames[frame].domain : UINT32_MAX;
	pthread_mutex_unlock(&mm->lock);
	return d;
}

void sp_merge_mem_stats(struct sp_merge_mem *mm, struct sp_merge_mem_stats *st)
{
	pthread_mutex_lock(&mm->lock);
	*st = mm->st;
	pthread_mutex_unlock(&mm->lock);
}
