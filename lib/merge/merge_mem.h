/* SPDX-License-Identifier: MIT */
/*
 * An in-memory merge backend: N clones' guest RAM modelled as plain arrays
 * with MAP_PRIVATE semantics, for the merge engine's tests and for
 * benchmarking the core without a kernel in the loop. Each clone page reads
 * either its private copy, a frame of the shared frame store, a template
 * page or the zero page; a guest write to a shared page copies it first
 * (CoW) and marks the page changed, which is what the Linux backend sees
 * through soft-dirty bits. Merges verify content like the real thing and
 * can be told to fail at random (-EAGAIN, -ENOMEM) or to race with a guest
 * write. The backend also polices the core: freeing a frame that a page
 * still reads, or naming a freed frame, is recorded as a violation.
 *
 * Thread-safe (one recursive lock). With copy_reads off (the default), read
 * ops return pointers into the model's memory: fast, but only for a single
 * thread; turn copy_reads on when guest writes race with a scanner thread.
 */
#ifndef SAMEPAGE_MERGE_MEM_H
#define SAMEPAGE_MERGE_MEM_H

#include <stddef.h>
#include <stdint.h>

#include "samepage/merge.h"

struct sp_merge_mem;        /* the world: frame store and clones */
struct sp_merge_mem_tmpl;   /* a template (golden memory) */
struct sp_merge_mem_vm;     /* one clone's guest RAM */

struct sp_merge_mem_stats {
	uint64_t changed_calls;   /* ops.changed */
	uint64_t reads;           /* ops.read_page */
	uint64_t digests;         /* pages hashed by ops.digest */
	uint64_t merge_calls;     /* ops.merge */
	uint64_t merge_reqs;      /* requests in them */
	uint64_t merged;          /* requests applied */
	uint64_t mappings;        /* mappings made: runs of adjacent pages
				     onto adjacent targets count once */
	uint64_t frames_live;     /* allocated and not freed */
	uint64_t frame_slots;     /* live + freed but still named */
	uint64_t violations;      /* contract violations by the core */
	char violation[256];      /* the first one */
};

/* max_frames: size of the frame store (frame_alloc fails with -ENOSPC
 * beyond it). ops/ctx for sp_merge_create: sp_merge_mem_ops() and mm. */
int sp_merge_mem_create(uint64_t max_frames, struct sp_merge_mem **out);
void sp_merge_mem_destroy(struct sp_merge_mem *mm);
const struct sp_merge_ops *sp_merge_mem_ops(void);
/* The same with ops.digest: the clones hash their own pages. */
const struct sp_merge_ops *sp_merge_mem_ops_digest(void);

void sp_merge_mem_set_copy_reads(struct sp_merge_mem *mm, int on);
/* Failure injection, per mille of merge requests / frame allocations;
 * deterministic for a seed. */
void sp_merge_mem_set_faults(struct sp_merge_mem *mm, uint64_t seed,
			     unsigned eagain_pm, unsigned enomem_pm,
			     unsigned alloc_fail_pm);
/* Called for each merge request before the backend verifies it (the
 * guest racing the merge); the hook may call sp_merge_mem_write(). */
void sp_merge_mem_set_merge_hook(struct sp_merge_mem *mm,
				 void (*hook)(void *arg,
					      struct sp_merge_mem_vm *vm,
					      uint64_t page),
				 void *arg);

/* A template of npages pages copied from pages; its XXH3-64 hash index. */
int sp_merge_mem_tmpl_create(struct sp_merge_mem *mm, const void *pages,
			     uint64_t npages, struct sp_merge_mem_tmpl **out);
const uint64_t *sp_merge_mem_tmpl_hashes(const struct sp_merge_mem_tmpl *t);
uint64_t sp_merge_mem_tmpl_pages(const struct sp_merge_mem_tmpl *t);

/* A clone of npages pages; page i reads template page i (zero past the
 * template's end, or everywhere when t is NULL). */
int sp_merge_mem_vm_create(struct sp_merge_mem *mm, struct sp_merge_mem_tmpl *t,
			   uint64_t npages, struct sp_merge_mem_vm **out);
/* The clone's process exits: its memory and mappings are gone. Ops on it
 * fail with -ESRCH afterwards. */
void sp_merge_mem_vm_kill(struct sp_merge_mem_vm *vm);

/* Guest access. A write to a shared page copies it first. */
int sp_merge_mem_write(struct sp_merge_mem_vm *vm, uint64_t page, size_t off,
		       const void *src, size_t len);
int sp_merge_mem_read(struct sp_merge_mem_vm *vm, uint64_t page, void *dst);

/* What page `page` reads from: 0 (its private copy) or an sp_merge_kind,
 * with *target the frame or template page. */
int sp_merge_mem_page_map(struct sp_merge_mem_vm *vm, uint64_t page,
			  uint64_t *target);
/* Domain a frame was allocated for. */
uint32_t sp_merge_mem_frame_domain(struct sp_merge_mem *mm, uint64_t frame);

void sp_merge_mem_stats(struct sp_merge_mem *mm, struct sp_merge_mem_stats *st);

#endif
