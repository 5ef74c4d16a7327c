/* SPDX-License-Identifier: MIT */
/*
 * The merge owner (see owner.h): engine + Linux backend + clone transports
 * + control socket, in one process.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "samepage/merge_linux.h"
#include "vmm/owner.h"
#include "vmm/transport.h"

static volatile sig_atomic_t stop;
static int made_dir;   /* listen_on created the socket's directory */

static void on_stop(int sig)
{
	(void)sig;
	stop = 1;
}

static int listen_on(const char *path, struct sp_error *err)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	char dir[sizeof(a.sun_path)];
	char *slash;
	int fd;

	if (strlen(path) >= sizeof(a.sun_path))
		return sp_error_set(err, -ENAMETOOLONG, "control socket path too long: %s", path);
	snprintf(dir, sizeof(dir), "%s", path);
	slash = strrchr(dir, '/');
	if (slash && slash != dir) {
		*slash = '\0';
		made_dir = mkdir(dir, 0755) == 0;
	}
	strcpy(a.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return sp_error_set(err, -errno, "socket: %s", strerror(errno));
	unlink(path);
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(fd, 16) < 0) {
		int e = errno;
		close(fd);
		return sp_error_set(err, -e, "control socket %s: %s", path, strerror(e));
	}
	chmod(path, 0600);
	return fd;
}

static void put(int fd, const char *s)
{
	size_t n = strlen(s);
	while (n) {
		ssize_t w = write(fd, s, n);
		if (w <= 0)
			return;
		s += w;
		n -= (size_t)w;
	}
}

static void putf(int fd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void putf(int fd, const char *fmt, ...)
{
	char line[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	put(fd, line);
}

static void backend_stats(FILE *o, struct sp_merge_linux *b)
{
	struct sp_merge_linux_stats st;

	sp_merge_linux_stats_get(b, &st);
	fprintf(o, "stats.backend.frames_live %llu\n", (unsigned long long)st.frames_live);
	fprintf(o, "stats.backend.frames_retired %llu\n", (unsigned long long)st.frames_retired);
	fprintf(o, "stats.backend.frame_file_bytes %llu\n", (unsigned long long)st.frame_file_bytes);
	fprintf(o, "stats.backend.frame_files %llu\n", (unsigned long long)st.frame_files);
	fprintf(o, "stats.backend.scans %llu\n", (unsigned long long)st.scans);
	fprintf(o, "stats.backend.scans_skipped %llu\n", (unsigned long long)st.scans_skipped);
	fprintf(o, "stats.backend.scan_ns %llu\n", (unsigned long long)st.scan_ns);
	fprintf(o, "stats.backend.pages_reported %llu\n", (unsigned long long)st.pages_reported);
	fprintf(o, "stats.backend.pages_digested %llu\n", (unsigned long long)st.pages_digested);
	fprintf(o, "stats.backend.pages_read %llu\n", (unsigned long long)st.pages_read);
	fprintf(o, "stats.backend.frame_write_errors %llu\n",
		(unsigned long long)st.frame_write_errors);
	fprintf(o, "stats.backend.merge_batches %llu\n", (unsigned long long)st.merge_batches);
	fprintf(o, "stats.backend.merge_ns %llu\n", (unsigned long long)st.merge_ns);
}

/* Answer one request into o. */
static void answer(FILE *o, char *req, struct sp_merge *eng, struct sp_merge_linux *b)
{
	char name[256];
	long long v;
	int64_t val;

	if (sscanf(req, "get %255s", name) == 1) {
		int rc = sp_merge_ctl_get(eng, name, &val);
		if (rc)
			fprintf(o, "error %d unknown name '%s' (see 'samepage ctl list')\n", -rc, name);
		else
			fprintf(o, "ok\n%s %lld\n", name, (long long)val);
	} else if (sscanf(req, "set %255s %lld", name, &v) == 2) {
		struct sp_error err = { 0 };
		int rc;

		/* Each clone was given its domain's frame file (or, merging
		 * across domains, the shared one) and keeps it: the knob
		 * cannot change under them. */
		if (!strcmp(name, "merge.merge_across_domains") &&
		    sp_merge_ctl_get(eng, name, &val) == 0 && val != v)
			rc = sp_error_set(&err, -EBUSY,
					  "%s: fixed once the clones hold their frame files; "
					  "set it at start (fanout --merge-knob %s=%lld)",
					  name, name, v);
		else
			rc = sp_merge_ctl_set(eng, name, (int64_t)v, &err);
		if (rc)
			fprintf(o, "error %d %s\n", -rc, err.msg[0] ? err.msg : strerror(-rc));
		else
			fprintf(o, "ok\n");
	} else if (!strcmp(req, "stats") || !strcmp(req, "list")) {
		size_t n;
		const struct sp_merge_ctl_info *in = sp_merge_ctl_list(&n);
		fputs("ok\n", o);
		for (size_t i = 0; i < n; i++) {
			if (req[0] == 'l') {
				fprintf(o, "%s\t%s\t%lld\t%lld\t%s\n", in[i].name,
					in[i].writable ? "rw" : "ro", (long long)in[i].min,
					(long long)in[i].max, in[i].doc);
			} else if (sp_merge_ctl_get(eng, in[i].name, &val) == 0) {
				fprintf(o, "%s %lld\n", in[i].name, (long long)val);
			}
		}
		if (req[0] == 's')
			backend_stats(o, b);
	} else {
		fprintf(o, "error %d bad request '%.100s' (get NAME, set NAME VALUE, stats, list)\n",
			EINVAL, req);
	}
}

/* Serve one control connection: the answer goes out in one write, so
 * that a client polling the statistics costs the engine one wakeup, not
 * one per line. */
static void serve(int cfd, struct sp_merge *eng, struct sp_merge_linux *b)
{
	char req[512], *buf = NULL;
	size_t got = 0, len = 0;
	FILE *o;

	while (got < sizeof(req) - 1) {
		struct pollfd p = { .fd = cfd, .events = POLLIN };
		ssize_t r;
		if (poll(&p, 1, 1000) <= 0)
			break;
		r = read(cfd, req + got, sizeof(req) - 1 - got);
		if (r <= 0)
			break;
		got += (size_t)r;
		if (memchr(req, '\n', got))
			break;
	}
	req[got] = '\0';
	req[strcspn(req, "\r\n")] = '\0';
	o = open_memstream(&buf, &len);
	if (o == NULL) {
		putf(cfd, "error %d out of memory\n", ENOMEM);
	} else {
		answer(o, req, eng, b);
		if (fclose(o) == 0)
			put(cfd, buf);
		else
			putf(cfd, "error %d out of memory\n", ENOMEM);
		free(buf);
	}
	close(cfd);
}

int sp_owner_main(const struct sp_owner_opts *o)
{
	struct sp_error err = { 0 };
	struct sp_merge_linux *b = NULL;
	struct sp_merge_linux_tmpl *bt = NULL;
	struct sp_merge *eng = NULL;
	struct sp_merge_template *et = NULL;
	struct sp_merge_linux_region **br = calloc(o->nclones, sizeof(*br));
	struct sp_merge_region **er = calloc(o->nclones, sizeof(*er));
	struct sp_transport *tr = calloc(o->nclones, sizeof(*tr));
	struct sp_merge_msg *msg = malloc(sizeof(*msg));   /* every transport's */
	struct sp_merge_linux_mapcount mc = { -1, -1 };
	struct sigaction sa = { .sa_handler = on_stop };
	struct pollfd *pf = NULL;
	int lfd = -1, status = 1;

	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);

	signal(SIGPIPE, SIG_IGN);
	if (!br || !er || !tr || !msg) {
		fprintf(stderr, "samepage: owner: out of memory\n");
		goto out;
	}
	/* each isolated merged page costs two mappings in its clone */
	sp_merge_linux_raise_map_count(1u << 20, &mc);
	if (sp_merge_linux_create(NULL, &b, &err) ||
	    sp_merge_create(sp_merge_linux_ops(), b, &eng, &err) ||
	    sp_merge_linux_template_add(b, o->tmpl_fd, o->tmpl_offset, o->npages, &bt, &err))
		goto fail;
	{
		struct sp_merge_template_desc td = { .handle = bt, .hashes = o->hashes,
						     .npages = o->npages };
		if (sp_merge_template_add(eng, &td, &et, &err))
			goto fail;
	}
	for (uint32_t i = 0; i < o->nclones; i++) {
		struct sp_merge_linux_region_desc bd = {
			.pid = o->clones[i].pid, .ram_addr = o->clones[i].ram_addr,
			.npages = o->npages, .tmpl = bt, .apply = sp_transport_apply,
			.send = sp_transport_send, .recv = sp_transport_recv,
			.digest = sp_transport_digest, .ready = sp_transport_ready,
			.transport_ctx = &tr[i],
		};
		struct sp_merge_region_desc rd = { .npages = o->npages,
						   .domain = o->clones[i].domain, .tmpl = et };
		tr[i].sock = o->clones[i].sock;
		tr[i].bell = o->clones[i].bell;
		tr[i].msg = msg;
		if (sp_merge_linux_region_add(b, &bd, &br[i], &err))
			goto fail;
		rd.handle = br[i];
		if (sp_merge_region_add(eng, &rd, &er[i], &err))
			goto fail;
	}
	for (const char *const *k = o->knobs; k && *k; k++) {
		char name[128];
		long long v;
		if (sscanf(*k, "%127[^=]=%lld", name, &v) != 2) {
			sp_error_set(&err, -EINVAL, "bad knob setting '%s' (NAME=VALUE)", *k);
			goto fail;
		}
		if (sp_merge_ctl_set(eng, name, v, &err))
			goto fail;
	}
	{
		/* The owner exists to merge: it runs unless told otherwise, and
		 * does not sleep between steps while it has work (it only has
		 * work when clones changed pages; once converged it sleeps until
		 * merge.poll_ms). Its steps are long: a step ends by waiting for
		 * every batch in flight, and the next one starts with the
		 * clones idle, which is all a step boundary buys when nothing
		 * sleeps between steps (docs/merge-linux.md). Knobs given
		 * explicitly win. */
		static const char *const defaults[][2] = {
			{ "merge.run", "1" }, { "merge.sleep_ms", "0" },
			{ "merge.pages_to_scan", "100000" },
		};
		for (size_t d = 0; d < sizeof(defaults) / sizeof(defaults[0]); d++) {
			size_t len = strlen(defaults[d][0]);
			int set = 0;
			for (const char *const *k = o->knobs; k && *k; k++)
				set |= !strncmp(*k, defaults[d][0], len) && (*k)[len] == '=';
			if (!set && sp_merge_ctl_set(eng, defaults[d][0], atoll(defaults[d][1]), &err))
				goto fail;
		}
	}
	{
		/* Each clone gets its own domain's frame file; with merging
		 * across domains every frame is domain 0's. */
		int64_t across = 0;

		if (sp_merge_ctl_get(eng, "merge.merge_across_domains", &across))
			goto fail;
		for (uint32_t i = 0; i < o->nclones; i++) {
			struct sp_merge_linux_frame_file ff;

			if (sp_merge_linux_frame_file(b, across ? 0 : o->clones[i].domain, &ff,
						      &err))
				goto fail;
			sp_transport_hello(&tr[i], ff.fd, ff.slot);
		}
	}
	lfd = listen_on(o->ctl_path, &err);
	if (lfd < 0)
		goto fail;
	if (sp_merge_start(eng, &err))
		goto fail;
	if (o->ready_fd >= 0) {
		(void)!write(o->ready_fd, "r", 1);
		close(o->ready_fd);
	}
	pf = calloc(o->nclones + 1, sizeof(*pf));
	if (!pf) {
		sp_error_set(&err, -ENOMEM, "out of memory");
		goto fail;
	}
	while (!stop) {
		/* the listening socket, and every live clone's merge socket for
		 * hangups only (the engine thread reads the answers) */
		pf[0] = (struct pollfd){ .fd = lfd, .events = POLLIN };
		for (uint32_t i = 0; i < o->nclones; i++)
			pf[i + 1] = (struct pollfd){ .fd = er[i] ? tr[i].sock : -1, .events = POLLRDHUP };
		if (poll(pf, o->nclones + 1, -1) <= 0)
			continue;
		if (pf[0].revents & POLLIN) {
			int cfd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
			if (cfd >= 0)
				serve(cfd, eng, b);
		}
		/* a clone that died: forget it, reclaim its frames */
		for (uint32_t i = 0; i < o->nclones; i++) {
			if (er[i] && (pf[i + 1].revents & (POLLRDHUP | POLLHUP | POLLERR))) {
				sp_merge_region_remove(eng, er[i]);
				sp_merge_linux_region_remove(b, br[i]);
				er[i] = NULL;
				br[i] = NULL;
			}
		}
	}
	status = 0;
	goto out;
fail:
	fprintf(stderr, "samepage: merge owner: %s\n", err.msg);
	if (o->ready_fd >= 0)
		close(o->ready_fd);
out:
	if (eng)
		sp_merge_stop(eng);
	if (lfd >= 0) {
		char dir[PATH_MAX];
		char *slash;

		close(lfd);
		unlink(o->ctl_path);
		/* remove the socket's directory too if we made it and it is
		 * empty now (rmdir refuses otherwise) */
		snprintf(dir, sizeof(dir), "%s", o->ctl_path);
		slash = strrchr(dir, '/');
		if (made_dir && slash && slash != dir) {
			*slash = '\0';
			rmdir(dir);
		}
	}
	for (uint32_t i = 0; eng && i < o->nclones; i++)
		if (er && er[i])
			sp_merge_region_remove(eng, er[i]);
	for (uint32_t i = 0; b && i < o->nclones; i++)
		if (br && br[i])
			sp_merge_linux_region_remove(b, br[i]);
	if (eng && et)
		sp_merge_template_remove(eng, et);
	if (eng)
		sp_merge_destroy(eng);
	if (b && bt)
		sp_merge_linux_template_remove(b, bt);
	if (b)
		sp_merge_linux_destroy(b);
	sp_merge_linux_restore_map_count(&mc);
	free(br);
	free(er);
	for (uint32_t i = 0; tr && i < o->nclones; i++)
		sp_transport_release(&tr[i]);
	free(tr);
	free(msg);
	free(pf);
	return status;
}

int sp_ctl_request(const char *path, const char *req, char *buf, size_t len,
		   struct sp_error *err)
{
	struct sockaddr_un a = { .sun_family = AF_UNIX };
	size_t got = 0;
	int fd, rc = 0;
	char *nl;

	if (strlen(path) >= sizeof(a.sun_path))
		return sp_error_set(err, -ENAMETOOLONG, "control socket path too long: %s", path);
	strcpy(a.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return sp_error_set(err, -errno, "socket: %s", strerror(errno));
	if (connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
		int e = errno;
		close(fd);
		return sp_error_set(err, -e, "no merge owner at %s: %s", path, strerror(e));
	}
	put(fd, req);
	put(fd, "\n");
	for (;;) {
		ssize_t r = read(fd, buf + got, len - 1 - got);
		if (r <= 0)
			break;
		got += (size_t)r;
		if (got == len - 1)
			break;
	}
	close(fd);
	buf[got] = '\0';
	nl = strchr(buf, '\n');
	if (!strncmp(buf, "ok", 2) && nl) {
		memmove(buf, nl + 1, strlen(nl + 1) + 1);
		return 0;
	}
	if (!strncmp(buf, "error ", 6)) {
		int e = atoi(buf + 6);
		char *msg = strchr(buf + 6, ' ');
		if (nl)
			*nl = '\0';
		rc = sp_error_set(err, -(e > 0 ? e : EIO), "%s", msg ? msg + 1 : buf);
	} else {
		rc = sp_error_set(err, -EPROTO, "bad answer from %s", path);
	}
	return rc;
}

int sp_ctl_get(const char *path, const char *name, int64_t *val, struct sp_error *err)
{
	char req[300], buf[512];
	const char *sp;
	int rc;

	snprintf(req, sizeof(req), "get %s", name);
	rc = sp_ctl_request(path, req, buf, sizeof(buf), err);
	if (rc)
		return rc;
	sp = strchr(buf, ' ');
	if (!sp)
		return sp_error_set(err, -EPROTO, "bad answer to '%s'", req);
	*val = strtoll(sp + 1, NULL, 10);
	return 0;
}
