/* SPDX-License-Identifier: MIT */
/*
 * The owner's end of a clone's merge socket: the transport callbacks the
 * Linux merge backend calls (include/samepage/merge_linux.h) to ship a
 * batch of merges to a clone, wait for its results, and ask it for page
 * digests. Messages are struct sp_merge_msg (vmm/owner.h) on a
 * SOCK_SEQPACKET socket; after each message the owner rings the clone's
 * doorbell (an eventfd). The clone answers every message, in order: a
 * BATCH of n requests with a DONE of n results, a DIGEST with a DIGEST.
 *
 * At most one batch is in flight per clone, but it may take several
 * messages (SP_MERGE_MSG_MAX_REQS requests each), and a digest request
 * sent while it is in flight is answered after it: the DONE answers that
 * arrive first are kept, in order, for sp_transport_recv. So are those
 * sp_transport_ready finds when the engine asks whether the clone is done.
 *
 * Every function is called from the engine's thread only (the backend
 * calls them under the engine's lock), so all transports share one message
 * buffer.
 */
#ifndef SAMEPAGE_VMM_TRANSPORT_H
#define SAMEPAGE_VMM_TRANSPORT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "samepage/merge.h"
#include "vmm/owner.h"

struct sp_transport_kept;

struct sp_transport {
	int sock;                  /* (c) owner's end of the merge socket */
	int bell;                  /* (c) the clone's doorbell (an eventfd) */
	struct sp_merge_msg *msg;  /* (c) the buffer every transport shares */
	size_t sent;               /* (s) requests of the batch in flight shipped */
	struct sp_transport_kept *kept; /* (s) DONE answers that came while a
					   digest was awaited, or that
					   sp_transport_ready found, oldest
					   first */
	size_t kept_at, nkept, kept_cap; /* (s) kept[kept_at, nkept) */
};

/* sp_merge_linux_send_fn: ship n requests, one message per
 * SP_MERGE_MSG_MAX_REQS, without waiting. 0, or -EPIPE if none went. */
int sp_transport_send(void *t, const struct sp_merge_req *reqs, size_t n);

/* sp_merge_linux_recv_fn: wait for the answers to what send shipped and
 * copy each result into reqs[i].result (-EPIPE: not shipped; -ESRCH: the
 * clone died first; -EPROTO: a malformed answer). 0, or -ESRCH if no
 * answer came at all. */
int sp_transport_recv(void *t, struct sp_merge_req *reqs, size_t n);

/* sp_merge_linux_ready_fn: 1 if every answer to the batch sent has come
 * (or the clone is gone), so that sp_transport_recv will not wait; the
 * answers that have come are moved to the kept list. Never waits. */
int sp_transport_ready(void *t);

/* sp_merge_linux_apply_fn: send, then recv. */
int sp_transport_apply(void *t, struct sp_merge_req *reqs, size_t n);

/* sp_merge_linux_digest_fn: out[i] = the clone's XXH3-64 of pages[i], for
 * n <= SP_MERGE_MSG_MAX_REQS. 0 or -errno (-ESRCH: the clone is gone). */
int sp_transport_digest(void *t, const uint64_t *pages, size_t n, uint64_t *out);

/* Hand the clone its domain's frame file (SCM_RIGHTS) and the file's slot. */
void sp_transport_hello(const struct sp_transport *t, int frame_fd, uint32_t slot);

/* Free what the transport holds (not its descriptors). */
void sp_transport_release(struct sp_transport *t);

#endif
