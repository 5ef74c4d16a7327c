/* SPDX-License-Identifier: MIT */
/*
 * Linux backend of samepage's memory accounting (see acct.h and
 * docs/accounting.md). A run gets a memory cgroup of its own so the
 * kernel's own counters say what the run costs the host, untouched by
 * whatever else the machine is doing.
 *
 * Where the cgroup goes. The caller's memory cgroup is read from
 * /proc/self/cgroup and the controller's mount from /proc/self/mountinfo.
 * With cgroup v1 (what these machines have) the run's cgroup
 * "samepage-<tag>-<pid>" is made as a child of the caller's own cgroup:
 * v1 lets a cgroup hold tasks and children at once, so nothing has to be
 * rearranged, and the run stays inside every limit the caller already
 * lives under (a child of the mount root would quietly escape them). Only
 * if that mkdir is refused do we fall back to the mount root. With cgroup
 * v2 a child only gets memory.* files if its parent lists "memory" in
 * cgroup.subtree_control, and no populated non-root cgroup can (the "no
 * internal processes" rule), so there the parent is the caller's cgroup
 * when it qualifies and the root otherwise. We never write any file of a
 * cgroup we did not create except cgroup.procs, and only to move our own
 * tasks back out.
 *
 * What is left behind. sp_acct_open() removes the directory it made on
 * every failure path. sp_acct_release() moves the caller back to the
 * cgroup it came from, moves any remaining tasks to the parent, then
 * rmdir()s the run's cgroup, retrying for about two seconds while exiting
 * tasks drain. Charges still held by the removed cgroup (page cache, a
 * memfd someone keeps open) are the kernel's to reparent.
 */
#include <errno.h>
#include <fcntl.h>
#include <dirent.h>
#include <limits.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "samepage/acct.h"

#define SP_ACCT_TAG_MAX      64
#define SP_ACCT_RMDIR_WAIT_MS 2000
#define SP_ACCT_RMDIR_STEP_MS 20

struct sp_acct {
	int version;              /* 1 or 2: cgroup version of the controller */
	pid_t opener;             /* pid that called sp_acct_open */
	char orig[PATH_MAX];      /* the opener's cgroup directory at open */
	char parent[PATH_MAX];    /* directory the run's cgroup was made in */
	char path[PATH_MAX];      /* the run's cgroup directory */
};

/* Where the memory controller is and where the caller sits in it. */
struct cg_loc {
	int version;
	char mount[PATH_MAX];     /* mount point of the hierarchy */
	char self[PATH_MAX];      /* caller's cgroup directory (absolute) */
};

/* ---- small file helpers ------------------------------------------------ */

static int read_text(const char *path, char *buf, size_t size)
{
	size_t len = 0;
	int fd = open(path, O_RDONLY | O_CLOEXEC);

	if (fd < 0)
		return -errno;
	while (len + 1 < size) {
		ssize_t n = read(fd, buf + len, size - 1 - len);

		if (n < 0) {
			int e = errno;

			if (e == EINTR)
				continue;
			close(fd);
			return -e;
		}
		if (n == 0)
			break;
		len += (size_t)n;
	}
	close(fd);
	buf[len] = '\0';
	return 0;
}

static int write_text(const char *path, const char *text)
{
	size_t len = strlen(text);
	ssize_t n;
	int fd = open(path, O_WRONLY | O_CLOEXEC);

	if (fd < 0)
		return -errno;
	n = write(fd, text, len);
	if (n < 0) {
		int e = errno;

		close(fd);
		return -e;
	}
	close(fd);
	return (size_t)n == len ? 0 : -EIO;
}

static int path_join(char *dst, size_t size, const char *dir, const char *name)
{
	int n = snprintf(dst, size, "%s/%s", dir, name);

	return n < 0 || (size_t)n >= size ? -ENAMETOOLONG : 0;
}

/* One integer file such as memory.usage_in_bytes; -1 when absent. */
static int64_t read_int_file(const char *dir, const char *name)
{
	char path[PATH_MAX], buf[64], *end;
	long long v;

	if (path_join(path, sizeof(path), dir, name) != 0 ||
	    read_text(path, buf, sizeof(buf)) != 0)
		return -1;
	errno = 0;
	v = strtoll(buf, &end, 10);
	if (errno != 0 || end == buf || v < 0)
		return -1;
	return (int64_t)v;
}

/* ---- key/value files ---------------------------------------------------- */

/* A key to look for in a "key value" or "Key:  value kB" file. */
struct kv {
	const char *key;
	int64_t *dst;             /* set to the value in bytes; -1 if absent */
};

/*
 * Scan a file of lines "key value" (memory.stat) or "Key:   value kB"
 * (/proc/meminfo, smaps_rollup, status). A value followed by "kB" is
 * converted to bytes. Keys not found leave their destination at -1.
 */
static int read_kv(const char *path, const struct kv *kv, size_t n)
{
	FILE *f;
	char *line = NULL;
	size_t cap = 0;

	for (size_t i = 0; i < n; i++)
		*kv[i].dst = -1;
	f = fopen(path, "re");
	if (f == NULL)
		return -errno;
	while (getline(&line, &cap, f) >= 0) {
		size_t klen = strcspn(line, ": \t\n");
		char *p = line + klen, *end;
		long long v;

		if (*p == ':')
			p++;
		errno = 0;
		v = strtoll(p, &end, 10);
		if (end == p || errno != 0 || v < 0)
			continue;
		while (*end == ' ' || *end == '\t')
			end++;
		if (strncmp(end, "kB", 2) == 0) {
			if (v > INT64_MAX / 1024)
				continue;
			v *= 1024;
		}
		for (size_t i = 0; i < n; i++) {
			if (strlen(kv[i].key) == klen &&
			    memcmp(kv[i].key, line, klen) == 0)
				*kv[i].dst = (int64_t)v;
		}
	}
	free(line);
	fclose(f);
	return 0;
}

/* ---- finding the controller --------------------------------------------- */

/* Undo mountinfo's octal escapes (\040 for a space) in place. */
static void unescape(char *s)
{
	char *w = s;

	for (char *r = s; *r != '\0'; r++) {
		if (r[0] == '\\' && r[1] >= '0' && r[1] <= '3' &&
		    r[2] >= '0' && r[2] <= '7' && r[3] >= '0' && r[3] <= '7') {
			*w++ = (char)((r[1] - '0') * 64 + (r[2] - '0') * 8 + (r[3] - '0'));
			r += 3;
		} else {
			*w++ = *r;
		}
	}
	*w = '\0';
}

/* Does the comma-separated list contain word? */
static bool list_has(const char *list, const char *word, const char *seps)
{
	size_t wl = strlen(word);

	for (const char *p = list; *p != '\0';) {
		size_t l = strcspn(p, seps);

		if (l == wl && memcmp(p, word, wl) == 0)
			return true;
		p += l;
		if (*p != '\0')
			p++;
	}
	return false;
}

/* Does a cgroup v2 directory list "memory" in the given file? */
static bool v2_lists_memory(const char *dir, const char *file)
{
	char path[PATH_MAX], buf[512];

	if (path_join(path, sizeof(path), dir, file) != 0 ||
	    read_text(path, buf, sizeof(buf)) != 0)
		return false;
	return list_has(buf, "memory", " \n");
}

/*
 * Find the memory controller's mount: a v1 "cgroup" mount whose super
 * options name "memory" wins; otherwise a "cgroup2" mount whose
 * cgroup.controllers lists memory. root receives the mount's root within
 * the hierarchy (mountinfo field 4), needed to map /proc/self/cgroup paths.
 */
static int find_mount(struct cg_loc *loc, char *root, size_t root_size)
{
	FILE *f = fopen("/proc/self/mountinfo", "re");
	char *line = NULL;
	size_t cap = 0;
	bool found_v2 = false;
	char v2_mount[PATH_MAX] = "", v2_root[PATH_MAX] = "";

	if (f == NULL)
		return -errno;
	loc->version = 0;
	while (getline(&line, &cap, f) >= 0) {
		char *save = NULL, *fields[5], *tail, *fstype, *opts;
		int i;

		line[strcspn(line, "\n")] = '\0';
		tail = strstr(line, " - ");
		if (tail == NULL)
			continue;
		*tail = '\0';
		tail += 3;
		for (i = 0; i < 5; i++) {
			fields[i] = strtok_r(i == 0 ? line : NULL, " ", &save);
			if (fields[i] == NULL)
				break;
		}
		if (i < 5)
			continue;
		fstype = strtok_r(tail, " ", &save);
		(void)strtok_r(NULL, " ", &save);      /* source */
		opts = strtok_r(NULL, " ", &save);
		if (fstype == NULL)
			continue;
		unescape(fields[3]);
		unescape(fields[4]);
		if (strcmp(fstype, "cgroup") == 0 && opts != NULL &&
		    list_has(opts, "memory", ",")) {
			snprintf(loc->mount, sizeof(loc->mount), "%s", fields[4]);
			snprintf(root, root_size, "%s", fields[3]);
			loc->version = 1;
			break;
		}
		if (strcmp(fstype, "cgroup2") == 0 && !found_v2 &&
		    v2_lists_memory(fields[4], "cgroup.controllers")) {
			snprintf(v2_mount, sizeof(v2_mount), "%s", fields[4]);
			snprintf(v2_root, sizeof(v2_root), "%s", fields[3]);
			found_v2 = true;
		}
	}
	free(line);
	fclose(f);
	if (loc->version == 0 && found_v2) {
		snprintf(loc->mount, sizeof(loc->mount), "%s", v2_mount);
		snprintf(root, root_size, "%s", v2_root);
		loc->version = 2;
	}
	return loc->version == 0 ? -ENOENT : 0;
}

/* The caller's cgroup path within the hierarchy of the given version. */
static int self_cgroup(int version, char *out, size_t size)
{
	FILE *f = fopen("/proc/self/cgroup", "re");
	char *line = NULL;
	size_t cap = 0;
	int rc = -ENOENT;

	if (f == NULL)
		return -errno;
	while (getline(&line, &cap, f) >= 0) {
		char *c1 = strchr(line, ':'), *c2;

		if (c1 == NULL || (c2 = strchr(c1 + 1, ':')) == NULL)
			continue;
		*c2 = '\0';
		c2[1 + strcspn(c2 + 1, "\n")] = '\0';
		if ((version == 1 && list_has(c1 + 1, "memory", ",")) ||
		    (version == 2 && strncmp(line, "0:", 2) == 0 && c1[1] == '\0')) {
			int n = snprintf(out, size, "%s", c2 + 1);

			rc = n < 0 || (size_t)n >= size ? -ENAMETOOLONG : 0;
			break;
		}
	}
	free(line);
	fclose(f);
	return rc;
}

/* Locate the controller and the caller's directory in it. */
static int locate(struct cg_loc *loc, struct sp_error *err)
{
	char root[PATH_MAX], rel[PATH_MAX];
	const char *sub;
	size_t rl;
	int rc, n;

	rc = find_mount(loc, root, sizeof(root));
	if (rc != 0)
		return sp_error_set(err, rc == -ENOENT ? -ENOENT : rc,
				    "acct: no memory cgroup controller is mounted "
				    "(neither cgroup v1 \"memory\" nor cgroup v2 "
				    "with memory in cgroup.controllers)");
	rc = self_cgroup(loc->version, rel, sizeof(rel));
	if (rc != 0)
		return sp_error_set(err, rc, "acct: cannot find this process's "
				    "memory cgroup in /proc/self/cgroup: %s",
				    sp_strerror(rc));
	/* A mount of a sub-tree (containers) shows paths below its root. */
	rl = strlen(root);
	sub = rel;
	if (strcmp(root, "/") != 0) {
		if (strncmp(rel, root, rl) == 0 && (rel[rl] == '/' || rel[rl] == '\0'))
			sub = rel + rl;
		else
			sub = "";   /* outside the mount: use the mount root */
	}
	while (*sub == '/')
		sub++;
	n = snprintf(loc->self, sizeof(loc->self), "%s%s%s", loc->mount,
		     *sub != '\0' ? "/" : "", sub);
	if (n < 0 || (size_t)n >= sizeof(loc->self))
		return sp_error_set(err, -ENAMETOOLONG, "acct: cgroup path too long");
	return 0;
}

/* ---- open / attach ------------------------------------------------------ */

static bool tag_ok(const char *tag)
{
	size_t n = strlen(tag);

	if (n == 0 || n > SP_ACCT_TAG_MAX)
		return false;
	for (const char *p = tag; *p != '\0'; p++) {
		char c = *p;

		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		      (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.'))
			return false;
	}
	return strcmp(tag, ".") != 0 && strcmp(tag, "..") != 0;
}

static bool cgroup_empty(const char *dir)
{
	char path[PATH_MAX], buf[64];

	if (path_join(path, sizeof(path), dir, "cgroup.procs") != 0 ||
	    read_text(path, buf, sizeof(buf)) != 0)
		return false;
	return buf[0] == '\0';
}

/*
 * mkdir the run's cgroup in parent. An existing directory of that name
 * with no tasks is a leftover of a killed earlier run whose pid we now
 * have (the name carries a per-process sequence number, so it cannot be
 * one of ours): remove it and retry once.
 */
static int make_dir(const char *parent, const char *name, char *out, size_t size)
{
	int rc = path_join(out, size, parent, name);

	if (rc != 0)
		return rc;
	if (mkdir(out, 0755) == 0)
		return 0;
	if (errno != EEXIST)
		return -errno;
	if (!cgroup_empty(out) || rmdir(out) != 0)
		return -EEXIST;
	return mkdir(out, 0755) == 0 ? 0 : -errno;
}

static bool has_memory_files(const struct sp_acct *a)
{
	return read_int_file(a->path, a->version == 1 ? "memory.usage_in_bytes"
						       : "memory.current") >= 0;
}

int sp_acct_open(struct sp_acct **out, const char *tag, struct sp_error *err)
{
	static atomic_uint seq;
	struct cg_loc loc;
	struct sp_acct *a;
	char name[SP_ACCT_TAG_MAX + 64];
	const char *parents[2];
	unsigned int nth;
	int np = 0, rc = -ENOENT;

	if (out == NULL)
		return sp_error_set(err, -EINVAL, "acct: out is NULL");
	*out = NULL;
	if (tag == NULL)
		tag = "run";
	if (!tag_ok(tag))
		return sp_error_set(err, -EINVAL, "acct: tag \"%.*s\" must be 1-%d "
				    "characters of [A-Za-z0-9._-]",
				    SP_ACCT_TAG_MAX, tag, SP_ACCT_TAG_MAX);
	rc = locate(&loc, err);
	if (rc != 0)
		return rc;

	a = calloc(1, sizeof(*a));
	if (a == NULL)
		return sp_error_set(err, -ENOMEM, "acct: out of memory");
	a->version = loc.version;
	a->opener = getpid();
	snprintf(a->orig, sizeof(a->orig), "%s", loc.self);

	if (loc.version == 1) {
		parents[np++] = loc.self;
		if (strcmp(loc.self, loc.mount) != 0)
			parents[np++] = loc.mount;
	} else {
		if (v2_lists_memory(loc.self, "cgroup.subtree_control"))
			parents[np++] = loc.self;
		else if (strcmp(loc.self, loc.mount) != 0 &&
			 v2_lists_memory(loc.mount, "cgroup.subtree_control"))
			parents[np++] = loc.mount;
		if (np == 0) {
			free(a);
			return sp_error_set(err, -ENOENT, "acct: cgroup v2 at %s: "
					    "memory is not enabled in cgroup.subtree_control "
					    "of %s or the root; samepage does not change that",
					    loc.mount, loc.self);
		}
	}

	nth = atomic_fetch_add(&seq, 1);
	if (nth == 0)
		snprintf(name, sizeof(name), "samepage-%s-%d", tag, (int)a->opener);
	else
		snprintf(name, sizeof(name), "samepage-%s-%d.%u", tag,
			 (int)a->opener, nth + 1);

	for (int i = 0; i < np; i++) {
		rc = make_dir(parents[i], name, a->path, sizeof(a->path));
		if (rc == 0) {
			snprintf(a->parent, sizeof(a->parent), "%s", parents[i]);
			break;
		}
		if (rc != -EACCES && rc != -EPERM && rc != -EROFS)
			break;
	}
	if (rc != 0) {
		int code = rc == -EACCES || rc == -EROFS ? -EPERM : rc;

		sp_error_set(err, code, "acct: cannot create memory cgroup %s: %s%s",
			     name, sp_strerror(rc),
			     code == -EPERM ? " (needs root or a delegated cgroup)" : "");
		free(a);
		return code;
	}
	if (!has_memory_files(a)) {
		rmdir(a->path);
		sp_error_set(err, -ENOENT, "acct: %s has no memory controller files",
			     a->path);
		free(a);
		return -ENOENT;
	}
	*out = a;
	return 0;
}

static int move_pid(const char *dir, pid_t pid)
{
	char path[PATH_MAX], num[32];
	int rc = path_join(path, sizeof(path), dir, "cgroup.procs");

	if (rc != 0)
		return rc;
	snprintf(num, sizeof(num), "%d", (int)pid);
	return write_text(path, num);
}

int sp_acct_attach(struct sp_acct *a, pid_t pid, struct sp_error *err)
{
	int rc;

	if (a == NULL || pid < 0)
		return sp_error_set(err, -EINVAL, "acct: attach: bad arguments");
	if (pid == 0)
		pid = getpid();
	rc = move_pid(a->path, pid);
	if (rc != 0)
		return sp_error_set(err, rc, "acct: cannot move pid %d into %s: %s",
				    (int)pid, a->path, sp_strerror(rc));
	return 0;
}

const char *sp_acct_path(const struct sp_acct *a)
{
	return a == NULL ? "" : a->path;
}

/* ---- sampling ----------------------------------------------------------- */

static int sample_v1(const struct sp_acct *a, struct sp_mem_sample *s)
{
	char path[PATH_MAX];
	int64_t rss, cache, shmem, mapped, t_rss, t_cache, t_shmem, t_mapped;
	const struct kv kv[] = {
		{ "rss", &rss }, { "cache", &cache }, { "shmem", &shmem },
		{ "mapped_file", &mapped },
		{ "total_rss", &t_rss }, { "total_cache", &t_cache },
		{ "total_shmem", &t_shmem }, { "total_mapped_file", &t_mapped },
	};
	int rc;

	s->usage_bytes = read_int_file(a->path, "memory.usage_in_bytes");
	s->kmem_bytes = read_int_file(a->path, "memory.kmem.usage_in_bytes");
	rc = path_join(path, sizeof(path), a->path, "memory.stat");
	if (rc == 0)
		rc = read_kv(path, kv, sizeof(kv) / sizeof(kv[0]));
	if (rc != 0)
		return rc;
	/* total_* include descendants; prefer them when the kernel has them. */
	s->anon_bytes = t_rss >= 0 ? t_rss : rss;
	s->cache_bytes = t_cache >= 0 ? t_cache : cache;
	s->shmem_bytes = t_shmem >= 0 ? t_shmem : shmem;
	s->mapped_file_bytes = t_mapped >= 0 ? t_mapped : mapped;
	return s->usage_bytes < 0 ? -ENOENT : 0;
}

static int sample_v2(const struct sp_acct *a, struct sp_mem_sample *s)
{
	char path[PATH_MAX];
	int64_t kernel, stack, pt, spt, percpu, slab, vmalloc;
	const struct kv kv[] = {
		{ "anon", &s->anon_bytes }, { "file", &s->cache_bytes },
		{ "shmem", &s->shmem_bytes }, { "file_mapped", &s->mapped_file_bytes },
		{ "kernel", &kernel }, { "kernel_stack", &stack },
		{ "pagetables", &pt }, { "sec_pagetables", &spt },
		{ "percpu", &percpu }, { "slab", &slab }, { "vmalloc", &vmalloc },
	};
	int rc;

	s->usage_bytes = read_int_file(a->path, "memory.current");
	rc = path_join(path, sizeof(path), a->path, "memory.stat");
	if (rc == 0)
		rc = read_kv(path, kv, sizeof(kv) / sizeof(kv[0]));
	if (rc != 0)
		return rc;
	if (kernel >= 0) {
		s->kmem_bytes = kernel;
	} else {
		/* Before Linux 5.18 there is no "kernel" line: add its parts. */
		const int64_t parts[] = { stack, pt, spt, percpu, slab, vmalloc };

		s->kmem_bytes = -1;
		for (size_t i = 0; i < sizeof(parts) / sizeof(parts[0]); i++) {
			if (parts[i] >= 0)
				s->kmem_bytes = (s->kmem_bytes < 0 ? 0 : s->kmem_bytes) +
						parts[i];
		}
	}
	return s->usage_bytes < 0 ? -ENOENT : 0;
}

int sp_acct_sample(struct sp_acct *a, struct sp_mem_sample *s,
		   struct sp_error *err)
{
	const struct kv mi[] = {
		{ "SecPageTables", &s->sec_pagetables_bytes },
		{ "PageTables", &s->pagetables_bytes },
	};
	int rc;

	if (a == NULL || s == NULL)
		return sp_error_set(err, -EINVAL, "acct: sample: bad arguments");
	rc = a->version == 1 ? sample_v1(a, s) : sample_v2(a, s);
	if (rc != 0)
		return sp_error_set(err, rc, "acct: cannot read the counters of %s: %s",
				    a->path, sp_strerror(rc));
	rc = read_kv("/proc/meminfo", mi, sizeof(mi) / sizeof(mi[0]));
	if (rc != 0)
		return sp_error_set(err, rc, "acct: cannot read /proc/meminfo: %s",
				    sp_strerror(rc));
	return 0;
}

/* ---- close -------------------------------------------------------------- */

/* Is the calling process in the cgroup directory dir? */
static bool self_in(const struct sp_acct *a, const char *dir)
{
	struct cg_loc loc;

	if (locate(&loc, NULL) != 0 || loc.version != a->version)
		return false;
	return strcmp(loc.self, dir) == 0;
}

/* Move every task still in the run's cgroup to the parent. */
static void evacuate(const struct sp_acct *a)
{
	char path[PATH_MAX], *line = NULL;
	size_t cap = 0;
	FILE *f;

	if (path_join(path, sizeof(path), a->path, "cgroup.procs") != 0)
		return;
	f = fopen(path, "re");
	if (f == NULL)
		return;
	while (getline(&line, &cap, f) >= 0) {
		long pid = strtol(line, NULL, 10);

		if (pid > 0)
			(void)move_pid(a->parent, (pid_t)pid);  /* exiting: ESRCH */
	}
	free(line);
	fclose(f);
}

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

int sp_acct_release(struct sp_acct *a, struct sp_error *err)
{
	int rc = 0, waited_ms = 0;

	if (a == NULL)
		return 0;
	if (self_in(a, a->path)) {
		rc = move_pid(a->orig, getpid());
		if (rc != 0)   /* the original may be gone; the parent will do */
			rc = move_pid(a->parent, getpid());
	}
	for (;;) {
		evacuate(a);
		if (rmdir(a->path) == 0 || errno == ENOENT) {
			rc = 0;
			break;
		}
		rc = -errno;
		if (rc != -EBUSY || waited_ms >= SP_ACCT_RMDIR_WAIT_MS)
			break;
		sleep_ms(SP_ACCT_RMDIR_STEP_MS);
		waited_ms += SP_ACCT_RMDIR_STEP_MS;
	}
	if (rc != 0)
		sp_error_set(err, rc, "acct: cannot remove %s: %s", a->path,
			     sp_strerror(rc));
	free(a);
	return rc;
}

void sp_acct_close(struct sp_acct *a)
{
	(void)sp_acct_release(a, NULL);
}

/* ---- stale runs --------------------------------------------------------- */

/*
 * Does "samepage-<tag>-<pid>[.<n>]" name a run whose process is gone?
 * The tag may hold '-' and '.', but the text after the last '-' is always
 * the pid, optionally followed by the per-process sequence number.
 */
static bool run_is_dead(const char *name)
{
	const char *last = strrchr(name, '-');
	char *end;
	long v;

	if (last == NULL)
		return false;
	v = strtol(last + 1, &end, 10);
	if (end == last + 1 || (*end != '\0' && *end != '.') || v <= 0 || v > INT_MAX)
		return false;
	return kill((pid_t)v, 0) != 0 && errno == ESRCH;
}

static unsigned int reap_in(const char *dir)
{
	unsigned int n = 0;
	struct dirent *de;
	DIR *d = opendir(dir);

	if (d == NULL)
		return 0;
	while ((de = readdir(d)) != NULL) {
		char path[PATH_MAX];

		if (strncmp(de->d_name, "samepage-", 9) != 0 || !run_is_dead(de->d_name))
			continue;
		if (path_join(path, sizeof(path), dir, de->d_name) == 0 &&
		    cgroup_empty(path) && rmdir(path) == 0)
			n++;
	}
	closedir(d);
	return n;
}

int sp_acct_reap_stale(unsigned int *removed, struct sp_error *err)
{
	struct cg_loc loc;
	unsigned int n;
	int rc = locate(&loc, err);

	if (removed != NULL)
		*removed = 0;
	if (rc != 0)
		return rc;
	n = reap_in(loc.self);
	if (strcmp(loc.self, loc.mount) != 0)
		n += reap_in(loc.mount);
	if (removed != NULL)
		*removed = n;
	return 0;
}

/* ---- per-process view ----------------------------------------------------- */

int sp_acct_proc(pid_t pid, struct sp_proc_mem *m, struct sp_error *err)
{
	char path[64];
	const struct kv roll[] = {
		{ "Rss", &m->rss_bytes }, { "Pss", &m->pss_bytes },
		{ "Pss_Anon", &m->pss_anon_bytes }, { "Pss_File", &m->pss_file_bytes },
		{ "Pss_Shmem", &m->pss_shmem_bytes }, { "Anonymous", &m->anon_bytes },
	};
	const struct kv st[] = { { "VmPTE", &m->pte_bytes } };
	int rc;

	if (m == NULL || pid < 0)
		return sp_error_set(err, -EINVAL, "acct: proc: bad arguments");
	if (pid == 0)
		pid = getpid();
	snprintf(path, sizeof(path), "/proc/%d/smaps_rollup", (int)pid);
	rc = read_kv(path, roll, sizeof(roll) / sizeof(roll[0]));
	if (rc == -ENOENT)
		rc = -ESRCH;
	if (rc == 0 && m->rss_bytes < 0)
		rc = -ESRCH;   /* an exited task or a kernel thread: no mm */
	if (rc != 0)
		return sp_error_set(err, rc, "acct: cannot read %s: %s", path,
				    rc == -ESRCH ? "no such process or no memory map"
						 : sp_strerror(rc));
	snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
	rc = read_kv(path, st, 1);
	if (rc != 0)
		return sp_error_set(err, rc == -ENOENT ? -ESRCH : rc,
				    "acct: cannot read %s: %s", path, sp_strerror(rc));
	return 0;
}
