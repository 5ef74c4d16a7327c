/* SPDX-License-Identifier: MIT */
/*
 * Tests of samepage's memory accounting (lib/acct): a run's memory cgroup
 * sees exactly the memory its processes allocate (anonymous, shmem, page
 * tables in kmem), closing it leaves nothing behind and puts the caller
 * back where it was, PSS splits a shared mapping between its mappers, and
 * the density arithmetic gives the hand-computed row. The cgroup cases
 * need root; without it the rest run and the binary reports a skip.
 */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>

#include "samepage/acct.h"
#include "testutil.h"

#define MiB (1024.0 * 1024.0)

/* /proc/<pid>/cgroup, whole (pid 0: self). */
static void read_cgroup_file(pid_t pid, char *buf, size_t size)
{
	char path[64];
	FILE *f;
	size_t n;

	if (pid == 0)
		snprintf(path, sizeof(path), "/proc/self/cgroup");
	else
		snprintf(path, sizeof(path), "/proc/%d/cgroup", (int)pid);
	f = fopen(path, "re");
	ck_assert_ptr_nonnull(f);
	n = fread(buf, 1, size - 1, f);
	buf[n] = '\0';
	fclose(f);
}

/* Cgroups a test has open, closed at exit. A failing ck_assert _exit()s
 * the test process without running this; the runner then removes what it
 * left with sp_acct_reap_stale() (reap_after, an unchecked fixture). */
static struct sp_acct *open_runs[4];

static void close_open_runs(void)
{
	for (size_t i = 0; i < sizeof(open_runs) / sizeof(open_runs[0]); i++) {
		sp_acct_close(open_runs[i]);
		open_runs[i] = NULL;
	}
}

static struct sp_acct *open_run(const char *tag)
{
	static bool registered;
	struct sp_error err = { 0 };
	struct sp_acct *a = NULL;
	int rc;

	if (!registered) {
		ck_assert_int_eq(atexit(close_open_runs), 0);
		registered = true;
	}
	rc = sp_acct_open(&a, tag, &err);
	ck_assert_msg(rc == 0, "sp_acct_open: %s", err.msg);
	for (size_t i = 0; i < sizeof(open_runs) / sizeof(open_runs[0]); i++) {
		if (open_runs[i] == NULL) {
			open_runs[i] = a;
			return a;
		}
	}
	ck_abort_msg("too many open runs");
	return NULL;
}

/* sp_acct_release() of a run opened with open_run(). */
static int release_run(struct sp_acct *a, struct sp_error *err)
{
	for (size_t i = 0; i < sizeof(open_runs) / sizeof(open_runs[0]); i++) {
		if (open_runs[i] == a)
			open_runs[i] = NULL;
	}
	return sp_acct_release(a, err);
}

static void xwrite1(int fd)
{
	ck_assert_int_eq(write(fd, "x", 1), 1);
}

static void xread1(int fd)
{
	char c;

	ck_assert_int_eq(read(fd, &c, 1), 1);
}

static void child_signal(int fd)
{
	if (write(fd, "x", 1) != 1)
		_exit(3);
}

static void child_wait(int fd)
{
	char c;

	if (read(fd, &c, 1) != 1)
		_exit(4);
}

static double d_bytes(int64_t a, int64_t b)
{
	ck_assert_int_ge(a, 0);
	ck_assert_int_ge(b, 0);
	return (double)b - (double)a;
}

static void reap_ok(pid_t pid)
{
	int st;

	ck_assert_int_eq(waitpid(pid, &st, 0), pid);
	ck_assert(WIFEXITED(st));
	ck_assert_int_eq(WEXITSTATUS(st), 0);
}

/* (1) The caller attaches, a child born inside touches 64 MiB; close puts
 * the caller back and removes the cgroup. */
START_TEST(anon_charged_and_close_restores)
{
	char before[4096], during[4096], after[4096], path[PATH_MAX];
	struct sp_error err = { 0 };
	struct sp_mem_sample s0, s1;
	struct sp_acct *a;
	int ready[2], go[2];
	pid_t pid;

	read_cgroup_file(0, before, sizeof(before));
	a = open_run("test");
	snprintf(path, sizeof(path), "%s", sp_acct_path(a));
	ck_assert_msg(strstr(path, "/samepage-test-") != NULL, "%s", path);
	ck_assert_int_eq(access(path, F_OK), 0);
	ck_assert_msg(sp_acct_attach(a, 0, &err) == 0, "%s", err.msg);
	read_cgroup_file(0, during, sizeof(during));
	ck_assert_str_ne(before, during);

	ck_assert_msg(sp_acct_sample(a, &s0, &err) == 0, "%s", err.msg);
	ck_assert_int_eq(pipe(ready), 0);
	ck_assert_int_eq(pipe(go), 0);
	pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		size_t len = 64u << 20;
		char *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
			       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (p == MAP_FAILED)
			_exit(2);
		memset(p, 0x5a, len);
		child_signal(ready[1]);
		child_wait(go[0]);
		_exit(0);
	}
	xread1(ready[0]);
	ck_assert_msg(sp_acct_sample(a, &s1, &err) == 0, "%s", err.msg);
	xwrite1(go[1]);
	reap_ok(pid);

	double anon = d_bytes(s0.anon_bytes, s1.anon_bytes);
	double usage = d_bytes(s0.usage_bytes, s1.usage_bytes);

	ck_assert_msg(anon >= 64 * MiB && anon < 80 * MiB, "anon +%.1f MiB", anon / MiB);
	ck_assert_msg(usage >= 64 * MiB && usage < 80 * MiB, "usage +%.1f MiB", usage / MiB);
	ck_assert_int_ge(s1.pagetables_bytes, 0);

	ck_assert_msg(release_run(a, &err) == 0, "%s", err.msg);
	ck_assert_int_ne(access(path, F_OK), 0);
	ck_assert_int_eq(errno, ENOENT);
	read_cgroup_file(0, after, sizeof(after));
	ck_assert_str_eq(before, after);
}
END_TEST

/* (2) A 32 MiB memfd written inside the cgroup is shmem (and cache). */
START_TEST(memfd_is_shmem)
{
	struct sp_error err = { 0 };
	struct sp_mem_sample s0, s1;
	struct sp_acct *a;
	size_t len = 32u << 20, chunk = 1u << 20;
	char *buf = malloc(chunk);
	int fd;

	ck_assert_ptr_nonnull(buf);
	memset(buf, 0xa5, chunk);
	a = open_run("shmem");
	ck_assert_msg(sp_acct_attach(a, 0, &err) == 0, "%s", err.msg);
	ck_assert_msg(sp_acct_sample(a, &s0, &err) == 0, "%s", err.msg);
	fd = memfd_create("sp-acct-test", MFD_CLOEXEC);
	ck_assert_int_ge(fd, 0);
	for (size_t off = 0; off < len; off += chunk)
		ck_assert_int_eq(pwrite(fd, buf, chunk, (off_t)off), (ssize_t)chunk);
	ck_assert_msg(sp_acct_sample(a, &s1, &err) == 0, "%s", err.msg);

	double shmem = d_bytes(s0.shmem_bytes, s1.shmem_bytes);
	double cache = d_bytes(s0.cache_bytes, s1.cache_bytes);
	double held = d_bytes(s0.usage_bytes - s0.cache_bytes + s0.shmem_bytes,
			      s1.usage_bytes - s1.cache_bytes + s1.shmem_bytes);

	ck_assert_msg(shmem >= 32 * MiB && shmem < 36 * MiB, "shmem +%.1f MiB", shmem / MiB);
	ck_assert_msg(cache >= 32 * MiB, "cache +%.1f MiB", cache / MiB);
	ck_assert_msg(held >= 31 * MiB && held < 40 * MiB, "held +%.3f MiB", held / MiB);
	close(fd);
	free(buf);
	ck_assert_msg(release_run(a, &err) == 0, "%s", err.msg);
}
END_TEST

/* (3) Two processes touching all of one 16 MiB MAP_SHARED memfd: each is
 * charged half of it in PSS and all of it in RSS. */
START_TEST(pss_splits_shared_memfd)
{
	size_t len = 16u << 20;
	struct sp_error err = { 0 };
	struct sp_proc_mem c0, c1, me;
	int ready[2], go[2], fd;
	volatile char *p;
	pid_t pid;

	fd = memfd_create("sp-acct-pss", MFD_CLOEXEC);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(ftruncate(fd, (off_t)len), 0);
	ck_assert_int_eq(pipe(ready), 0);
	ck_assert_int_eq(pipe(go), 0);
	pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		volatile char *q;
		unsigned sum = 0;

		child_signal(ready[1]);
		child_wait(go[0]);
		q = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		if (q == MAP_FAILED)
			_exit(2);
		for (size_t off = 0; off < len; off += 4096)
			sum += (unsigned)q[off];
		child_signal(ready[1]);
		child_wait(go[0]);
		_exit(sum == 0 ? 5 : 0);   /* the parent wrote 1s */
	}
	p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	ck_assert_ptr_ne((void *)p, MAP_FAILED);
	for (size_t off = 0; off < len; off += 4096)
		p[off] = 1;
	xread1(ready[0]);
	ck_assert_msg(sp_acct_proc(pid, &c0, &err) == 0, "%s", err.msg);
	xwrite1(go[1]);
	xread1(ready[0]);
	ck_assert_msg(sp_acct_proc(pid, &c1, &err) == 0, "%s", err.msg);
	ck_assert_msg(sp_acct_proc(0, &me, &err) == 0, "%s", err.msg);
	xwrite1(go[1]);
	reap_ok(pid);

	double rss = d_bytes(c0.rss_bytes, c1.rss_bytes);
	double half = 8 * MiB;

	ck_assert_msg(rss >= 16 * MiB && rss < 17.6 * MiB, "child rss +%.1f MiB", rss / MiB);
	ck_assert_msg(fabs((double)c1.pss_shmem_bytes - half) <= 0.1 * half,
		      "child pss_shmem %.2f MiB", c1.pss_shmem_bytes / MiB);
	ck_assert_msg(fabs((double)me.pss_shmem_bytes - half) <= 0.1 * half,
		      "parent pss_shmem %.2f MiB", me.pss_shmem_bytes / MiB);
	ck_assert_int_ge(c1.pss_bytes, c1.pss_shmem_bytes);
	ck_assert_int_ge(c1.pss_anon_bytes, 0);
	ck_assert_int_ge(c1.pss_file_bytes, 0);
	ck_assert_int_ge(c1.anon_bytes, 0);
	ck_assert_int_gt(c1.pte_bytes, 0);
	munmap((void *)p, len);
	close(fd);
}
END_TEST

/* (4) The density row computed by hand. All figures in MiB. */
static struct sp_mem_sample mib_sample(double usage, double kmem, double anon,
				       double cache, double shmem, double sec,
				       double pt)
{
	struct sp_mem_sample s = {
		.usage_bytes = (int64_t)(usage * MiB), .kmem_bytes = (int64_t)(kmem * MiB),
		.anon_bytes = (int64_t)(anon * MiB), .cache_bytes = (int64_t)(cache * MiB),
		.shmem_bytes = (int64_t)(shmem * MiB), .mapped_file_bytes = -1,
		.sec_pagetables_bytes = (int64_t)(sec * MiB),
		.pagetables_bytes = (int64_t)(pt * MiB),
	};
	return s;
}

#define ck_mib(v, want) \
	ck_assert_msg(fabs((v) - (want) * MiB) < 1.0, "%s = %.6f MiB, want %.6f", \
		      #v, (v) / MiB, (double)(want))

START_TEST(density_by_hand)
{
	/* 4 clones of 256 MiB; template 256 MiB of shmem; each clone adds
	 * 3 MiB anon, 0.5 MiB page tables, 0.5 MiB shadow page tables and
	 * 1 MiB other kernel memory (kmem and usage both see all kernel). */
	struct sp_mem_sample base = mib_sample(100, 10, 20, 50, 5, 1, 2);
	struct sp_mem_sample tmpl = mib_sample(356, 10, 20, 306, 261, 1, 2);
	struct sp_mem_sample end = mib_sample(376, 18, 32, 306, 261, 3, 4);
	struct sp_density d;

	sp_density_compute(&d, 4, 256u << 20, &base, &tmpl, &end, 2 * MiB, 300 * MiB);
	ck_assert_uint_eq(d.clones, 4);
	ck_assert_uint_eq(d.guest_bytes, 256u << 20);
	ck_mib(d.naive_bytes, 1024);
	ck_mib(d.increase_bytes, 276);       /* (376-306+261) - (100-50+5) */
	ck_mib(d.template_bytes, 256);
	ck_mib(d.per_vm_bytes, 5);           /* (276 - 256) / 4 */
	ck_assert(fabs(d.ratio - 1024.0 / 276.0) < 1e-9);
	ck_mib(d.private_anon_bytes, 12);
	ck_mib(d.pagetables_bytes, 2);
	ck_mib(d.kvm_pagetables_bytes, 2);
	ck_mib(d.other_kernel_bytes, 4);     /* 8 - 2 - 2 */
	ck_mib(d.pss_sum_bytes, 300);

	/* copy mode: no template step */
	sp_density_compute(&d, 4, 256u << 20, &base, NULL, &end, 2 * MiB, NAN);
	ck_mib(d.template_bytes, 0);
	ck_mib(d.per_vm_bytes, 69);
	ck_assert(isnan(d.pss_sum_bytes));

	/* unknown inputs give NAN, not invented zeros */
	end.kmem_bytes = -1;
	base.sec_pagetables_bytes = -1;
	sp_density_compute(&d, 0, 256u << 20, &base, &tmpl, &end, 2 * MiB, 0);
	ck_assert(isnan(d.per_vm_bytes));
	ck_assert(isnan(d.kvm_pagetables_bytes));
	ck_assert(isnan(d.other_kernel_bytes));
	ck_mib(d.increase_bytes, 276);
	end.kmem_bytes = (int64_t)(18 * MiB);
	sp_density_compute(&d, 4, 256u << 20, &base, &tmpl, &end, 2 * MiB, 0);
	ck_mib(d.other_kernel_bytes, 6);     /* unknown SecPageTables taken as 0 */
	end.usage_bytes = -1;
	sp_density_compute(&d, 4, 256u << 20, &base, &tmpl, &end, 2 * MiB, 0);
	ck_assert(isnan(d.increase_bytes));
	ck_assert(isnan(d.ratio));
	ck_assert(isnan(d.per_vm_bytes));

	/* other_kernel never goes negative */
	end = mib_sample(376, 11, 32, 306, 261, 3, 4);
	sp_density_compute(&d, 4, 256u << 20, &base, &tmpl, &end, 2 * MiB, 0);
	ck_mib(d.other_kernel_bytes, 0);
}
END_TEST

/* (5) Error and cleanup paths that need no cgroup. */
START_TEST(bad_arguments)
{
	struct sp_error err = { 0 };
	struct sp_proc_mem m;
	struct sp_acct *a = (struct sp_acct *)&err;

	sp_acct_close(NULL);
	ck_assert_int_eq(sp_acct_release(NULL, &err), 0);
	ck_assert_int_eq(sp_acct_open(&a, "../escape", &err), -EINVAL);
	ck_assert_ptr_null(a);
	ck_assert_int_eq(err.code, -EINVAL);
	ck_assert_int_eq(sp_acct_open(&a, "", &err), -EINVAL);
	ck_assert_int_eq(sp_acct_open(NULL, "x", &err), -EINVAL);
	ck_assert_int_eq(sp_acct_proc(-1, &m, &err), -EINVAL);
	ck_assert_int_eq(sp_acct_proc(INT_MAX, &m, &err), -ESRCH);
	ck_assert_ptr_nonnull(strstr(err.msg, "smaps_rollup"));
	ck_assert_int_eq(sp_acct_proc(0, &m, &err), 0);
	ck_assert_int_gt(m.rss_bytes, 0);
	ck_assert_int_ge(m.pss_bytes, 0);
	ck_assert_int_gt(m.pte_bytes, 0);
	ck_assert_str_eq(sp_acct_path(NULL), "");
}
END_TEST

/* (5b) Close with a live task still inside: it moves to the parent and
 * the cgroup is removed anyway; open without attach also cleans up; two
 * runs in one process get distinct cgroups. */
START_TEST(close_with_task_inside)
{
	char before[4096], child_cg[4096], path[PATH_MAX], path2[PATH_MAX];
	struct sp_error err = { 0 };
	struct sp_acct *a, *b;
	int ready[2];
	pid_t pid;

	read_cgroup_file(0, before, sizeof(before));
	a = open_run("busy");
	b = open_run("busy");
	snprintf(path, sizeof(path), "%s", sp_acct_path(a));
	snprintf(path2, sizeof(path2), "%s", sp_acct_path(b));
	ck_assert_str_ne(path, path2);
	ck_assert_msg(release_run(b, &err) == 0, "%s", err.msg);
	ck_assert_int_ne(access(path2, F_OK), 0);

	ck_assert_int_eq(pipe(ready), 0);
	pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		if (sp_acct_attach(a, 0, NULL) != 0)
			_exit(2);
		child_signal(ready[1]);
		pause();
		_exit(0);
	}
	xread1(ready[0]);
	ck_assert_msg(release_run(a, &err) == 0, "%s", err.msg);
	ck_assert_int_ne(access(path, F_OK), 0);
	read_cgroup_file(pid, child_cg, sizeof(child_cg));
	ck_assert_str_eq(before, child_cg);     /* back in our cgroup */
	kill(pid, SIGKILL);
	ck_assert_int_eq(waitpid(pid, NULL, 0), pid);
}
END_TEST

/* (5c) A run whose process died without closing is reaped; live runs
 * are not. */
START_TEST(reap_removes_dead_runs)
{
	char path[PATH_MAX];
	struct sp_error err = { 0 };
	struct sp_acct *live;
	unsigned int n = 0;
	int fds[2];
	pid_t pid;

	live = open_run("live");
	ck_assert_int_eq(pipe(fds), 0);
	pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		struct sp_acct *a;
		size_t len;

		if (sp_acct_open(&a, "dead-1", NULL) != 0)
			_exit(2);
		len = strlen(sp_acct_path(a));
		if (write(fds[1], sp_acct_path(a), len) != (ssize_t)len)
			_exit(3);
		_exit(0);   /* no close: the cgroup is left behind */
	}
	close(fds[1]);
	ssize_t got = read(fds[0], path, sizeof(path) - 1);

	ck_assert_int_gt(got, 0);
	path[got] = '\0';
	reap_ok(pid);
	ck_assert_int_eq(access(path, F_OK), 0);
	ck_assert_msg(sp_acct_reap_stale(&n, &err) == 0, "%s", err.msg);
	ck_assert_uint_ge(n, 1);
	ck_assert_int_ne(access(path, F_OK), 0);
	ck_assert_int_eq(access(sp_acct_path(live), F_OK), 0);
	ck_assert_msg(release_run(live, &err) == 0, "%s", err.msg);
}
END_TEST

/*
 * (6) What the breakdown relies on: page tables are charged to kmem (and
 * kmem to usage). A child in the cgroup read-touches one byte per 2 MiB of
 * an 8 GiB sparse mapping: 4096 page-table pages (16 MiB), no data pages
 * (reads map the shared zero page).
 */
START_TEST(pagetables_are_in_kmem)
{
	size_t len = (size_t)8 << 30, step = 2u << 20;
	struct sp_error err = { 0 };
	struct sp_mem_sample s0, s1;
	struct sp_proc_mem p0, p1;
	struct sp_acct *a;
	int ready[2], go[2];
	pid_t pid;

	a = open_run("pte");
	ck_assert_int_eq(pipe(ready), 0);
	ck_assert_int_eq(pipe(go), 0);
	pid = fork();
	ck_assert_int_ge(pid, 0);
	if (pid == 0) {
		volatile char *p;
		unsigned sum = 0;

		if (sp_acct_attach(a, 0, NULL) != 0)
			_exit(2);
		p = mmap(NULL, len, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
			 -1, 0);
		if (p == MAP_FAILED || madvise((void *)p, len, MADV_NOHUGEPAGE) != 0)
			_exit(3);
		child_signal(ready[1]);
		child_wait(go[0]);
		for (size_t off = 0; off < len; off += step)
			sum += (unsigned)p[off];
		child_signal(ready[1]);
		child_wait(go[0]);
		_exit(sum == 0 ? 0 : 4);
	}
	xread1(ready[0]);
	ck_assert_msg(sp_acct_sample(a, &s0, &err) == 0, "%s", err.msg);
	ck_assert_msg(sp_acct_proc(pid, &p0, &err) == 0, "%s", err.msg);
	xwrite1(go[1]);
	xread1(ready[0]);
	ck_assert_msg(sp_acct_sample(a, &s1, &err) == 0, "%s", err.msg);
	ck_assert_msg(sp_acct_proc(pid, &p1, &err) == 0, "%s", err.msg);
	xwrite1(go[1]);
	reap_ok(pid);

	double pte = d_bytes(p0.pte_bytes, p1.pte_bytes);
	double kmem = d_bytes(s0.kmem_bytes, s1.kmem_bytes);
	double usage = d_bytes(s0.usage_bytes, s1.usage_bytes);
	double anon = d_bytes(s0.anon_bytes, s1.anon_bytes);
	double host_pt = d_bytes(s0.pagetables_bytes, s1.pagetables_bytes);

	fprintf(stderr, "pagetables_are_in_kmem: VmPTE +%.2f MiB, kmem +%.2f MiB, "
		"usage +%.2f MiB, anon +%.2f MiB, host PageTables +%.2f MiB\n",
		pte / MiB, kmem / MiB, usage / MiB, anon / MiB, host_pt / MiB);
	ck_assert_msg(pte >= 15.9 * MiB, "VmPTE +%.2f MiB", pte / MiB);
	ck_assert_msg(kmem >= 0.95 * pte, "kmem +%.2f MiB < VmPTE +%.2f MiB",
		      kmem / MiB, pte / MiB);
	ck_assert_msg(usage >= 0.95 * kmem, "usage +%.2f MiB < kmem +%.2f MiB",
		      usage / MiB, kmem / MiB);
	ck_assert_msg(anon < 1 * MiB, "anon +%.2f MiB", anon / MiB);
	ck_assert_msg(release_run(a, &err) == 0, "%s", err.msg);
}
END_TEST

/* Runs in the runner process after the cgroup cases: a failed case must
 * not leave its cgroup behind. */
static void reap_after(void)
{
	unsigned int n = 0;

	if (sp_acct_reap_stale(&n, NULL) == 0 && n > 0)
		fprintf(stderr, "removed %u cgroup(s) left by failed cases\n", n);
}

int main(void)
{
	Suite *s = suite_create("acct");
	TCase *plain = tcase_create("plain");
	TCase *cg = tcase_create("cgroup");
	bool root = geteuid() == 0;
	int rc;

	tcase_set_timeout(plain, 60);
	tcase_add_test(plain, pss_splits_shared_memfd);
	tcase_add_test(plain, density_by_hand);
	tcase_add_test(plain, bad_arguments);
	suite_add_tcase(s, plain);
	tcase_set_timeout(cg, 60);
	tcase_add_test(cg, anon_charged_and_close_restores);
	tcase_add_test(cg, memfd_is_shmem);
	tcase_add_test(cg, close_with_task_inside);
	tcase_add_test(cg, reap_removes_dead_runs);
	tcase_add_test(cg, pagetables_are_in_kmem);
	tcase_add_unchecked_fixture(cg, NULL, reap_after);
	if (root)
		suite_add_tcase(s, cg);
	rc = sp_test_run(s);
	if (rc == 0 && !root)
		sp_test_require_root("memory cgroup tests (the rest passed)");
	return rc;
}
