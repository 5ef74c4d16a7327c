/* SPDX-License-Identifier: MIT */
/*
 * Fan-out integration tests on real KVM: snapshot a probe guest, restore 4
 * clones in each mode and prove, from outside the guests,
 *   - sharing: unwritten pages of every clone sit on the same page frame
 *     (pagemap PFNs) in cow and cow-huge, and on distinct frames in copy;
 *   - isolation: every clone's memory, read through process_vm_readv,
 *     equals its own model, never another clone's data;
 * plus restore-continues-where-it-stopped and template immutability.
 * Skips (exit 77) where /dev/kvm is missing.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include "testutil.h"
#include "vmm/clones.h"
#include "vmm/probe.h"

#define RAM (32ull << 20)

static char ckpt_path[64];

static void make_ckpt(void)
{
	struct sp_snapshot_opts o = { .ram_bytes = RAM, .seed = 42, .zero_bp = 500 };
	struct sp_error err = { 0 };
	int fd;

	snprintf(ckpt_path, sizeof(ckpt_path), "/tmp/sp-test-XXXXXX");
	fd = mkstemp(ckpt_path);
	ck_assert_int_ge(fd, 0);
	close(fd);
	ck_assert_msg(sp_probe_snapshot(ckpt_path, &o, &err) == 0, "snapshot: %s", err.msg);
}

static void drop_ckpt(void)
{
	unlink(ckpt_path);
}

/* PFN of the page at addr in pid, 0 if not present. */
static uint64_t pfn_of(int pagemap, uint64_t addr)
{
	uint64_t e = 0;

	ck_assert_int_eq(pread(pagemap, &e, 8, (off_t)(addr / 4096 * 8)), 8);
	return (e >> 63) & 1 ? e & ((1ull << 55) - 1) : 0;
}

static int open_pagemap(pid_t pid)
{
	char p[64];
	int fd;

	snprintf(p, sizeof(p), "/proc/%d/pagemap", (int)pid);
	fd = open(p, O_RDONLY);
	ck_assert_msg(fd >= 0, "open %s: %s", p, strerror(errno));
	return fd;
}

/* Read clone i's guest page pg from its process. */
static void read_clone_page(const struct sp_fanout *f, uint32_t i, uint64_t pg, uint64_t *buf)
{
	struct iovec local = { buf, 4096 };
	struct iovec remote = { (void *)(uintptr_t)(f->clone[i].ram_addr + pg * 4096), 4096 };

	ck_assert_int_eq(process_vm_readv(f->clone[i].pid, &local, 1, &remote, 1, 0), 4096);
}

/* Every data page of every clone equals that clone's model; for shared
 * modes, template pages are on one frame in all clones and written pages
 * on frames of their own. */
static void check_fanout(enum sp_fanout_mode mode, const char *wl)
{
	struct sp_fanout_opts o = { .ckpt_path = ckpt_path, .mode = mode, .clones = 4,
				    .concurrency = 2, .jobs = 4 };
	struct sp_error err = { 0 };
	struct sp_fanout f;
	struct sp_probe_config c;
	struct sp_probe_scatter sc;
	uint64_t *buf = malloc(4096), *tmpl = malloc(4096);
	int pm[4];
	uint32_t bad = 99;
	uint64_t shared = 0, private_pages = 0;

	ck_assert(sp_probe_parse_workload(wl, &o.kind, &o.bp, &err) == 0);
	ck_assert_msg(sp_fanout_start(&f, &o, &err) == 0, "fanout %s: %s",
		      sp_fanout_mode_name(mode), err.msg);
	ck_assert_msg(sp_fanout_verify(&f, &bad, &err) == 0, "verify: %s", err.msg);
	ck_assert_uint_eq(bad, 0);

	/* the config block, from clone 0's memory */
	{
		uint64_t cfgpage[512];
		read_clone_page(&f, 0, SP_PROBE_CONFIG_GPA / 4096, cfgpage);
		memcpy(&c, cfgpage, sizeof(c));
		ck_assert_uint_eq(c.magic, SP_PROBE_MAGIC);
		ck_assert_uint_eq(c.pages, RAM / 4096);
	}
	sp_probe_scatter_init(&sc, &c, o.bp);
	for (int i = 0; i < 4; i++)
		pm[i] = open_pagemap(f.clone[i].pid);

	for (uint64_t pg = c.first_data_page; pg < c.pages; pg++) {
		struct sp_probe_pg t = sp_probe_tmpl_page(&c, pg);
		uint64_t pf[4];
		int written[4];

		for (uint32_t i = 0; i < 4; i++) {
			struct sp_probe_pg m = sp_probe_model_page(&c, &sc, o.kind, o.bp, i, pg);
			read_clone_page(&f, i, pg, buf);
			for (uint64_t j = 0; j < 512; j++)
				if (buf[j] != sp_probe_pg_word(&m, j))
					ck_abort_msg("%s: clone %u page %llu word %llu: 0x%llx, model 0x%llx",
						     sp_fanout_mode_name(mode), i,
						     (unsigned long long)pg, (unsigned long long)j,
						     (unsigned long long)buf[j],
						     (unsigned long long)sp_probe_pg_word(&m, j));
			written[i] = memcmp(&m, &t, sizeof(m)) != 0 ||
				     (o.kind == SP_WL_REVERT && sp_probe_wl_sel(&c, pg, o.bp));
			pf[i] = pfn_of(pm[i], f.clone[i].ram_addr + pg * 4096);
		}
		/* sharing, from page frame numbers (reading above faulted
		 * every page in, so each has a frame) */
		for (uint32_t i = 1; i < 4; i++) {
			ck_assert_msg(pf[0] && pf[i], "page %llu has no frame", (unsigned long long)pg);
			if (mode == SP_FANOUT_COPY || written[0] || written[i]) {
				if (!t.zero || written[0] || written[i])
					ck_assert_msg(pf[0] != pf[i],
						      "%s: page %llu of clones 0 and %u share frame 0x%llx",
						      sp_fanout_mode_name(mode), (unsigned long long)pg, i,
						      (unsigned long long)pf[0]);
				private_pages++;
			} else {
				ck_assert_msg(pf[0] == pf[i],
					      "%s: unwritten page %llu not shared: 0x%llx vs 0x%llx",
					      sp_fanout_mode_name(mode), (unsigned long long)pg,
					      (unsigned long long)pf[0], (unsigned long long)pf[i]);
				shared++;
			}
		}
	}
	if (mode == SP_FANOUT_COPY)
		ck_assert_uint_eq(shared, 0);
	else
		ck_assert_uint_gt(shared, 0);
	for (int i = 0; i < 4; i++)
		close(pm[i]);

	/* PSS agrees: in cow modes the clones' shared (shmem) PSS adds up to
	 * about one template, in copy mode their private anonymous PSS to
	 * about four guests */
	{
		double shmem = 0, anon = 0;
		for (int i = 0; i < 4; i++) {
			struct sp_proc_mem use;
			ck_assert(sp_acct_proc(f.clone[i].pid, &use, &err) == 0);
			shmem += (double)use.pss_shmem_bytes;
			anon += (double)use.pss_anon_bytes;
		}
		if (mode == SP_FANOUT_COPY) {
			ck_assert_msg(anon > 3.9 * RAM, "copy: anon PSS %.0f", anon);
			ck_assert_msg(shmem < 0.1 * RAM, "copy: shmem PSS %.0f", shmem);
		} else if (o.kind == SP_WL_READ) {
			/* (anonymous PSS is the VMM process's own memory here,
			 * a few MiB under ASan: not a property of the fan-out) */
			ck_assert_msg(shmem > 0.85 * RAM && shmem < 1.05 * RAM,
				      "%s: shmem PSS %.0f", sp_fanout_mode_name(mode), shmem);
		}
	}
	free(buf);
	free(tmpl);
	sp_fanout_stop(&f);
}

START_TEST(cow_read)
{
	check_fanout(SP_FANOUT_COW, "read");
}
END_TEST

START_TEST(cow_write)
{
	check_fanout(SP_FANOUT_COW, "write:10%");
}
END_TEST

START_TEST(cow_huge_write)
{
	check_fanout(SP_FANOUT_COW_HUGE, "write:10%");
}
END_TEST

START_TEST(cow_huge_read)
{
	check_fanout(SP_FANOUT_COW_HUGE, "read");
}
END_TEST

START_TEST(copy_write)
{
	check_fanout(SP_FANOUT_COPY, "write:10%");
}
END_TEST

START_TEST(cow_same)
{
	check_fanout(SP_FANOUT_COW, "same:20%");
}
END_TEST

START_TEST(cow_scatter)
{
	check_fanout(SP_FANOUT_COW, "scatter:15%");
}
END_TEST

START_TEST(cow_zero)
{
	check_fanout(SP_FANOUT_COW, "zero:10%");
}
END_TEST

START_TEST(cow_revert)
{
	check_fanout(SP_FANOUT_COW, "revert:10%");
}
END_TEST

/* A restored guest continues where it stopped: its first exit is the
 * GET_CMD right after the snapshot point, its registers are the saved
 * ones, and it then runs commands correctly. */
START_TEST(restore_continues)
{
	struct sp_template t;
	struct sp_error err = { 0 };
	struct sp_probe p;
	struct sp_probe_res res;
	const struct sp_vcpu_x86 *st;
	struct kvm_regs r;
	void *ram;
	uint64_t bad = 1;

	ck_assert_msg(sp_template_open(&t, ckpt_path, SP_FANOUT_COW, &err) == 0, "%s", err.msg);
	st = sp_ckpt_vcpu(t.ckpt);
	ck_assert_uint_eq(st->version, SP_VCPU_X86_VERSION);
	ck_assert_msg(sp_template_map(&t, &ram, &err) == 0, "%s", err.msg);
	ck_assert_msg(sp_probe_restore(&p, t.ckpt, ram, &err) == 0, "%s", err.msg);
	ck_assert(p.at_cmd);
	/* the snapshot was taken just past the guest's snapshot `out`
	 * (e7 10: out %eax,$0x10); the restored guest ran on from there to its
	 * GET_CMD `out` (KVM reports RIP at or just past it), on the saved
	 * stack */
	{
		const uint8_t *mem = ram;
		ck_assert_uint_eq(mem[st->regs.rip - 2], 0xe7);
		ck_assert_uint_eq(mem[st->regs.rip - 1], SP_PROBE_PORT);
		ck_assert_int_eq(ioctl(p.vm.vcpu_fd, KVM_GET_REGS, &r), 0);
		ck_assert_uint_ne(r.rip, st->regs.rip);
		ck_assert((mem[r.rip] == 0xe7 && mem[r.rip + 1] == SP_PROBE_PORT) ||
			  (mem[r.rip - 2] == 0xe7 && mem[r.rip - 1] == SP_PROBE_PORT));
		ck_assert_uint_eq(r.rsp, st->regs.rsp);
	}
	ck_assert_int_eq(sp_probe_call(&p, SP_OP_PING, 0, 0, 0, &res, &err), 0);
	ck_assert_uint_eq(res.r[1], SP_PROBE_MAGIC);
	ck_assert_msg(sp_probe_workload(&p, SP_WL_WRITE, 2500, 7, &err) == 0, "%s", err.msg);
	ck_assert_msg(sp_probe_verify(&p, SP_WL_WRITE, 2500, 7, &bad, &err) == 0, "%s", err.msg);
	ck_assert_uint_eq(bad, 0);
	/* and the guest really checks: against another clone's model it
	 * must find the differences */
	ck_assert_msg(sp_probe_verify(&p, SP_WL_WRITE, 2500, 8, &bad, &err) == 0, "%s", err.msg);
	ck_assert_uint_gt(bad, 0);
	sp_probe_destroy(&p);
	sp_template_unmap(&t, ram);
	sp_template_close(&t);
}
END_TEST

/* Nobody can change the template while clones map it. */
START_TEST(template_immutable)
{
	struct sp_template t;
	struct sp_error err = { 0 };
	char page[4096] = { 1 };
	void *w;
	char path[PATH_MAX + 16];

	ck_assert_msg(sp_template_open(&t, ckpt_path, SP_FANOUT_COW, &err) == 0, "%s", err.msg);
	ck_assert_int_eq(pwrite(t.fd, page, sizeof(page), 1 << 21), -1);
	ck_assert_int_eq(errno, EPERM);
	w = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, t.fd, 0);
	ck_assert(w == MAP_FAILED);
	ck_assert_int_eq(ftruncate(t.fd, 4096), -1);
	sp_template_close(&t);

	ck_assert_msg(sp_template_open(&t, ckpt_path, SP_FANOUT_COW_HUGE, &err) == 0, "%s", err.msg);
	/* no path leads to it any more; reopening the fd for writing fails */
	ck_assert_str_eq(t.mnt, "");
	snprintf(path, sizeof(path), "/proc/self/fd/%d", t.fd);
	ck_assert_int_eq(open(path, O_RDWR), -1);
	ck_assert_int_eq(errno, EROFS);
	w = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, t.fd, 0);
	ck_assert(w == MAP_FAILED);
	sp_template_close(&t);
}
END_TEST

/* A corrupted checkpoint is refused before any clone starts. */
START_TEST(bad_page_refused)
{
	struct sp_template t;
	struct sp_error err = { 0 };
	struct sp_ckpt *c;
	uint64_t off;
	int fd;
	char b = 0x5a;

	ck_assert(sp_ckpt_open(ckpt_path, &c, &err) == 0);
	off = sp_ckpt_info(c)->mem_offset + SP_PROBE_DATA_GPA + 12345;
	sp_ckpt_close(c);
	fd = open(ckpt_path, O_RDWR);
	ck_assert_int_eq(pwrite(fd, &b, 1, (off_t)off), 1);
	close(fd);
	ck_assert_int_eq(sp_template_open(&t, ckpt_path, SP_FANOUT_COW, &err), -EBADMSG);
	ck_assert_msg(strstr(err.msg, "page") != NULL, "message: %s", err.msg);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("fanout");
	TCase *tc = tcase_create("kvm");
	int rc;

	sp_test_require_kvm();
	sp_test_require_root("cgroups, pagemap frame numbers and the huge-page tmpfs");
	tcase_add_checked_fixture(tc, make_ckpt, drop_ckpt);
	tcase_set_timeout(tc, 120);
	tcase_add_test(tc, cow_read);
	tcase_add_test(tc, cow_write);
	tcase_add_test(tc, cow_huge_read);
	tcase_add_test(tc, cow_huge_write);
	tcase_add_test(tc, copy_write);
	tcase_add_test(tc, cow_same);
	tcase_add_test(tc, cow_scatter);
	tcase_add_test(tc, cow_zero);
	tcase_add_test(tc, cow_revert);
	tcase_add_test(tc, restore_continues);
	tcase_add_test(tc, template_immutable);
	tcase_add_test(tc, bad_page_refused);
	suite_add_tcase(s, tc);
	rc = sp_test_run(s);
	return rc;
}
