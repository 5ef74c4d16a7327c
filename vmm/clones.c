/* SPDX-License-Identifier: MIT */
/*
 * The clone runner (see clones.h).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "samepage/merge_linux.h"
#include "vmm/clones.h"
#include "vmm/owner.h"
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

/* Receive one message on a clone's merge socket, with an fd if sent;
 * without waiting (the doorbell said something was sent). */
static ssize_t recv_merge(int sock, struct sp_merge_msg *m, int *fd)
{
	char cbuf[CMSG_SPACE(sizeof(int))];
	struct iovec iov = { m, sizeof(*m) };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
			     .msg_controllen = sizeof(cbuf) };
	struct cmsghdr *c;
	ssize_t n;

	*fd = -1;
	do
		n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
	while (n < 0 && errno == EINTR);
	for (c = CMSG_FIRSTHDR(&mh); n > 0 && c; c = CMSG_NXTHDR(&mh, c))
		if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
			memcpy(fd, CMSG_DATA(c), sizeof(int));
	return n;
}

/* One message from the merge owner: HELLO hands over the frame file,
 * BATCH asks to apply merges (the vCPU is not running: this process only
 * runs its guest while serving RUN/VERIFY). Returns -1 once the owner is
 * gone: the clone then keeps running on the mappings it has. */
static int clone_merge(const struct sp_fanout *f, int sock, void *ram,
		       struct sp_merge_clone **ap, struct sp_merge_msg *m)
{
	int fd;
	ssize_t n = recv_merge(sock, m, &fd);
	size_t hdr = offsetof(struct sp_merge_msg, reqs);

	if (n < 0 && errno == EAGAIN)
		return 1;   /* nothing (more) sent */
	if (n <= 0)
		return -1;
	if (m->type == SP_MERGE_MSG_HELLO && fd >= 0 && !*ap) {
		struct sp_merge_clone_desc d = {
			.ram = ram, .npages = f->tmpl.mem_bytes / SP_PAGE_SIZE,
			.tmpl_fd = f->tmpl.fd, .tmpl_offset = f->tmpl.fd_offset, .frame_fd = fd,
			.frame_slot = m->n,
		};
		if (sp_merge_clone_create(&d, ap, NULL))
			close(fd);
		return 0;
	}
	if (fd >= 0)
		close(fd);
	if (m->type == SP_MERGE_MSG_DIGEST) {
		/* hash the pages asked for (the owner then reads only those it
		 * copies into frames); always answer, so the owner never hangs */
		static uint64_t pg[SP_MERGE_MSG_MAX_REQS];   /* one clone thread */
		int rc = -EPROTO;

		if ((size_t)n >= hdr && m->n <= SP_MERGE_MSG_MAX_REQS &&
		    (size_t)n == hdr + m->n * sizeof(m->reqs[0]))
			rc = *ap ? 0 : -ENODEV;
		else
			m->n = 0;
		if (rc == 0) {
			for (uint32_t i = 0; i < m->n; i++)
				pg[i] = m->reqs[i].page;
			rc = sp_merge_clone_digest(*ap, pg, m->n, pg);
		}
		for (uint32_t i = 0; i < m->n; i++) {
			m->reqs[i].target = rc == 0 ? pg[i] : 0;
			m->reqs[i].result = rc;
		}
		n = (ssize_t)(hdr + m->n * sizeof(m->reqs[0]));
		return send(sock, m, (size_t)n, MSG_NOSIGNAL) == n ? 0 : -1;
	}
	if (m->type != SP_MERGE_MSG_BATCH)
		return 0;
	if ((size_t)n < hdr || m->n > SP_MERGE_MSG_MAX_REQS ||
	    (size_t)n != hdr + m->n * sizeof(m->reqs[0])) {
		/* malformed: answer anyway (with nothing applied) so that the
		 * owner, which waits for every answer, never hangs */
		m->type = SP_MERGE_MSG_DONE;
		m->n = 0;
		return send(sock, m, hdr, MSG_NOSIGNAL) == (ssize_t)hdr ? 0 : -1;
	}
	if (*ap) {
		sp_merge_clone_apply(*ap, m->reqs, m->n);
	} else {
		for (uint32_t i = 0; i < m->n; i++)
			m->reqs[i].result = -ENODEV;
	}
	m->type = SP_MERGE_MSG_DONE;
	return send(sock, m, (size_t)n, MSG_NOSIGNAL) == n ? 0 : -1;
}

/* The clone process: restore, report, then serve the owner's commands. */
static void __attribute__((noreturn))
clone_main(const struct sp_fanout *f, uint32_t idx, int sock, int msock, int bell)
{
	struct sp_probe p;
	struct sp_error err = { 0 };
	struct msg m = { .type = MSG_RESTORED };
	struct sp_merge_clone *applier = NULL;
	struct sp_merge_msg *mm = NULL;
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
	if (msock >= 0 && !(mm = malloc(sizeof(*mm))))
		_exit(1);
	for (;;) {
		struct msg in, out = { 0 };
		/* The owner rings the doorbell after each message it sends
		 * on the merge socket, which is watched only for a hangup: an
		 * eventfd's wakeup is not a synchronous one (a socket's is),
		 * so the scheduler runs this clone on an idle core instead of
		 * the owner's (measured in docs/merge-linux.md). */
		struct pollfd pf[3] = { { .fd = sock, .events = POLLIN },
					{ .fd = bell, .events = POLLIN },
					{ .fd = msock, .events = POLLRDHUP } };
		uint64_t bad = 0, t1, kind = f->o.kind, bp = f->o.bp;

		if (poll(pf, msock >= 0 ? 3 : 1, -1) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		if (msock >= 0 && (pf[1].revents || pf[2].revents)) {
			uint64_t rings;
			int r;

			/* read the bell first: a message sent after the drain
			 * below rings it again */
			(void)!read(bell, &rings, sizeof(rings));
			while ((r = clone_merge(f, msock, ram, &applier, mm)) == 0)
				;
			if (r < 0) {
				close(msock);
				msock = -1;
			}
			continue;
		}
		if (!pf[0].revents)
			continue;
		if (recv_msg(sock, &in))
			break;
		if (in.v[2]) {
			kind = in.v[0];
			bp = in.v[1];
		}
		switch (in.type) {
		case MSG_RUN:
			t1 = now_ns();
			rc = sp_probe_workload(&p, kind, bp, idx, &err);
			out.type = MSG_RAN;
			out.v[0] = now_ns() - t1;
			break;
		case MSG_VERIFY:
			rc = sp_probe_verify(&p, kind, bp, idx, &bad, &err);
			out.type = MSG_VERIFIED;
			out.v[0] = bad;
			break;
		default:
			sp_probe_destroy(&p);
			_exit(0);
		}
		out.status = rc;
		if (rc)
			snprintf(out.text, sizeof(out.text), "%.240s", err.msg);
		if (send_msg(sock, &out))
			break;
	}
	sp_probe_destroy(&p);
	_exit(0);
}

static int spawn(struct sp_fanout *f, uint32_t idx, struct sp_error *err)
{
	int sv[2], mv[2] = { -1, -1 }, bell = -1;
	pid_t pid;

	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
		return sp_error_set(err, -errno, "socketpair: %s", strerror(errno));
	if (f->o.merge && socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, mv) < 0) {
		int e = errno;
		close(sv[0]);
		close(sv[1]);
		return sp_error_set(err, -e, "socketpair: %s", strerror(e));
	}
	if (f->o.merge && (bell = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0) {
		int e = errno;
		close(sv[0]);
		close(sv[1]);
		close(mv[0]);
		close(mv[1]);
		return sp_error_set(err, -e, "eventfd: %s", strerror(e));
	}
	pid = fork();
	if (pid < 0) {
		int e = errno;
		close(sv[0]);
		close(sv[1]);
		if (mv[0] >= 0) {
			close(mv[0]);
			close(mv[1]);
			close(bell);
		}
		return sp_error_set(err, -e, "fork clone %u: %s", idx, strerror(e));
	}
	if (pid == 0) {
		close(sv[0]);
		if (mv[0] >= 0)
			close(mv[0]);
		for (uint32_t i = 0; i < idx; i++) {
			if (f->clone[i].sock >= 0)
				close(f->clone[i].sock);
			if (f->clone[i].msock >= 0)
				close(f->clone[i].msock);
			if (f->clone[i].mbell >= 0)
				close(f->clone[i].mbell);
		}
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		/* a terminal's ^C reaches the whole group: the owner decides */
		signal(SIGINT, SIG_IGN);
		clone_main(f, idx, sv[1], mv[1], bell);
	}
	close(sv[1]);
	if (mv[1] >= 0)
		close(mv[1]);
	f->clone[idx] = (struct sp_clone){ .pid = pid, .sock = sv[0], .msock = mv[0],
					   .mbell = bell, .alive = 1 };
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

/* Keep at most k of the first n clones busy at once: start(f, i) begins
 * clone i's job, finish(f, i, m, ndone) takes its answer. */
static int in_flight(struct sp_fanout *f, uint32_t n, uint32_t k,
		     int (*start)(struct sp_fanout *, uint32_t, struct sp_error *),
		     void (*finish)(struct sp_fanout *, uint32_t, const struct msg *, uint32_t),
		     struct sp_error *err)
{
	uint32_t *fly = calloc(k, sizeof(*fly)), nfly = 0, next = 0, done = 0;
	int rc = 0;

	if (!fly)
		return sp_error_set(err, -ENOMEM, "out of memory");
	while (done < n && rc == 0) {
		while (nfly < k && next < n && rc == 0) {
			rc = start(f, next, err);
			if (rc == 0)
				fly[nfly++] = next++;
		}
		if (rc)
			break;
		uint32_t w;
		struct msg m;
		rc = wait_any(f, fly, nfly, &w, &m, err);
		if (rc)
			break;
		finish(f, fly[w], &m, ++done);
		fly[w] = fly[--nfly];
	}
	free(fly);
	return rc;
}

static void restored(struct sp_fanout *f, uint32_t i, const struct msg *m, uint32_t ndone)
{
	f->clone[i].restore_ns = m->v[0];
	f->clone[i].ram_addr = m->v[1];
	progress(f, "restored", ndone);
}

static int restore_all(struct sp_fanout *f, struct sp_error *err)
{
	uint32_t n = f->o.clones;
	uint64_t *lat;
	int rc = in_flight(f, n, f->o.concurrency ? f->o.concurrency : 1, spawn, restored, err);

	if (rc)
		return rc;
	lat = calloc(n, sizeof(*lat));
	if (!lat)
		return sp_error_set(err, -ENOMEM, "out of memory");
	for (uint32_t i = 0; i < n; i++)
		lat[i] = f->clone[i].restore_ns;
	qsort(lat, n, sizeof(*lat), cmp_u64);
	f->restore_p50_ms = lat[(n - 1) / 2] / 1e6;
	f->restore_p99_ms = lat[(uint32_t)((n - 1) * 0.99 + 0.5)] / 1e6;
	f->restore_max_ms = lat[n - 1] / 1e6;
	free(lat);
	return 0;
}

static int start_run(struct sp_fanout *f, uint32_t i, struct sp_error *err)
{
	struct msg run = { .type = MSG_RUN };

	if (send_msg(f->clone[i].sock, &run))
		return sp_error_set(err, -EPIPE, "clone %u died", i);
	return 0;
}

static void ran(struct sp_fanout *f, uint32_t i, const struct msg *m, uint32_t ndone)
{
	f->clone[i].workload_ns = m->v[0];
	if (f->o.kind != SP_WL_NONE)
		progress(f, "workload done in", ndone);
}

static int run_all(struct sp_fanout *f, struct sp_error *err)
{
	uint64_t t0 = now_ns();
	int rc = in_flight(f, f->o.clones, f->o.jobs ? f->o.jobs : 4, start_run, ran, err);

	f->workload_wall_s = (now_ns() - t0) / 1e9;
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

/* CPU seconds a process has used: the sum over its threads of the run
 * time in /proc/PID/task/TID/schedstat (nanoseconds; /proc/PID/stat counts
 * only whole clock ticks, too coarse for short merges). */
static double proc_cpu_s(pid_t pid)
{
	char path[96];
	struct dirent *de;
	double sum = 0;
	DIR *d;

	snprintf(path, sizeof(path), "/proc/%d/task", (int)pid);
	d = opendir(path);
	if (!d)
		return 0;
	while ((de = readdir(d)) != NULL) {
		unsigned long long ns = 0;
		FILE *fp;

		if (de->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "/proc/%d/task/%.20s/schedstat", (int)pid, de->d_name);
		fp = fopen(path, "r");
		if (!fp)
			continue;
		if (fscanf(fp, "%llu", &ns) == 1)
			sum += (double)ns / 1e9;
		fclose(fp);
	}
	closedir(d);
	return sum;
}

static const char *const merge_stat_names[6] = {
	"stats.merge.pages_sharing", "stats.merge.zero_pages", "stats.merge.pages_template",
	"stats.merge.pages_shared", "stats.merge.pages_unshared", "stats.merge.full_scans",
};

/* Fork the merge owner over every clone and wait until it serves. */
static int owner_start(struct sp_fanout *f, struct sp_error *err)
{
	struct sp_owner_clone *oc = calloc(f->nclones, sizeof(*oc));
	int pfd[2];
	char c;
	pid_t pid;

	if (!oc)
		return sp_error_set(err, -ENOMEM, "out of memory");
	if (pipe2(pfd, O_CLOEXEC) < 0) {
		free(oc);
		return sp_error_set(err, -errno, "pipe: %s", strerror(errno));
	}
	for (uint32_t i = 0; i < f->nclones; i++)
		oc[i] = (struct sp_owner_clone){ .pid = f->clone[i].pid, .sock = f->clone[i].msock,
						 .bell = f->clone[i].mbell, .ram_addr = f->clone[i].ram_addr,
						 .domain = i % (f->o.domains ? f->o.domains : 1) };
	pid = fork();
	if (pid < 0) {
		int e = errno;
		free(oc);
		close(pfd[0]);
		close(pfd[1]);
		return sp_error_set(err, -e, "fork merge owner: %s", strerror(e));
	}
	if (pid == 0) {
		struct sp_owner_opts oo = {
			.tmpl_fd = f->tmpl.fd, .tmpl_offset = f->tmpl.fd_offset,
			.npages = f->tmpl.mem_bytes / SP_PAGE_SIZE,
			.hashes = sp_ckpt_hashes(f->tmpl.ckpt), .clones = oc,
			.nclones = f->nclones,
			.ctl_path = f->o.ctl_path ? f->o.ctl_path : SP_CTL_SOCKET_DEFAULT,
			.ready_fd = pfd[1], .knobs = f->o.knobs,
		};
		close(pfd[0]);
		for (uint32_t i = 0; i < f->nclones; i++)
			close(f->clone[i].sock);
		prctl(PR_SET_PDEATHSIG, SIGTERM);
		_exit(sp_owner_main(&oo));
	}
	free(oc);
	close(pfd[1]);
	for (uint32_t i = 0; i < f->nclones; i++) {
		close(f->clone[i].msock);
		close(f->clone[i].mbell);
		f->clone[i].msock = f->clone[i].mbell = -1;
	}
	f->owner_pid = pid;
	if (read(pfd[0], &c, 1) != 1) {
		close(pfd[0]);
		return sp_error_set(err, -EIO, "the merge owner failed to start (see its message above)");
	}
	close(pfd[0]);
	return 0;
}

/* Poll the owner until the engine says it converged; record when the
 * saving first reached 95% of where it ended. */
static int merge_converge(struct sp_fanout *f, struct sp_error *err)
{
	const char *path = f->o.ctl_path ? f->o.ctl_path : SP_CTL_SOCKET_DEFAULT;
	uint64_t t0 = now_ns();
	double clones0 = 0, clones1 = 0;
	size_t cap = 1024, n = 0;
	double *ts = malloc(cap * sizeof(*ts));
	int64_t *sv = malloc(cap * sizeof(*sv));
	char *buf = malloc(16384);
	int64_t conv = 0, scans0 = -1;
	int rc = 0;

	if (!ts || !sv || !buf) {
		free(ts);
		free(sv);
		free(buf);
		return sp_error_set(err, -ENOMEM, "out of memory");
	}
	for (uint32_t i = 0; i < f->nclones; i++)
		clones0 += proc_cpu_s(f->clone[i].pid);
	for (;;) {
		int64_t v[6] = { 0 };
		/* one "stats" request per poll: the owner answers every name */
		rc = sp_ctl_request(path, "stats", buf, 16384, err);
		if (rc)
			break;
		for (char *line = buf; line && *line;) {
			char *nl = strchr(line, '\n'), *sp = strchr(line, ' ');
			if (nl)
				*nl = '\0';
			if (sp) {
				*sp = '\0';
				for (int k = 0; k < 6; k++)
					if (!strcmp(line, merge_stat_names[k]))
						v[k] = strtoll(sp + 1, NULL, 10);
				if (!strcmp(line, "stats.merge.converged"))
					conv = strtoll(sp + 1, NULL, 10);
			}
			line = nl ? nl + 1 : NULL;
		}
		if (scans0 < 0)
			scans0 = v[5];
		if (n == cap) {
			cap *= 2;
			double *t2 = realloc(ts, cap * sizeof(*ts));
			int64_t *s2 = realloc(sv, cap * sizeof(*sv));
			if (!t2 || !s2) {
				free(t2 ? t2 : ts);
				free(s2 ? s2 : sv);
				free(buf);
				return sp_error_set(err, -ENOMEM, "out of memory");
			}
			ts = t2;
			sv = s2;
		}
		ts[n] = (now_ns() - t0) / 1e9;
		sv[n++] = v[0] + v[1];
		memcpy(f->merge_stat, v, sizeof(v));
		if (conv == 1 && v[5] >= scans0 + 2) {
			f->merge_converge_s = ts[n - 1];
			break;
		}
		if (sp_fanout_interrupted) {
			rc = sp_error_set(err, -EINTR, "interrupted");
			break;
		}
		usleep(10000);
	}
	if (rc == 0) {
		int64_t final = sv[n - 1];
		for (size_t i = 0; i < n; i++)
			if ((double)sv[i] >= 0.95 * (double)final) {
				f->merge_t95_s = ts[i];
				break;
			}
		f->merge_owner_cpu_s = proc_cpu_s(f->owner_pid);
		for (uint32_t i = 0; i < f->nclones; i++)
			clones1 += proc_cpu_s(f->clone[i].pid);
		f->merge_clones_cpu_s = clones1 - clones0;
	}
	free(ts);
	free(sv);
	free(buf);
	return rc;
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
	if (o->merge && o->mode == SP_FANOUT_COPY)
		return sp_error_set(err, -EINVAL,
				    "--merge needs --mode cow or cow-huge (copy clones do not map the template)");
	f->clone = calloc(o->clones, sizeof(*f->clone));
	if (!f->clone)
		return sp_error_set(err, -ENOMEM, "out of memory for %u clones", o->clones);
	for (uint32_t i = 0; i < o->clones; i++)
		f->clone[i].sock = f->clone[i].msock = f->clone[i].mbell = -1;
	/* three descriptors per clone here (control socket, merge socket,
	 * doorbell) until the owner takes the last two */
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < 3ull * o->clones + 64) {
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
	rc = sp_vm_prepare(err);
	if (rc)
		goto fail;
	rc = restore_all(f, err);
	if (rc)
		goto fail;
	rc = run_all(f, err);
	if (rc)
		goto fail;
	if (o->merge) {
		rc = owner_start(f, err);
		if (rc == 0)
			rc = merge_converge(f, err);
		if (rc)
			goto fail;
	}
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

static int one(struct sp_fanout *f, uint32_t idx, uint32_t type, uint64_t kind, uint64_t bp,
	       struct msg *m, struct sp_error *err)
{
	struct msg q = { .type = type, .v = { kind, bp, 1 } };
	uint32_t w;

	if (idx >= f->nclones)
		return sp_error_set(err, -EINVAL, "no clone %u", idx);
	if (send_msg(f->clone[idx].sock, &q))
		return sp_error_set(err, -EPIPE, "clone %u died", idx);
	return wait_any(f, &idx, 1, &w, m, err);
}

int sp_fanout_run_one(struct sp_fanout *f, uint32_t idx, uint64_t kind, uint64_t bp,
		      struct sp_error *err)
{
	struct msg m;
	return one(f, idx, MSG_RUN, kind, bp, &m, err);
}

int sp_fanout_verify_one(struct sp_fanout *f, uint32_t idx, uint64_t kind, uint64_t bp,
			 uint64_t *bad_pages, struct sp_error *err)
{
	struct msg m;
	int rc = one(f, idx, MSG_VERIFY, kind, bp, &m, err);

	if (rc == 0)
		*bad_pages = m.v[0];
	return rc;
}

void sp_fanout_stop(struct sp_fanout *f)
{
	struct msg ex = { .type = MSG_EXIT };

	if (f->owner_pid > 0) {
		kill(f->owner_pid, SIGTERM);
		while (waitpid(f->owner_pid, NULL, 0) < 0 && errno == EINTR)
			;
		f->owner_pid = 0;
	}

	for (uint32_t i = 0; i < f->nclones; i++)
		if (f->clone[i].sock >= 0)
			send_msg(f->clone[i].sock, &ex);
	for (uint32_t i = 0; i < f->nclones; i++) {
		if (f->clone[i].sock >= 0)
			close(f->clone[i].sock);
		if (f->clone[i].msock >= 0)
			close(f->clone[i].msock);
		if (f->clone[i].mbell >= 0)
			close(f->clone[i].mbell);
		f->clone[i].sock = f->clone[i].msock = f->clone[i].mbell = -1;
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
