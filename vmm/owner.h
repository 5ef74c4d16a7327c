/* SPDX-License-Identifier: MIT */
/*
 * The merge owner (samepaged's role): one process that holds the merge
 * engine, the frame file and the trees for a set of clone processes, and
 * serves the control socket that `samepage ctl` talks to.
 *
 * Clones apply merges to their own address spaces: the owner ships each
 * batch over the clone's merge socket and the clone answers with results
 * (sp_merge_clone_apply). A clone that dies mid-merge is removed and its
 * frames reclaimed; an owner that dies leaves the clones running on the
 * mappings they have (MAP_PRIVATE frame mappings keep the frame file
 * alive).
 *
 * Control protocol (SOCK_STREAM, one request line, then the answer, then
 * the owner closes): "get NAME", "set NAME VALUE", "stats", "list". The
 * first answer line is "ok" or "error <errno> <message>"; "stats" follows it
 * with "NAME VALUE" lines (knobs, engine statistics, backend statistics),
 * "list" with "NAME<TAB>rw|ro<TAB>MIN<TAB>MAX<TAB>DOC" lines.
 */
#ifndef SAMEPAGE_VMM_OWNER_H
#define SAMEPAGE_VMM_OWNER_H

#include <stdint.h>
#include <sys/types.h>

#include "samepage/error.h"
#include "samepage/merge.h"

#define SP_CTL_SOCKET_DEFAULT "/run/samepage/samepaged.sock"

/* Messages on a clone's merge socket. */
#define SP_MERGE_MSG_HELLO 3u    /* carries the clone's frame file
				    (SCM_RIGHTS), its slot in n */
#define SP_MERGE_MSG_BATCH 1u
#define SP_MERGE_MSG_DONE 2u
#define SP_MERGE_MSG_DIGEST 4u   /* pages in reqs[i].page; the answer, of
				    the same type, has each page's XXH3-64 in
				    reqs[i].target (result 0) */
#define SP_MERGE_MSG_MAX_REQS 1024u
_Static_assert(SP_MERGE_MSG_MAX_REQS >= SP_MERGE_DIGEST_MAX,
	       "a digest request and its answer are one message");

struct sp_merge_msg {
	uint32_t type;
	uint32_t n;
	struct sp_merge_req reqs[SP_MERGE_MSG_MAX_REQS];
};

struct sp_owner_clone {
	pid_t pid;
	int sock;               /* owner's end of the clone's merge socket */
	int bell;               /* eventfd: written after each message sent */
	uint64_t ram_addr;
	uint32_t domain;
};

struct sp_owner_opts {
	int tmpl_fd;            /* what clone RAM is MAP_PRIVATE of */
	uint64_t tmpl_offset;
	uint64_t npages;
	const uint64_t *hashes; /* the checkpoint's page hash index */
	struct sp_owner_clone *clones;
	uint32_t nclones;
	const char *ctl_path;   /* control socket to create */
	int ready_fd;           /* write one byte here once serving; then close */
	const char *const *knobs; /* "name=value" to set before starting, NULL-ended */
};

/* Run the owner until SIGTERM/SIGINT: returns an exit status. Meant to be
 * called in a process of its own (it installs signal handlers). */
int sp_owner_main(const struct sp_owner_opts *o);

/* Client side of the control protocol: send one request line, collect the
 * answer (without the status line) into buf. Returns 0, or -errno with the
 * server's message in err. */
int sp_ctl_request(const char *path, const char *req, char *buf, size_t len,
		   struct sp_error *err);

/* Convenience: "get NAME" parsed as an integer. */
int sp_ctl_get(const char *path, const char *name, int64_t *val, struct sp_error *err);

#endif
