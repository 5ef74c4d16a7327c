/* SPDX-License-Identifier: MIT */
/*
 * The clone runner (see clones.h).
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "vmm/clones.h"
#include "vmm/probe.h"

volatile sig_atomic_t sp_fanout_interrupted;

enum { MSG_RESTORED = 1, MSG_RUN, MSG_RAN, MSG_VERIFY, MSG_VERIFIED, MSG_EXIT };

struct msg {
	uint32_t type;
	int32_t status;         /* 0 or -errno */
	uint64_t v[3];
	char text[SP_ERRMSG_LEN];
};

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int send_msg(int fd, const struct msg *m)
{
	ssize_t n;

	do
		n = send(fd, m, sizeof(*m), MSG_NOSIGNAL);
	while (n < 0 && errno == EINTR);
	return n == (ssize_t)sizeof(*m) ? 0 : -EPIPE;
}

static int recv_msg(int fd, struct msg *m)
{
	ssize_t n;

	do
		n = recv(fd, m, sizeof(*m), 0);
	while (n < 0 && errno == EINTR);
	if (n == 0)
		return -EPIPE;
	return n == (ssize_t)sizeof(*m) ? 0 : -EIO;
}

/* The clone process: restore, report, then serve the owner's commands. */
static void __attribute__((noreturn))
clone_main(const struct sp_fanout *f, uint32_t idx, int sock)
{
	struct sp_probe p;
	struct sp_error err = { 0 };
	struct msg m = { .type = MSG_RESTORED };
	void *ram = NULL;
	uint64_t t0 = now_ns();
	int rc;

	rc = sp_template_map(&f->tmpl, &ram, &err);
	if (rc == 0)
		rc = sp_probe_restore(&p, f->tmpl.ckpt, ram, &err);
	m.v[0] = now_ns() - t0;
	if (rc == 0 && f->o.ksm && madvise(ram, f->tmpl.mem_bytes, MADV_MERGEABLE) < 0)
		rc = sp_error_set(&err, -errno, "madvise(MADV_MERGEABLE): %s", strerror(errno));
	m.v[1] = (uint64_t)(uintptr_t)ram;
	m.status = rc;
	if (rc)
		snprintf(m.text, sizeof(m.text), "clone %u: restore: %.200s", idx, err.msg);
	if (send_msg(sock, &m) || rc)
		_exit(1);
	for (;;) {
		struct msg in, out = { 0 };
		uint64_t bad = 0, t1;

		if (recv_msg(sock, &in))
			break;
		switch (in.type) {
		case MSG_RUN:
			t1 = now_ns();
			rc = sp_probe_workload(&p, f->o.kind, f->o.bp, idx, &err);
			out.type = MSG_RAN;
			out.v[0] = now_ns() - t1;
			break;
		case MSG_VERIFY:
			rc = sp_probe_verify(&p, f->o.kind, f->o.bp, idx, &bad, &err);
			out.type = MSG_VERIFIED;
			out.v[0] = bad;
			break;
		default:
			sp_probe_destroy(&p);
			_exit(0);
		}
		out.status = rc;
		if (rc)
			snprintf(out.text, sizeof(out.text), "clone %u: %.200s", idx, err.msg);
		if (send_msg(sock, &out))
			break;
	}
	sp_probe_destroy(&p);
	_exit(0);
}

static int spawn(struct sp_fanout *f, uint32_t idx, struct sp_error *err)
{
	int sv[2];
	pid_t pid;

	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
		return sp_error_set(err, -errno, "socketpair: %s", strerror(errno));
	pid = fork();
	if (pid < 0) {
		int e = errno;
		close(sv[0]);
		close(sv[1]);
		return sp_error_set(err, -e, "fork clone %u: %s", idx, strerror(e));
	}
	if (pid == 0) {
		close(sv[0]);
		for (uint32_t i = 0; i < idx; i++)
			if (f->clone[i].sock >= 0)
				close(f->clone[i].sock);
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		/* a terminal's ^C reaches the whole group: the owner decides */
		signal(SIGINT, SIG_IGN);
		clone_main(f, idx, sv[1]);
	}
	close(sv[1]);
	f->clone[idx] = (struct sp_clone){ .pid = pid, .sock = sv[0], .alive = 1 };
	f->nclones = idx + 1;
	return 0;
}

/* Wait for one answer from any of the clones in want[] (indices). */
static int wait_any(struct sp_fanout *f, const uint32_t *want, uint32_t n,
		    uint32_t *which, struct msg *m, struct sp_error *err)
{
	struct pollfd *pf = calloc(n, sizeof(*pf));
	int rc = 0;

	if (!pf)
		return sp_error_set(err, -ENOMEM, "out of memory");
	for (uint32_t i = 0; i < n; i++)
		pf[i] = (struct pollfd){ .fd = f->clone[want[i]].sock, .events = POLLIN };
	for (;;) {
		int r = poll(pf, n, -1);
		if (r < 0 && errno == EINTR) {
			if (sp_fanout_interrupted) {
				rc = sp_error_set(err, -EINTR, "interrupted");
				break;
			}
			continue;
		}
		if (r < 0) {
			rc = sp_error_set(err, -errno, "poll: %s", strerror(errno));
			break;
		}
		for (uint32_t i = 0; i < n; i++) {
			if (!pf[i].revents)
				continue;
			*which = i;
			rc = recv_msg(pf[i].fd, m);
			if (rc)
				rc = sp_error_set(err, rc, "clone %u (pid %d) died",
						  want[i], (int)f->clone[want[i]].pid);
			else if (m->status)
				rc = sp_error_set(err, m->status, "%.240s", m->text);
			free(pf);
			return rc;
		}
	}
	free(pf);
	return rc;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

static void progress(const struct sp_fanout *f, const char *what, uint32_t done)
{
	uint32_t n = f->o.clones, step = n >= 20 ? n / 10 : 1;

	if (f->o.progress && (done % step == 0 || done == n))
		fprintf(stderr, "samepage: %s %u/%u\n", what, done, n);
}

static int restore_all(struct sp_fanout *f, struct sp_error *err)
{
	uint32_t n = f->o.clones, k = f->o.concurrency ? f->o.concurrency : 1;
	uint32_t *fly = calloc(k, sizeof(*fly)), nfly = 0, next = 0, done = 0;
	uint64_t *lat = calloc(n, sizeof(*lat));
	int rc = 0;

	if (!fly || !lat) {
		free(fly);
		free(lat);
		return sp_error_set(err, -ENOMEM, "out of memory");
	}
	while (done < n && rc == 0) {
		while (nfly < k && next < n) {
			rc = spawn(f, next, err);
			if (rc)
				break;
			fly[nfly++] = next++;
		}
		if (rc)
			break;
		uint32_t w;
		struct msg m;
		rc = wait_any(f, fly, nfly, &w, &m, err);
		if (rc)
			break;
		struct sp_clone *c = &f->clone[fly[w]];
		c->restore_ns = m.v[0];
		c->ram_addr = m.v[1];
		lat[done++] = m.v[0];
		fly[w] = fly[--nfly];
		progress(f, "restored", done);
	}
	if (rc == 0) {
		qsort(lat, n, sizeof(*lat), cmp_u64);
		f->restore_p50_ms = lat[(n - 1) / 2] / 1e6;
		f->restore_p99_ms = lat[(uint32_t)((n - 1) * 0.99 + 0.5)] / 1e6;
		f->restore_max_ms = lat[n - 1] / 1e6;
	}
	free(fly);
	free(lat);
	return rc;
}

static int run_all(struct sp_fanout *f, struct sp_error *err)
{
	uint32_t n = f->o.clones, k = f->o.jobs ? f->o.jobs : 4;
	uint32_t *fly = calloc(k, sizeof(*fly)), nfly = 0, next = 0, done = 0;
	uint64_t t0 = now_ns();
	struct msg run = { .type = MSG_RUN };
	int rc = 0;

	if (!fly)
		return sp_error_set(err, -ENOMEM, "out of memory");
	while (done < n && rc == 0) {
		while (nfly < k && next < n) {
			if (send_msg(f->clone[next].sock, &run)) {
				rc = sp_error_set(err, -EPIPE, "clone %u died", next);
				break;
			}
			fly[nfly++] = next++;
		}
		if (rc)
			break;
		uint32_t w;
		struct msg m;
		rc = wait_any(f, fly, nfly, &w, &m, err);
		if (rc)
			break;
		f->clone[fly[w]].workload_ns = m.v[0];
		fly[w] = fly[--nfly];
		done++;
		if (f->o.kind != SP_WL_NONE)
			progress(f, "workload done in", done);
	}
	f->workload_wall_s = (now_ns() - t0) / 1e9;
	free(fly);
	return rc;
}

int sp_fanout_measure(struct sp_fanout *f, struct sp_error *err)
{
	double pte = 0, pss = 0;
	int rc;

	for (uint32_t i = 0; i < f->nclones; i++) {
		struct sp_proc_mem pm;
		if (!f->clone[i].alive || sp_acct_proc(f->clone[i].pid, &pm, NULL))
			continue;
		pte += (double)pm.pte_bytes;
		pss += (double)pm.pss_bytes;
	}
	if (f->acct) {
		rc = sp_acct_sample(f->acct, &f->s_end, err);
		if (rc)
			return rc;
	}
	sp_density_compute(&f->density, f->o.clones, f->tmpl.mem_bytes, &f->s_base,
			   &f->s_tmpl, &f->s_end, pte, pss);
	return 0;
}

int sp_fanout_start(struct sp_fanout *f, const struct sp_fanout_opts *o,
		    struct sp_error *err)
{
	struct rlimit rl;
	uint64_t t0;
	int rc;

	memset(f, 0, sizeof(*f));
	f->o = *o;
	f->tmpl.fd = -1;
	if (o->clones == 0)
		return sp_error_set(err, -EINVAL, "need at least one clone");
	f->clone = calloc(o->clones, sizeof(*f->clone));
	if (!f->clone)
		return sp_error_set(err, -ENOMEM, "out of memory for %u clones", o->clones);
	for (uint32_t i = 0; i < o->clones; i++)
		f->clone[i].sock = -1;
	/* one socket per clone in the owner */
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < o->clones + 64ull) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
	{
		struct sp_error aerr = { 0 };
		if (sp_acct_open(&f->acct, "fanout", &aerr) == 0 &&
		    sp_acct_attach(f->acct, 0, &aerr) == 0 &&
		    sp_acct_sample(f->acct, &f->s_base, &aerr) == 0) {
			/* counting from here */
		} else {
			sp_acct_close(f->acct);
			f->acct = NULL;
			snprintf(f->acct_note, sizeof(f->acct_note), "%.200s", aerr.msg);
		}
	}
	t0 = now_ns();
	rc = sp_template_open(&f->tmpl, o->ckpt_path, o->mode, err);
	if (rc)
		goto fail;
	f->setup_s = (now_ns() - t0) / 1e9;
	if (f->acct) {
		rc = sp_acct_sample(f->acct, &f->s_tmpl, err);
		if (rc)
			goto fail;
	}
	rc = restore_all(f, err);
	if (rc)
		goto fail;
	rc = run_all(f, err);
	if (rc)
		goto fail;
	if (o->settle_ms)
		usleep(o->settle_ms * 1000u);
	rc = sp_fanout_measure(f, err);
	if (rc)
		goto fail;
	return 0;
fail:
	sp_fanout_stop(f);
	return rc;
}

int sp_fanout_verify(struct sp_fanout *f, uint32_t *bad_clones, struct sp_error *err)
{
	struct msg v = { .type = MSG_VERIFY };
	uint32_t bad = 0;

	for (uint32_t i = 0; i < f->nclones; i++) {
		struct msg m;
		uint32_t w;
		if (send_msg(f->clone[i].sock, &v))
			return sp_error_set(err, -EPIPE, "clone %u died", i);
		int rc = wait_any(f, &i, 1, &w, &m, err);
		if (rc)
			return rc;
		bad += m.v[0] != 0;
	}
	*bad_clones = bad;
	return 0;
}

void sp_fanout_stop(struct sp_fanout *f)
{
	struct msg ex = { .type = MSG_EXIT };

	for (uint32_t i = 0; i < f->nclones; i++)
		if (f->clone[i].sock >= 0)
			send_msg(f->clone[i].sock, &ex);
	for (uint32_t i = 0; i < f->nclones; i++) {
		if (f->clone[i].sock >= 0)
			close(f->clone[i].sock);
		f->clone[i].sock = -1;
	}
	for (uint32_t i = 0; i < f->nclones; i++) {
		if (f->clone[i].alive) {
			while (waitpid(f->clone[i].pid, NULL, 0) < 0 && errno == EINTR)
				;
			f->clone[i].alive = 0;
		}
	}
	sp_template_close(&f->tmpl);
	sp_acct_close(f->acct);
	f->acct = NULL;
	free(f->clone);
	f->clone = NULL;
	f->nclones = 0;
}
