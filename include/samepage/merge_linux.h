/* SPDX-License-Identifier: MIT */
/*
 * The Linux backend of the merge engine (samepage/merge.h), in two halves
 * that live in different processes:
 *
 *  - the owner side (lib/merge/merge_linux.c) is the struct sp_merge_ops the
 *    engine calls: it finds the pages each clone changed (PAGEMAP_SCAN on
 *    /proc/PID/pagemap, gated by the clone's page-fault counter), has the
 *    clone hash them (the digest transport) and reads through
 *    /proc/PID/mem only those it copies into frames, reads templates
 *    through read-only shared mappings, and keeps the frame files, one
 *    memfd per merge domain (a clone is given only its own domain's,
 *    read-only). It never touches a clone's mappings: merge() hands each
 *    batch to a transport callback the embedder provides (a socket to the
 *    clone);
 *
 *  - the clone side (lib/merge/apply_linux.c) runs inside the clone, between
 *    two KVM_RUN calls (no vCPU running), and applies a batch to its own
 *    guest RAM: verify each page against its target, then MADV_DONTNEED
 *    (back to the template at its own offset) or mmap MAP_FIXED|MAP_PRIVATE,
 *    PROT_READ|PROT_WRITE of the template, frame file or anonymous zero
 *    memory, one call per run of adjacent pages.
 *
 * Frame numbers are handed out monotonically and never reused, so no frame
 * number is ever handed out while a mapping still names it; a freed frame's
 * memory goes back to the host (hole punched) while its number stays retired.
 * See docs/merge-linux.md for the measurements behind these choices.
 */
#ifndef SAMEPAGE_MERGE_LINUX_H
#define SAMEPAGE_MERGE_LINUX_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "samepage/error.h"
#include "samepage/merge.h"

/* Default size of each (sparse) frame file: 16 Mi frames. */
#define SP_MERGE_LINUX_FRAME_FILE_BYTES (64ull << 30)

/* ---- owner side ---------------------------------------------------- */

struct sp_merge_linux;         /* the backend: frame file, counters (opaque) */
struct sp_merge_linux_tmpl;    /* a template mapped read-only (opaque) */
struct sp_merge_linux_region;  /* one clone as the owner sees it (opaque) */

/* Flags of struct sp_merge_linux_opts. */
#define SP_MERGE_LINUX_PAGEMAP_READ 1u  /* detect by reading pagemap entries,
					   not with the PAGEMAP_SCAN ioctl */
#define SP_MERGE_LINUX_NO_FAULT_GATE 2u /* scan on every changed() call, even
					   when the clone counted no fault */

struct sp_merge_linux_opts {
	uint64_t frame_file_bytes; /* of each domain's frame file; 0:
				      SP_MERGE_LINUX_FRAME_FILE_BYTES */
	uint32_t rescan_ms;        /* scan a clone at least this often even if
				      its fault counter did not move (faults
				      charged elsewhere, e.g. KVM async page
				      faults); 0: only when it moved */
	uint32_t revisit_pages;    /* per region and revisit_ms: report again
				      this many private pages already reported
				      (catches a second write in place, which
				      no counter sees); 0: off */
	uint32_t revisit_ms;       /* 0: 1000 */
	unsigned flags;            /* SP_MERGE_LINUX_* */
};

/*
 * Ships one batch to the clone and waits for it to be applied there (with
 * sp_merge_clone_apply), copying every result back into reqs[i].result.
 * Returns 0, or a negative errno when no request was applied (the clone is
 * gone: any errno; the backend turns it into -ESRCH when the process has
 * exited). Called from the engine's thread with the engine's lock held.
 */
typedef int (*sp_merge_linux_apply_fn)(void *transport_ctx,
				       struct sp_merge_req *reqs, size_t n);

/*
 * The same in two halves, so that the engine can go on working while the
 * clone applies (sp_merge_ops.merge_submit/merge_wait). send ships a batch
 * without waiting for the answer; recv, called once after each send that
 * returned 0, with the same arguments, waits for the answer and copies the
 * results into reqs[i].result. At most one batch per transport is in
 * flight. send returns 0 or a negative errno when nothing was shipped;
 * recv returns as apply does. Both are called from the engine's thread
 * with the engine's lock held.
 */
typedef int (*sp_merge_linux_send_fn)(void *transport_ctx,
				      const struct sp_merge_req *reqs, size_t n);
typedef int (*sp_merge_linux_recv_fn)(void *transport_ctx,
				      struct sp_merge_req *reqs, size_t n);
/* Optional: ask the clone for the XXH3-64 digests of n (<= SP_MERGE_DIGEST_MAX) pages of
 * its RAM (sp_merge_clone_digest) and wait for them, so that the owner
 * reads only the pages it copies into frames. A batch sent with send may
 * still be unanswered: its answer arrives first and must be kept for recv.
 * Returns 0 or -errno (-ESRCH: the clone is gone). Called like send. */
typedef int (*sp_merge_linux_digest_fn)(void *transport_ctx, const uint64_t *pages,
					size_t n, uint64_t *out);
/* Optional, with send and recv: nonzero if every answer to the batch sent
 * has come (or the clone is gone), so that recv would return at once
 * (sp_merge_ops.merge_ready). Must not block. */
typedef int (*sp_merge_linux_ready_fn)(void *transport_ctx);

struct sp_merge_linux_region_desc {
	pid_t pid;                       /* the clone's process */
	uint64_t ram_addr;               /* guest RAM address in the clone */
	uint64_t npages;                 /* guest RAM size, 4 KiB pages */
	struct sp_merge_linux_tmpl *tmpl;/* what RAM is MAP_PRIVATE of; NULL: none */
	sp_merge_linux_apply_fn apply;   /* transport to the clone */
	sp_merge_linux_send_fn send;     /* optional, with recv: the same */
	sp_merge_linux_recv_fn recv;     /*   split, to overlap with the engine */
	sp_merge_linux_digest_fn digest; /* optional: the clone hashes pages */
	sp_merge_linux_ready_fn ready;   /* optional, with send: answered yet? */
	void *transport_ctx;             /* passed to apply, send, recv, digest, ready */
};

struct sp_merge_linux_stats {
	uint64_t frames_live;      /* allocated and not freed */
	uint64_t frames_retired;   /* freed: memory returned, number never reused */
	uint64_t frame_file_bytes; /* memory the frame files hold (st_blocks) */
	uint64_t frame_files;      /* frame files: one per domain with frames
				      or clones */
	uint64_t scans;            /* change scans of a clone's RAM */
	uint64_t scans_skipped;    /* changed() calls answered by the fault gate */
	uint64_t scan_ns;          /* time spent scanning */
	uint64_t pages_reported;   /* pages returned by changed() */
	uint64_t pages_revisited;  /* of which revisits */
	uint64_t pages_digested;   /* pages the clones hashed for the owner */
	uint64_t pages_read;       /* pages the owner read (read_page) */
	uint64_t frame_write_errors; /* staged frame runs that could not be
				      written (the clones then refuse every
				      merge onto them) */
	uint64_t merge_batches;    /* batches shipped */
	uint64_t merge_ns;         /* time the engine spent in the transport
				      (apply, or send + recv: blocked time) */
	int scan_ioctl;            /* 1: PAGEMAP_SCAN, 0: pagemap reads */
};

/* Create a backend, with domain 0's frame file (a memfd, sized sparse).
 * opts may be NULL (defaults). */
int sp_merge_linux_create(const struct sp_merge_linux_opts *opts,
			  struct sp_merge_linux **out, struct sp_error *err);

/* Free the backend. Regions and templates must have been removed. Clones
 * keep their frame mappings: the frame file lives on while any maps it. */
void sp_merge_linux_destroy(struct sp_merge_linux *b);

/* The ops table to pass to sp_merge_create() with ctx = the backend. */
const struct sp_merge_ops *sp_merge_linux_ops(void);

/* The frame file of merge domain `domain` (made on first use), for the
 * clones of that domain (of every domain, as domain 0, when
 * merge.merge_across_domains is set: the engine then allocates every
 * frame for domain 0): inherit fd across fork (it is O_CLOEXEC) or send it
 * with SCM_RIGHTS, and give it and slot to sp_merge_clone_create(). fd is
 * the backend's; do not close it. Each domain has its own file, so a clone
 * can neither read nor map another domain's frames; fd is opened
 * read-only (the backend writes through its own descriptor) and the
 * file's mode is 0400, so a clone cannot write the frames other clones
 * read, nor reopen the file writable unless it runs as root or as the
 * owner's user. A frame number is slot << 32 | page of that file. */
struct sp_merge_linux_frame_file {
	int fd;
	uint32_t slot;
};
int sp_merge_linux_frame_file(struct sp_merge_linux *b, uint32_t domain,
			      struct sp_merge_linux_frame_file *out, struct sp_error *err);

/* frame_write stages frames that follow each other in a file and writes a
 * run of them with one pwrite; the backend writes what is staged before
 * its own merge, merge_submit, read_frame and frame_free. Anything else
 * that reads a frame file (a clone's applier called directly, a tool)
 * calls this first. Engine thread (or under the engine's lock). */
void sp_merge_linux_frames_flush(struct sp_merge_linux *b);

/* Map a template (fd at offset_bytes, npages long, page-aligned) read-only
 * for read_template. The returned pointer is the handle to put in
 * sp_merge_template_desc.handle and sp_merge_linux_region_desc.tmpl. fd is
 * not kept open past the call; the mapping keeps the file alive. */
int sp_merge_linux_template_add(struct sp_merge_linux *b, int fd,
				uint64_t offset_bytes, uint64_t npages,
				struct sp_merge_linux_tmpl **out,
				struct sp_error *err);
void sp_merge_linux_template_remove(struct sp_merge_linux *b,
				    struct sp_merge_linux_tmpl *t);

/* Describe a clone. The result is the handle for
 * sp_merge_region_desc.handle. Opens the clone's pidfd, /proc/PID/mem,
 * pagemap and stat now (so a later PID reuse cannot mislead it): -ESRCH if
 * it is gone, -EACCES/-EPERM without ptrace access to it. */
int sp_merge_linux_region_add(struct sp_merge_linux *b,
			      const struct sp_merge_linux_region_desc *desc,
			      struct sp_merge_linux_region **out,
			      struct sp_error *err);
/* After sp_merge_region_remove() of the engine's region. */
void sp_merge_linux_region_remove(struct sp_merge_linux *b,
				  struct sp_merge_linux_region *r);

/* Counters (atomic reads; any thread). */
void sp_merge_linux_stats_get(struct sp_merge_linux *b,
			      struct sp_merge_linux_stats *st);

/* vm.max_map_count: each isolated merged page costs two mappings, and the
 * default limit (65,530) runs out near 32k of them per process. Raise it to
 * at least target (root only: -EACCES/-EPERM/-EROFS otherwise; callers go on
 * with the limit they have and take -ENOMEM results). saved records what to
 * undo; restore puts the old value back only if nobody changed it since. */
struct sp_merge_linux_mapcount {
	int64_t old_count;  /* value before the raise; -1: nothing to undo */
	int64_t set_count;  /* value written */
};
int sp_merge_linux_raise_map_count(uint64_t target,
				   struct sp_merge_linux_mapcount *saved);
int sp_merge_linux_restore_map_count(const struct sp_merge_linux_mapcount *saved);

/* ---- clone side ---------------------------------------------------- */

struct sp_merge_clone;         /* the applier inside one clone (opaque) */

struct sp_merge_clone_desc {
	void *ram;              /* guest RAM, MAP_PRIVATE of tmpl_fd (or anon) */
	uint64_t npages;        /* 4 KiB pages */
	int tmpl_fd;            /* the template RAM maps; -1: none */
	uint64_t tmpl_offset;   /* bytes: where page 0 sits in tmpl_fd */
	int frame_fd;           /* sp_merge_linux_frame_file() of the owner
				   for this clone's domain: .fd, which must
				   be read-only (-EINVAL otherwise) */
	uint32_t frame_slot;    /* ... and its .slot: a FRAME request naming
				   another file's frame is refused (-EXDEV) */
	int ram_anon;           /* 1: RAM is anonymous memory filled by read()
				   (fan-out `copy`), not a template mapping:
				   no page may be returned by MADV_DONTNEED */
};

struct sp_merge_clone_stats {
	uint64_t pages_merged;     /* requests applied (result 0) */
	uint64_t pages_discarded;  /* of which by MADV_DONTNEED */
	uint64_t pages_stale;      /* -EAGAIN: content differed */
	uint64_t pages_enomem;     /* -ENOMEM: mapping limit */
	uint64_t mmap_calls;       /* one per run */
	uint64_t madvise_calls;    /* one per run */
};

/* The fds are borrowed (they must stay open while the applier lives);
 * the descriptor is copied. */
int sp_merge_clone_create(const struct sp_merge_clone_desc *desc,
			  struct sp_merge_clone **out, struct sp_error *err);
/* Frees the applier; the mappings stay as they are. */
void sp_merge_clone_destroy(struct sp_merge_clone *c);

/*
 * Apply a batch to the clone's own RAM. Call it only while nothing else
 * writes guest RAM (every vCPU outside KVM_RUN): the check that a page
 * equals its target must still hold when the page is remapped. reqs must be
 * sorted by page, no page twice (else -EINVAL and nothing applied). Each
 * result is 0 (merged), -EAGAIN (content differs; nothing changed), -ENOMEM
 * (vm.max_map_count reached: that run, and every later run that needs a new
 * mapping, is left exactly as it was), -EINVAL (page or target out of
 * range, or TEMPLATE without a template) or another -errno from mmap or
 * madvise. Returns 0.
 */
int sp_merge_clone_apply(struct sp_merge_clone *c, struct sp_merge_req *reqs,
			 size_t n);

/* For the owner's digest request: out[i] = XXH3-64 of page pages[i] of this
 * clone's RAM as it is now (no vCPU running); out may be pages. Returns 0,
 * or -EINVAL if a page is out of range (nothing computed). */
int sp_merge_clone_digest(const struct sp_merge_clone *c, const uint64_t *pages,
			  size_t n, uint64_t *out);

void sp_merge_clone_stats_get(const struct sp_merge_clone *c,
			      struct sp_merge_clone_stats *st);

#endif
