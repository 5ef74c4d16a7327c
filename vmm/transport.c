/* SPDX-License-Identifier: MIT */
/*
 * The owner's end of a clone's merge socket (see vmm/transport.h).
 */
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "vmm/transport.h"

struct sp_transport_kept {
	ssize_t len;
	struct sp_merge_msg msg;
};

/* Tell the clone a message is waiting. The clone sleeps on this eventfd,
 * not on the socket: a socket wakes its reader "synchronously", which puts
 * the clone on the owner's core while the other core may idle. */
static void ring(const struct sp_transport *t)
{
	uint64_t one = 1;

	(void)!write(t->bell, &one, sizeof(one));
}

/* Requests in the message that carries reqs[done...] of a batch of n. */
static size_t chunk(size_t n, size_t done)
{
	return n - done < SP_MERGE_MSG_MAX_REQS ? n - done : SP_MERGE_MSG_MAX_REQS;
}

/* At most one batch is in flight, so the socket queues hold a few messages
 * at most and send never waits for long. */
int sp_transport_send(void *ctx, const struct sp_merge_req *reqs, size_t n)
{
	struct sp_transport *t = ctx;

	t->sent = 0;
	while (t->sent < n) {
		size_t k = chunk(n, t->sent);
		size_t bytes = offsetof(struct sp_merge_msg, reqs) + k * sizeof(reqs[0]);
		ssize_t r;

		t->msg->type = SP_MERGE_MSG_BATCH;
		t->msg->n = (uint32_t)k;
		memcpy(t->msg->reqs, reqs + t->sent, k * sizeof(reqs[0]));
		do
			r = send(t->sock, t->msg, bytes, MSG_NOSIGNAL);
		while (r < 0 && errno == EINTR);
		if (r != (ssize_t)bytes)
			break;   /* the rest stays unapplied */
		t->sent += k;
	}
	ring(t);
	return t->sent ? 0 : -EPIPE;
}

int sp_transport_recv(void *ctx, struct sp_merge_req *reqs, size_t n)
{
	struct sp_transport *t = ctx;

	for (size_t done = 0; done < n; done += chunk(n, done)) {
		size_t k = chunk(n, done);
		size_t bytes = offsetof(struct sp_merge_msg, reqs) + k * sizeof(reqs[0]);
		ssize_t r;

		if (done >= t->sent) {
			for (size_t i = done; i < n; i++)
				reqs[i].result = -EPIPE;
			break;
		}
		if (t->kept_at < t->nkept) {
			/* answered while ship_digest waited */
			struct sp_transport_kept *kp = &t->kept[t->kept_at++];

			r = kp->len;
			memcpy(t->msg, &kp->msg, (size_t)r);
			if (t->kept_at == t->nkept)
				t->kept_at = t->nkept = 0;
		} else {
			do
				r = recv(t->sock, t->msg, sizeof(*t->msg), 0);
			while (r < 0 && errno == EINTR);
		}
		if (r <= 0) {
			/* the clone died mid-batch: the rest stays unapplied */
			for (size_t i = done; i < n; i++)
				reqs[i].result = -ESRCH;
			return done ? 0 : -ESRCH;
		}
		if (r != (ssize_t)bytes || t->msg->type != SP_MERGE_MSG_DONE || t->msg->n != k) {
			/* a bad answer (nothing applied): keep reading the
			 * answers to the rest, so the next batch's are its own */
			for (size_t i = done; i < done + k; i++)
				reqs[i].result = -EPROTO;
			continue;
		}
		for (size_t i = 0; i < k; i++)
			reqs[done + i].result = t->msg->reqs[i].result;
	}
	return 0;
}

/* Make room for one more kept answer. */
static int kept_room(struct sp_transport *t)
{
	if (t->nkept == t->kept_cap) {
		size_t cap = t->kept_cap ? 2 * t->kept_cap : 2;
		struct sp_transport_kept *k = realloc(t->kept, cap * sizeof(*k));

		if (!k)
			return -ENOMEM;
		t->kept = k;
		t->kept_cap = cap;
	}
	return 0;
}

/* Keep the answer of len bytes in t->msg, for sp_transport_recv. */
static void keep(struct sp_transport *t, ssize_t len)
{
	t->kept[t->nkept].len = len;
	memcpy(&t->kept[t->nkept++].msg, t->msg, (size_t)len);
}

/* Every answer to the batch in flight that has come is moved from the
 * socket to the kept list (without waiting); ready when all have. */
int sp_transport_ready(void *ctx)
{
	struct sp_transport *t = ctx;
	size_t want = (t->sent + SP_MERGE_MSG_MAX_REQS - 1) / SP_MERGE_MSG_MAX_REQS;
	ssize_t r;

	while (t->nkept - t->kept_at < want) {
		if (kept_room(t))
			return 0;   /* recv will read it */
		do
			r = recv(t->sock, t->msg, sizeof(*t->msg), MSG_DONTWAIT);
		while (r < 0 && errno == EINTR);
		if (r < 0)
			return errno != EAGAIN && errno != EWOULDBLOCK;
		if (r == 0)
			return 1;   /* the clone is gone: recv will not wait */
		keep(t, r);
	}
	return 1;
}

/* The answers to a batch in flight come first (the clone answers in
 * order): keep them for sp_transport_recv. */
int sp_transport_digest(void *ctx, const uint64_t *pages, size_t n, uint64_t *out)
{
	struct sp_transport *t = ctx;
	size_t bytes = offsetof(struct sp_merge_msg, reqs) + n * sizeof(t->msg->reqs[0]);
	ssize_t r;

	if (n > SP_MERGE_MSG_MAX_REQS)
		return -EINVAL;
	t->msg->type = SP_MERGE_MSG_DIGEST;
	t->msg->n = (uint32_t)n;
	for (size_t i = 0; i < n; i++)
		t->msg->reqs[i] = (struct sp_merge_req){ .page = pages[i] };
	do
		r = send(t->sock, t->msg, bytes, MSG_NOSIGNAL);
	while (r < 0 && errno == EINTR);
	ring(t);
	if (r != (ssize_t)bytes)
		return -EPIPE;
	for (;;) {
		do
			r = recv(t->sock, t->msg, sizeof(*t->msg), 0);
		while (r < 0 && errno == EINTR);
		if (r <= 0)
			return -ESRCH;
		if (t->msg->type != SP_MERGE_MSG_DONE)
			break;
		if (kept_room(t))
			return -ENOMEM;
		keep(t, r);
	}
	if (r != (ssize_t)bytes || t->msg->type != SP_MERGE_MSG_DIGEST || t->msg->n != n)
		return -EPROTO;
	for (size_t i = 0; i < n; i++) {
		if (t->msg->reqs[i].result)
			return t->msg->reqs[i].result < 0 ? t->msg->reqs[i].result : -EPROTO;
		out[i] = t->msg->reqs[i].target;
	}
	return 0;
}

int sp_transport_apply(void *ctx, struct sp_merge_req *reqs, size_t n)
{
	int rc = sp_transport_send(ctx, reqs, n);

	return rc ? rc : sp_transport_recv(ctx, reqs, n);
}

void sp_transport_hello(const struct sp_transport *t, int frame_fd, uint32_t slot)
{
	struct sp_merge_msg m = { .type = SP_MERGE_MSG_HELLO, .n = slot };
	char cbuf[CMSG_SPACE(sizeof(int))] = { 0 };
	struct iovec iov = { &m, offsetof(struct sp_merge_msg, reqs) };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
			     .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *c = CMSG_FIRSTHDR(&mh);

	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &frame_fd, sizeof(int));
	(void)sendmsg(t->sock, &mh, MSG_NOSIGNAL);
	ring(t);
}

void sp_transport_release(struct sp_transport *t)
{
	free(t->kept);
	t->kept = NULL;
	t->kept_at = t->nkept = t->kept_cap = 0;
}
