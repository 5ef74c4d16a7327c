/* SPDX-License-Identifier: MIT */
/*
 * Fan-out: map a clone's guest RAM from one checkpoint.
 *
 *   copy      private anonymous memory filled with read() from the
 *             checkpoint: what bhyve -r and most VMMs do (the baseline,
 *             nothing shared).
 *   cow       MAP_PRIVATE of the template: clones share every page they
 *             have not written; a write copies one 4 KiB page.
 *   cow-huge  the same on a template in a huge-page tmpfs, mapped at a
 *             2 MiB-aligned address, so the host and KVM map 2 MiB at once.
 *
 * Template immutability: clones never map the checkpoint file itself,
 * which someone could rewrite under them. `cow` copies the memory section
 * into a memfd and seals it (F_SEAL_WRITE, F_SEAL_SHRINK, F_SEAL_GROW,
 * F_SEAL_SEAL): no process, root included, can change it while it lives.
 * `cow-huge` copies it into a file on a private tmpfs (huge=always),
 * mounted in a mount namespace of the run's own, remounts that tmpfs
 * read-only before any clone maps it, then detaches the mount and removes
 * its mount point: only the open file descriptor reaches the template. Every page's XXH3-64 is checked
 * against the checkpoint's index while copying.
 */
#ifndef SAMEPAGE_FANOUT_H
#define SAMEPAGE_FANOUT_H

#include <limits.h>
#include <stdint.h>

#include "samepage/ckpt.h"
#include "samepage/error.h"

enum sp_fanout_mode {
	SP_FANOUT_COPY = 0,
	SP_FANOUT_COW = 1,
	SP_FANOUT_COW_HUGE = 2,
};

const char *sp_fanout_mode_name(enum sp_fanout_mode m);
/* "copy", "cow", "cow-huge" -> mode; -EINVAL otherwise. */
int sp_fanout_mode_parse(const char *s, enum sp_fanout_mode *m);

struct sp_template {
	enum sp_fanout_mode mode;     /* (c) */
	struct sp_ckpt *ckpt;         /* (c) the validated checkpoint */
	uint64_t mem_bytes;           /* (c) guest RAM size */
	int fd;                       /* (c) template fd (ckpt fd in copy mode) */
	uint64_t fd_offset;           /* (c) where guest RAM starts in fd */
	char mnt[PATH_MAX];           /* cow-huge: the tmpfs mount point while
					 the template is being built */
	int mounted;
	int ns_private;               /* we moved into our own mount namespace */
};

/* Open and validate the checkpoint at path and build the template for
 * mode. For cow-huge this moves the calling process into a private mount
 * namespace (children inherit it) and mounts a huge-page tmpfs there. */
int sp_template_open(struct sp_template *t, const char *path,
		     enum sp_fanout_mode mode, struct sp_error *err);

/* Map one clone's guest RAM (mem_bytes long, read/write). */
int sp_template_map(const struct sp_template *t, void **ram, struct sp_error *err);
void sp_template_unmap(const struct sp_template *t, void *ram);

/* Tear the template down: close, unmount, remove the mount point. */
void sp_template_close(struct sp_template *t);

#endif
