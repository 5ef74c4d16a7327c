/* SPDX-License-Identifier: MIT */
/*
 * The owner's transport to a clone (vmm/transport.c) against a scripted
 * clone on the other end of a real socket pair: batches of several
 * messages, digest requests answered after the batch in flight (whose
 * answers must be kept, in order, for the recv that follows), a clone that
 * dies mid-batch, malformed answers, and the engine asking whether a
 * clone is done without waiting.
 */
#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testutil.h"
#include "vmm/owner.h"
#include "vmm/transport.h"

#define HDR offsetof(struct sp_merge_msg, reqs)

/* What the scripted clone does with the BATCH messages it holds when a
 * DIGEST comes (or the owner hangs up). */
enum script {
	ANSWER_ALL,      /* DONE for each, in order, then the DIGEST answer */
	DIE_AFTER_ONE,   /* DONE for the first, then exit */
	BAD_SECOND,      /* the second DONE has the wrong count */
	FULL_AT_ONCE,    /* a full BATCH message is answered when it comes;
			    only the others wait for a DIGEST */
};

/* A clone's result for request page p: something the owner cannot guess. */
static int32_t result_of(uint64_t p)
{
	return p % 5 == 0 ? -EAGAIN : p % 7 == 0 ? -ENOMEM : 0;
}

static void answer_batch(int sock, struct sp_merge_msg *m, uint32_t n_override)
{
	for (uint32_t i = 0; i < m->n; i++)
		m->reqs[i].result = result_of(m->reqs[i].page);
	m->type = SP_MERGE_MSG_DONE;
	size_t bytes = HDR + m->n * sizeof(m->reqs[0]);
	if (n_override)
		m->n = n_override;
	if (send(sock, m, bytes, 0) != (ssize_t)bytes)
		_exit(5);
}

/* The clone: hold every BATCH until a DIGEST (or the end) comes. */
static void __attribute__((noreturn)) clone_script(int sock, enum script how)
{
	struct sp_merge_msg *held = calloc(8, sizeof(*held)), *m = malloc(sizeof(*m));
	size_t nheld = 0;
	ssize_t r;

	while ((r = recv(sock, m, sizeof(*m), 0)) > 0) {
		if (m->type == SP_MERGE_MSG_BATCH) {
			if (how == FULL_AT_ONCE && m->n == SP_MERGE_MSG_MAX_REQS) {
				answer_batch(sock, m, 0);
				continue;
			}
			if (nheld < 8)
				memcpy(&held[nheld++], m, (size_t)r);
			continue;
		}
		if (m->type != SP_MERGE_MSG_DIGEST)
			_exit(3);
		for (size_t k = 0; k < nheld; k++) {
			if (how == DIE_AFTER_ONE && k == 1)
				_exit(0);
			answer_batch(sock, &held[k], how == BAD_SECOND && k == 1 ? 1 : 0);
		}
		nheld = 0;
		for (uint32_t i = 0; i < m->n; i++)
			m->reqs[i].target = m->reqs[i].page * 31 + 1;
		if (send(sock, m, (size_t)r, 0) != r)
			_exit(4);
	}
	_exit(0);
}

struct rig {
	struct sp_transport t;
	pid_t pid;
	int sv[2];
};

static void rig_start(struct rig *g, enum script how)
{
	memset(g, 0, sizeof(*g));
	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_SEQPACKET, 0, g->sv), 0);
	g->t.sock = g->sv[0];
	g->t.bell = eventfd(0, EFD_NONBLOCK);
	ck_assert_int_ge(g->t.bell, 0);
	g->t.msg = malloc(sizeof(*g->t.msg));
	ck_assert_ptr_nonnull(g->t.msg);
	g->pid = fork();
	ck_assert_int_ge(g->pid, 0);
	if (g->pid == 0) {
		close(g->sv[0]);
		clone_script(g->sv[1], how);
	}
	close(g->sv[1]);
}

static void rig_stop(struct rig *g)
{
	int st;

	close(g->t.sock);
	ck_assert_int_eq(waitpid(g->pid, &st, 0), g->pid);
	ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "scripted clone failed: %d", st);
	close(g->t.bell);
	sp_transport_release(&g->t);
	free(g->t.msg);
}

/* n requests for pages 1000.. */
static struct sp_merge_req *requests(size_t n)
{
	struct sp_merge_req *q = calloc(n, sizeof(*q));

	ck_assert_ptr_nonnull(q);
	for (size_t i = 0; i < n; i++)
		q[i] = (struct sp_merge_req){ .page = 1000 + i, .kind = SP_MERGE_FRAME,
					      .target = i, .result = 12345 };
	return q;
}

static void digest_of_ten(struct rig *g)
{
	uint64_t pages[10], out[10];

	for (int i = 0; i < 10; i++)
		pages[i] = 7 * (uint64_t)i;
	ck_assert_int_eq(sp_transport_digest(&g->t, pages, 10, out), 0);
	for (int i = 0; i < 10; i++)
		ck_assert_uint_eq(out[i], pages[i] * 31 + 1);
}

/* A batch of three messages is in flight when a digest is asked for: the
 * three answers arrive first and are kept, in order, for the recv. */
START_TEST(digest_while_batch_in_flight)
{
	size_t n = 2 * SP_MERGE_MSG_MAX_REQS + 300;
	struct sp_merge_req *q = requests(n);
	struct rig g;

	rig_start(&g, ANSWER_ALL);
	ck_assert_int_eq(sp_transport_send(&g.t, q, n), 0);
	ck_assert_uint_eq(g.t.sent, n);
	digest_of_ten(&g);
	ck_assert_uint_eq(g.t.nkept - g.t.kept_at, 3);
	ck_assert_int_eq(sp_transport_recv(&g.t, q, n), 0);
	for (size_t i = 0; i < n; i++)
		ck_assert_msg(q[i].result == result_of(q[i].page), "request %zu: result %d, not %d",
			      i, q[i].result, result_of(q[i].page));
	ck_assert_uint_eq(g.t.nkept, g.t.kept_at);
	/* and again: the kept answers do not leak into the next batch */
	for (size_t i = 0; i < n; i++)
		q[i].page += 5000;
	ck_assert_int_eq(sp_transport_send(&g.t, q, n), 0);
	digest_of_ten(&g);
	ck_assert_int_eq(sp_transport_recv(&g.t, q, n), 0);
	for (size_t i = 0; i < n; i++)
		ck_assert_int_eq(q[i].result, result_of(q[i].page));
	rig_stop(&g);
	free(q);
}
END_TEST

/* The clone dies after answering the first message of a batch: that
 * message's results stand, the rest are -ESRCH. */
START_TEST(clone_dies_mid_batch)
{
	size_t n = SP_MERGE_MSG_MAX_REQS + 10;
	struct sp_merge_req *q = requests(n);
	uint64_t page = 3, out;
	struct rig g;

	rig_start(&g, DIE_AFTER_ONE);
	ck_assert_int_eq(sp_transport_send(&g.t, q, n), 0);
	ck_assert_int_eq(sp_transport_digest(&g.t, &page, 1, &out), -ESRCH);
	ck_assert_int_eq(sp_transport_recv(&g.t, q, n), 0);
	for (size_t i = 0; i < n; i++)
		ck_assert_int_eq(q[i].result,
				 i < SP_MERGE_MSG_MAX_REQS ? result_of(q[i].page) : -ESRCH);
	rig_stop(&g);
	free(q);
}
END_TEST

/* A malformed answer fails its own requests (-EPROTO) and no others. */
START_TEST(bad_answer_fails_its_message_only)
{
	size_t n = 2 * SP_MERGE_MSG_MAX_REQS + 1;
	struct sp_merge_req *q = requests(n);
	struct rig g;

	rig_start(&g, BAD_SECOND);
	ck_assert_int_eq(sp_transport_send(&g.t, q, n), 0);
	digest_of_ten(&g);
	ck_assert_int_eq(sp_transport_recv(&g.t, q, n), 0);
	for (size_t i = 0; i < n; i++) {
		int32_t want = i >= SP_MERGE_MSG_MAX_REQS && i < 2 * SP_MERGE_MSG_MAX_REQS ?
			       -EPROTO : result_of(q[i].page);
		ck_assert_msg(q[i].result == want, "request %zu: %d, not %d", i, q[i].result, want);
	}
	rig_stop(&g);
	free(q);
}
END_TEST

/* sp_transport_ready: a clone holding its batch is not done; one that
 * answered the first of two messages is not done either (and the answer
 * is kept, not lost); once the second answer has come it is, and recv
 * returns every result without waiting. */
START_TEST(ready_only_when_every_answer_came)
{
	size_t n = SP_MERGE_MSG_MAX_REQS + 10;
	struct sp_merge_req *q = requests(n);
	struct rig g;
	int tries;

	rig_start(&g, ANSWER_ALL);
	ck_assert_int_eq(sp_transport_send(&g.t, q, n), 0);
	usleep(20000);
	ck_assert_int_eq(sp_transport_ready(&g.t), 0);   /* both held */
	digest_of_ten(&g);                                /* answers both */
	ck_assert_int_eq(sp_transport_ready(&g.t), 1);
	ck_assert_int_eq(sp_transport_recv(&g.t, q, n), 0);
	for (size_t i = 0; i < n; i++)
		ck_assert_int_eq(q[i].result, result_of(q[i].page));
	rig_stop(&g);

	rig_start(&g, FULL_AT_ONCE);
	for (size_t i = 0; i < n; i++)
		q[i].result = 12345;
	ck_assert_int_eq(sp_transport_send(&g.t, q, n), 0);
	for (tries = 0; tries < 5000 && g.t.nkept - g.t.kept_at < 1; tries++) {
		ck_assert_int_eq(sp_transport_ready(&g.t), 0);
		usleep(1000);
	}
	ck_assert_uint_eq(g.t.nkept - g.t.kept_at, 1);   /* the first, kept */
	ck_assert_int_eq(sp_transport_ready(&g.t), 0);   /* the second is held */
	digest_of_ten(&g);
	ck_assert_int_eq(sp_transport_ready(&g.t), 1);
	ck_assert_uint_eq(g.t.nkept - g.t.kept_at, 2);
	ck_assert_int_eq(sp_transport_recv(&g.t, q, n), 0);
	for (size_t i = 0; i < n; i++)
		ck_assert_msg(q[i].result == result_of(q[i].page), "request %zu: %d, not %d", i,
			      q[i].result, result_of(q[i].page));
	ck_assert_uint_eq(g.t.nkept, g.t.kept_at);

	/* a batch of one full message: ready once it is answered */
	ck_assert_int_eq(sp_transport_send(&g.t, q, SP_MERGE_MSG_MAX_REQS), 0);
	for (tries = 0; tries < 5000 && !sp_transport_ready(&g.t); tries++)
		usleep(1000);
	ck_assert_int_eq(sp_transport_ready(&g.t), 1);
	ck_assert_int_eq(sp_transport_recv(&g.t, q, SP_MERGE_MSG_MAX_REQS), 0);
	for (size_t i = 0; i < SP_MERGE_MSG_MAX_REQS; i++)
		ck_assert_int_eq(q[i].result, result_of(q[i].page));
	rig_stop(&g);
	free(q);
}
END_TEST

/* A clone that died is "ready": recv will not wait for it. */
START_TEST(ready_when_clone_died)
{
	struct sp_merge_req *q = requests(4);
	struct rig g;
	int st;

	rig_start(&g, ANSWER_ALL);
	ck_assert_int_eq(sp_transport_send(&g.t, q, 4), 0);
	kill(g.pid, SIGKILL);
	ck_assert_int_eq(waitpid(g.pid, &st, 0), g.pid);
	ck_assert_int_eq(sp_transport_ready(&g.t), 1);
	ck_assert_int_eq(sp_transport_recv(&g.t, q, 4), -ESRCH);
	close(g.t.sock);
	close(g.t.bell);
	sp_transport_release(&g.t);
	free(g.t.msg);
	free(q);
}
END_TEST

/* Nothing can be shipped to a clone that is gone. */
START_TEST(send_to_dead_clone)
{
	struct sp_merge_req *q = requests(4);
	struct rig g;
	int st;

	rig_start(&g, ANSWER_ALL);
	kill(g.pid, SIGKILL);
	ck_assert_int_eq(waitpid(g.pid, &st, 0), g.pid);
	ck_assert_int_eq(sp_transport_send(&g.t, q, 4), -EPIPE);
	ck_assert_int_eq(sp_transport_recv(&g.t, q, 4), 0);
	for (int i = 0; i < 4; i++)
		ck_assert_int_eq(q[i].result, -EPIPE);
	close(g.t.sock);
	close(g.t.bell);
	sp_transport_release(&g.t);
	free(g.t.msg);
	free(q);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("transport");
	TCase *tc = tcase_create("owner-clone");

	signal(SIGPIPE, SIG_IGN);
	tcase_set_timeout(tc, 30);
	tcase_add_test(tc, digest_while_batch_in_flight);
	tcase_add_test(tc, clone_dies_mid_batch);
	tcase_add_test(tc, bad_answer_fails_its_message_only);
	tcase_add_test(tc, send_to_dead_clone);
	tcase_add_test(tc, ready_only_when_every_answer_came);
	tcase_add_test(tc, ready_when_clone_died);
	suite_add_tcase(s, tc);
	return sp_test_run(s);
}
