/* SPDX-License-Identifier: MIT */
/*
 * The merge engine over real KVM clones (fanout --merge): after the clones'
 * workloads, the owner merges what they made identical, and
 *   - sharing is proven by page frame numbers (pagemap) across clones;
 *   - every clone still reads exactly its own model (the guest checks
 *     every word), before and after one clone writes over merged pages;
 *   - domains keep frames apart; the template and zero page are targets;
 *   - a clone killed mid-life costs the others nothing; an owner killed
 *     leaves every clone running with its memory intact.
 * Skips (exit 77) where /dev/kvm is missing.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "testutil.h"
#include "vmm/clones.h"
#include "vmm/owner.h"
#include "vmm/probe.h"

#define RAM (32ull << 20)
#define NCL 4

static char ckpt_path[64], ctl_path[64];
static char saved_map_count[32];

/* The owner raises vm.max_map_count and puts it back when it exits; the
 * deaths test SIGKILLs an owner, so the suite restores it itself (in the
 * runner process, whatever the tests did). */
static void save_map_count(void)
{
	FILE *f = fopen("/proc/sys/vm/max_map_count", "r");

	if (f) {
		if (!fgets(saved_map_count, sizeof(saved_map_count), f))
			saved_map_count[0] = '\0';
		fclose(f);
	}
}

static void restore_map_count(void)
{
	FILE *f;

	if (!saved_map_count[0])
		return;
	f = fopen("/proc/sys/vm/max_map_count", "w");
	if (f) {
		fputs(saved_map_count, f);
		fclose(f);
	}
}

static void setup(void)
{
	struct sp_snapshot_opts o = { .ram_bytes = RAM, .seed = 7 };
	struct sp_error err = { 0 };
	int fd;

	snprintf(ckpt_path, sizeof(ckpt_path), "/tmp/sp-mtest-XXXXXX");
	fd = mkstemp(ckpt_path);
	ck_assert_int_ge(fd, 0);
	close(fd);
	snprintf(ctl_path, sizeof(ctl_path), "/tmp/sp-mtest-%d.sock", (int)getpid());
	ck_assert_msg(sp_probe_snapshot(ckpt_path, &o, &err) == 0, "snapshot: %s", err.msg);
}

static void teardown(void)
{
	unlink(ckpt_path);
	unlink(ctl_path);
}

static void start(struct sp_fanout *f, const char *wl, uint32_t domains, const char *const *knobs)
{
	struct sp_fanout_opts o = { .ckpt_path = ckpt_path, .mode = SP_FANOUT_COW, .clones = NCL,
				    .concurrency = 2, .jobs = 4, .merge = 1, .domains = domains,
				    .ctl_path = ctl_path, .knobs = knobs };
	struct sp_error err = { 0 };

	ck_assert(sp_probe_parse_workload(wl, &o.kind, &o.bp, &err) == 0);
	ck_assert_msg(sp_fanout_start(f, &o, &err) == 0, "fanout --merge %s: %s", wl, err.msg);
}

static int64_t stat_of(const char *name)
{
	struct sp_error err = { 0 };
	int64_t v = -1;

	ck_assert_msg(sp_ctl_get(ctl_path, name, &v, &err) == 0, "%s: %s", name, err.msg);
	return v;
}

/* Fault the page in from outside (host read) and return its PFN. */
static uint64_t pfn(const struct sp_fanout *f, uint32_t i, uint64_t pg)
{
	char path[64];
	uint64_t word, e = 0, addr = f->clone[i].ram_addr + pg * 4096;
	struct iovec l = { &word, 8 }, r = { (void *)(uintptr_t)addr, 8 };
	int fd;

	ck_assert_int_eq(process_vm_readv(f->clone[i].pid, &l, 1, &r, 1, 0), 8);
	snprintf(path, sizeof(path), "/proc/%d/pagemap", (int)f->clone[i].pid);
	fd = open(path, O_RDONLY);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pread(fd, &e, 8, (off_t)(addr / 4096 * 8)), 8);
	close(fd);
	ck_assert_msg(e >> 63, "page %llu of clone %u not present", (unsigned long long)pg, i);
	return e & ((1ull << 55) - 1);
}

static void verify_all(struct sp_fanout *f, uint64_t kind, uint64_t bp)
{
	struct sp_error err = { 0 };

	for (uint32_t i = 0; i < f->nclones; i++) {
		uint64_t bad = 1;
		if (!f->clone[i].alive)
			continue;
		ck_assert_msg(sp_fanout_verify_one(f, i, kind, bp, &bad, &err) == 0, "%s", err.msg);
		ck_assert_msg(bad == 0, "clone %u: %llu pages differ from its model", i,
			      (unsigned long long)bad);
	}
}

static struct sp_probe_config config_of(struct sp_fanout *f)
{
	struct sp_probe_config c;
	struct iovec l = { &c, sizeof(c) };
	struct iovec r = { (void *)(uintptr_t)(f->clone[0].ram_addr + SP_PROBE_CONFIG_GPA), sizeof(c) };

	ck_assert_int_eq(process_vm_readv(f->clone[0].pid, &l, 1, &r, 1, 0), (ssize_t)sizeof(c));
	ck_assert_uint_eq(c.magic, SP_PROBE_MAGIC);
	return c;
}

/* Identical writes at identical addresses merge onto shared frames; a
 * guest writing over merged pages keeps its writes to itself. */
/* Every clone holds one frame file, only read-only (the flags of its
 * descriptor in /proc/PID/fdinfo); ino[i]: that file's inode. */
static void frame_fds_read_only(const struct sp_fanout *f, ino_t *ino)
{
	for (uint32_t i = 0; i < NCL; i++) {
		char dir[64], path[320], link[256], line[128];
		struct stat sb;
		int found = 0;
		DIR *d;
		struct dirent *de;

		snprintf(dir, sizeof(dir), "/proc/%d/fd", (int)f->clone[i].pid);
		d = opendir(dir);
		ck_assert_ptr_nonnull(d);
		while ((de = readdir(d)) != NULL) {
			ssize_t n;
			FILE *fi;
			unsigned flags = 0;

			snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
			n = readlink(path, link, sizeof(link) - 1);
			if (n <= 0)
				continue;
			link[n] = 0;
			if (!strstr(link, "samepage-frames"))
				continue;
			snprintf(path, sizeof(path), "/proc/%d/fdinfo/%s", (int)f->clone[i].pid,
				 de->d_name);
			fi = fopen(path, "r");
			ck_assert_ptr_nonnull(fi);
			while (fgets(line, sizeof(line), fi))
				if (sscanf(line, "flags: %o", &flags) == 1)
					break;
			fclose(fi);
			ck_assert_msg((flags & O_ACCMODE) == O_RDONLY,
				      "clone %u holds the frame file writable (flags %o)", i, flags);
			snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
			ck_assert_int_eq(stat(path, &sb), 0);
			if (ino)
				ino[i] = sb.st_ino;
			found++;
		}
		closedir(d);
		ck_assert_msg(found == 1, "clone %u holds %d frame file descriptors, not 1", i,
			      found);
	}
}

START_TEST(same_merges_and_writes_stay_private)
{
	struct sp_fanout f;
	struct sp_error err = { 0 };
	struct sp_probe_config c;
	uint64_t sel = 0, shared = 0;

	start(&f, "same:20%", 1, NULL);
	c = config_of(&f);
	for (uint64_t pg = c.first_data_page; pg < c.pages; pg++)
		sel += (uint64_t)sp_probe_wl_sel(&c, pg, 2000);
	/* NCL clones hold the same sel pages: all but one copy is saved */
	ck_assert_int_ge(stat_of("stats.merge.pages_sharing"), (int64_t)((NCL - 1) * sel));
	ck_assert_int_eq(stat_of("stats.merge.converged"), 1);
	/* the owner read clones 0 and 1; the others followed them unread */
	ck_assert_int_ge(stat_of("stats.merge.pages_predicted"), (int64_t)((NCL - 2) * sel));
	ck_assert_int_eq(stat_of("stats.merge.pages_mispredicted"), 0);
	verify_all(&f, SP_WL_SAME, 2000);
	frame_fds_read_only(&f, NULL);
	for (uint64_t pg = c.first_data_page; pg < c.pages; pg++) {
		if (!sp_probe_wl_sel(&c, pg, 2000))
			continue;
		uint64_t p0 = pfn(&f, 0, pg);
		for (uint32_t i = 1; i < NCL; i++)
			ck_assert_msg(pfn(&f, i, pg) == p0, "page %llu: clone %u not on clone 0's frame",
				      (unsigned long long)pg, i);
		shared++;
	}
	ck_assert_uint_eq(shared, sel);

	/* clone 0 overwrites exactly those pages with data of its own */
	ck_assert_msg(sp_fanout_run_one(&f, 0, SP_WL_WRITE, 2000, &err) == 0, "%s", err.msg);
	{
		uint64_t bad = 1;
		ck_assert(sp_fanout_verify_one(&f, 0, SP_WL_WRITE, 2000, &bad, &err) == 0);
		ck_assert_uint_eq(bad, 0);
		for (uint32_t i = 1; i < NCL; i++) {
			ck_assert(sp_fanout_verify_one(&f, i, SP_WL_SAME, 2000, &bad, &err) == 0);
			ck_assert_msg(bad == 0, "clone %u sees clone 0's writes (%llu pages)", i,
				      (unsigned long long)bad);
		}
	}
	for (uint64_t pg = c.first_data_page; pg < c.pages; pg++) {
		if (!sp_probe_wl_sel(&c, pg, 2000))
			continue;
		ck_assert(pfn(&f, 0, pg) != pfn(&f, 1, pg));
		ck_assert(pfn(&f, 1, pg) == pfn(&f, 2, pg));
	}
	sp_fanout_stop(&f);
}
END_TEST

/* Frames are shared only inside a merge domain. */
START_TEST(domains_keep_frames_apart)
{
	struct sp_fanout f;
	struct sp_probe_config c;

	ino_t ino[NCL];

	start(&f, "same:10%", 2, NULL);
	c = config_of(&f);
	verify_all(&f, SP_WL_SAME, 1000);
	/* and a file per domain: no clone can read the other domain's frames */
	frame_fds_read_only(&f, ino);
	ck_assert(ino[0] == ino[2] && ino[1] == ino[3] && ino[0] != ino[1]);
	for (uint64_t pg = c.first_data_page; pg < c.pages; pg++) {
		if (!sp_probe_wl_sel(&c, pg, 1000))
			continue;
		/* round-robin: clones 0, 2 in domain 0; 1, 3 in domain 1 */
		ck_assert(pfn(&f, 0, pg) == pfn(&f, 2, pg));
		ck_assert(pfn(&f, 1, pg) == pfn(&f, 3, pg));
		ck_assert(pfn(&f, 0, pg) != pfn(&f, 1, pg));
	}
	sp_fanout_stop(&f);
}
END_TEST

/* Told to merge across domains, the owner gives every clone the one
 * file all frames are then made in, and the domains share them. */
START_TEST(across_domains_share_one_file)
{
	static const char *const knobs[] = { "merge.merge_across_domains=1", NULL };
	struct sp_fanout f;
	struct sp_probe_config c;
	ino_t ino[NCL];

	start(&f, "same:10%", 2, knobs);
	c = config_of(&f);
	verify_all(&f, SP_WL_SAME, 1000);
	frame_fds_read_only(&f, ino);
	for (uint32_t i = 1; i < NCL; i++)
		ck_assert(ino[i] == ino[0]);
	for (uint64_t pg = c.first_data_page; pg < c.pages; pg++)
		if (sp_probe_wl_sel(&c, pg, 1000))
			for (uint32_t i = 1; i < NCL; i++)
				ck_assert(pfn(&f, i, pg) == pfn(&f, 0, pg));
	sp_fanout_stop(&f);
}
END_TEST

/* Pages written back to their original bytes go back to the template;
 * zeroed pages onto the zero page; scattered blocks onto shared frames. */
START_TEST(revert_zero_scatter)
{
	static const char *const zero_knobs[] = { "merge.use_zero_pages=1", NULL };
	struct sp_fanout f;
	struct sp_probe_config c;
	int64_t v;

	start(&f, "revert:10%", 1, NULL);
	v = stat_of("stats.merge.pages_template");
	c = config_of(&f);
	ck_assert_int_gt(v, 0);
	verify_all(&f, SP_WL_REVERT, 1000);
	/* back on the template: every clone on the same frame */
	for (uint64_t pg = c.first_data_page; pg < c.pages; pg++)
		if (sp_probe_wl_sel(&c, pg, 1000))
			ck_assert(pfn(&f, 0, pg) == pfn(&f, 3, pg));
	sp_fanout_stop(&f);

	start(&f, "zero:10%", 1, zero_knobs);
	ck_assert_int_gt(stat_of("stats.merge.zero_pages"), 0);
	verify_all(&f, SP_WL_ZERO, 1000);
	sp_fanout_stop(&f);

	start(&f, "scatter:10%", 1, NULL);
	ck_assert_int_gt(stat_of("stats.merge.pages_sharing"), 0);
	/* other blocks at the same offsets: whatever was guessed from a
	 * sibling, every clone still reads only its own data */
	verify_all(&f, SP_WL_SCATTER, 1000);
	sp_fanout_stop(&f);
}
END_TEST

/* utime + stime of process pid, in clock ticks. */
static long long cpu_ticks(pid_t pid)
{
	char path[64], buf[1024], *p;
	long long ut = 0, st = 0;
	FILE *fp;

	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	fp = fopen(path, "r");
	ck_assert_ptr_nonnull(fp);
	ck_assert_ptr_nonnull(fgets(buf, sizeof(buf), fp));
	fclose(fp);
	p = strrchr(buf, ')');
	ck_assert_ptr_nonnull(p);
	/* fields after the name: state is 3rd, utime 14th, stime 15th */
	ck_assert_int_eq(sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lld %lld",
				&ut, &st), 2);
	return ut + st;
}

/* The owner dies: every clone keeps running on intact memory. A clone
 * dies: the owner forgets it and the others are untouched. */
START_TEST(deaths)
{
	struct sp_fanout f;
	struct sp_error err = { 0 };
	int64_t regions = -1;

	start(&f, "same:20%", 1, NULL);
	/* a clone dies */
	kill(f.clone[3].pid, SIGKILL);
	waitpid(f.clone[3].pid, NULL, 0);
	f.clone[3].alive = 0;
	for (int i = 0; i < 500 && regions != NCL - 1; i++) {
		regions = stat_of("stats.merge.regions");
		usleep(10000);
	}
	ck_assert_int_eq(regions, NCL - 1);
	f.nclones = NCL - 1;   /* stop talking to the dead one */
	verify_all(&f, SP_WL_SAME, 2000);
	/* the owner dies */
	kill(f.owner_pid, SIGKILL);
	waitpid(f.owner_pid, NULL, 0);
	f.owner_pid = 0;
	verify_all(&f, SP_WL_SAME, 2000);
	/* the clones noticed (the merge socket hung up) and sleep: none
	 * spins on the hangup (100 ticks a second: 400 ms idle is 0-2) */
	{
		long long t0[NCL];
		struct timespec ts = { 0, 400000000 };

		for (int i = 0; i < NCL - 1; i++)
			t0[i] = cpu_ticks(f.clone[i].pid);
		nanosleep(&ts, NULL);
		for (int i = 0; i < NCL - 1; i++)
			ck_assert_int_le(cpu_ticks(f.clone[i].pid) - t0[i], 5);
	}
	ck_assert_msg(sp_fanout_run_one(&f, 1, SP_WL_WRITE, 2000, &err) == 0, "%s", err.msg);
	{
		uint64_t bad = 1;
		ck_assert(sp_fanout_verify_one(&f, 1, SP_WL_WRITE, 2000, &bad, &err) == 0);
		ck_assert_uint_eq(bad, 0);
		ck_assert(sp_fanout_verify_one(&f, 0, SP_WL_SAME, 2000, &bad, &err) == 0);
		ck_assert_uint_eq(bad, 0);
	}
	f.nclones = NCL;
	sp_fanout_stop(&f);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("merge-kvm");
	TCase *tc = tcase_create("kvm");

	sp_test_require_kvm();
	sp_test_require_root("cgroups, pagemap frame numbers, /proc/PID/mem of clones");
	tcase_add_unchecked_fixture(tc, save_map_count, restore_map_count);
	tcase_add_checked_fixture(tc, setup, teardown);
	tcase_set_timeout(tc, 180);
	tcase_add_test(tc, same_merges_and_writes_stay_private);
	tcase_add_test(tc, domains_keep_frames_apart);
	tcase_add_test(tc, across_domains_share_one_file);
	tcase_add_test(tc, revert_zero_scatter);
	tcase_add_test(tc, deaths);
	suite_add_tcase(s, tc);
	return sp_test_run(s);
}
