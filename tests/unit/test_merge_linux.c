/* SPDX-License-Identifier: MIT */
/*
 * Tests of the Linux merge backend (lib/merge/merge_linux.c, owner side;
 * lib/merge/apply_linux.c, clone side). No KVM: the "clones" are forked
 * children that map a sealed template memfd MAP_PRIVATE exactly as
 * vmm/clones.c does, write pages and apply merge batches on command over a
 * socketpair. What a user relies on is checked from outside the child:
 * every child reads exactly its own model (through /proc/PID/mem), merged
 * pages share one physical page (frame numbers from /proc/PID/pagemap: the
 * template's, the frame file's, the zero page's), a run of merges costs one
 * mapping (/proc/PID/maps), a write after a merge stays private, and the
 * owner's change detection reports exactly what was written, once. Frame
 * numbers in pagemap need root: without it the binary reports a skip.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include "lib/util/xxh.h"

#include "samepage/merge.h"
#include "samepage/merge_linux.h"
#include "testutil.h"

#define PAGE 4096u
#define NPAGES 512u
#define MAXKIDS 4
#define MSG_PAGES 16u
#define MSG_BYTES (64u + MSG_PAGES * PAGE)

/* ---- template and backend, per test -------------------------------- */

static int tmpl_fd = -1;
static const uint8_t *tmpl_view;        /* read-only shared view */
static struct sp_merge_linux *be;
static const struct sp_merge_ops *ops;

static void fill(uint8_t *p, uint64_t seed)
{
	uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;

	for (unsigned i = 0; i < PAGE / 8; i++) {
		uint64_t z = (x += 0x9e3779b97f4a7c15ull);
		z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
		z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
		((uint64_t *)p)[i] = z ^ (z >> 31);
	}
}

static void make_template(void)
{
	static uint8_t page[PAGE];
	int fd = memfd_create("test-template", MFD_CLOEXEC | MFD_ALLOW_SEALING);

	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(ftruncate(fd, (off_t)NPAGES * PAGE), 0);
	for (unsigned i = 0; i < NPAGES; i++) {
		fill(page, 1000 + i);
		ck_assert_int_eq(pwrite(fd, page, PAGE, (off_t)i * PAGE), PAGE);
	}
	ck_assert_int_eq(fcntl(fd, F_ADD_SEALS,
			       F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL), 0);
	tmpl_fd = fd;
	tmpl_view = mmap(NULL, (size_t)NPAGES * PAGE, PROT_READ, MAP_SHARED, fd, 0);
	ck_assert(tmpl_view != MAP_FAILED);
}

static void setup_with(const struct sp_merge_linux_opts *o)
{
	struct sp_error err = { 0 };
	int rc;

	make_template();
	rc = sp_merge_linux_create(o, &be, &err);
	ck_assert_msg(rc == 0, "create: %s", err.msg);
	ops = sp_merge_linux_ops();
}

static void setup(void)
{
	setup_with(NULL);
}

/* ---- children ------------------------------------------------------ */

enum { K_HELLO = 1, K_WRITE, K_WORD, K_APPLY, K_TOUCH, K_FILL_MAPS, K_UNFILL, K_EXIT };

struct hdr {
	uint32_t op, n;        /* n: pages or requests in the payload */
	uint64_t page, arg;
	int64_t status;
	uint64_t pad[4];
};

struct kid {
	pid_t pid;
	int sock;
	uint64_t ram;          /* address of guest RAM in the child */
	uint8_t *model;        /* what the child's RAM must read */
	struct sp_merge_linux_region *region;
};

static struct kid kids[MAXKIDS];
static int nkids;

/* Use up vm.max_map_count with split PROT_NONE memory; returns the splits. */
static uint8_t *filler;
static size_t filler_bytes;

static int64_t fill_maps(void)
{
	int64_t n = 0;

	filler_bytes = (size_t)600000 * PAGE;
	filler = mmap(NULL, filler_bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
		      -1, 0);
	if (filler == MAP_FAILED)
		return -errno;
	for (size_t off = PAGE; off + PAGE < filler_bytes; off += 2 * PAGE, n++)
		if (mprotect(filler + off, PAGE, PROT_READ) < 0)
			return errno == ENOMEM ? n : -errno;
	return -ENOSPC;
}

/* The read-only descriptor of domain's frame file (and its slot). */
static int frame_fd_of(uint32_t domain, uint32_t *slot)
{
	struct sp_merge_linux_frame_file ff;
	struct sp_error err = { 0 };

	ck_assert_msg(sp_merge_linux_frame_file(be, domain, &ff, &err) == 0, "%s", err.msg);
	if (slot)
		*slot = ff.slot;
	return ff.fd;
}

static void __attribute__((noreturn)) kid_main(int sock)
{
	static uint8_t msg[MSG_BYTES];
	struct sp_merge_clone *c = NULL;
	struct sp_error err = { 0 };
	struct hdr *h = (struct hdr *)msg;
	uint8_t *ram = mmap(NULL, (size_t)NPAGES * PAGE, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_NORESERVE, tmpl_fd, 0);
	struct sp_merge_clone_desc d = {
		.ram = ram, .npages = NPAGES, .tmpl_fd = tmpl_fd, .tmpl_offset = 0,
		.frame_fd = frame_fd_of(0, NULL),
	};

	h->op = K_HELLO;
	h->status = ram == MAP_FAILED ? -errno : sp_merge_clone_create(&d, &c, &err);
	h->arg = (uint64_t)(uintptr_t)ram;
	if (send(sock, msg, sizeof(*h), 0) < 0 || h->status)
		_exit(1);
	for (;;) {
		ssize_t n = recv(sock, msg, sizeof(msg), 0);
		size_t out = sizeof(*h);
		volatile uint8_t sink = 0;

		if (n < (ssize_t)sizeof(*h))
			_exit(0);
		h->status = 0;
		switch (h->op) {
		case K_WRITE:
			memcpy(ram + h->page * PAGE, msg + sizeof(*h), (size_t)h->n * PAGE);
			break;
		case K_WORD:
			memcpy(ram + h->page * PAGE + h->n * 8, &h->arg, 8);
			break;
		case K_APPLY:
			h->status = sp_merge_clone_apply(c, (struct sp_merge_req *)(msg + sizeof(*h)),
							 h->n);
			out += h->n * sizeof(struct sp_merge_req);
			break;
		case K_TOUCH:
			for (unsigned i = 0; i < NPAGES; i++)
				sink ^= ram[(size_t)i * PAGE];
			break;
		case K_FILL_MAPS:
			h->status = fill_maps();
			break;
		case K_UNFILL:
			h->status = munmap(filler, filler_bytes) < 0 ? -errno : 0;
			break;
		default:
			sp_merge_clone_destroy(c);
			_exit(0);
		}
		(void)sink;
		if (send(sock, msg, out, 0) < 0)
			_exit(1);
	}
}

static struct kid *kid_start(void)
{
	struct kid *k = &kids[nkids];
	struct hdr h;
	int sv[2];

	ck_assert_int_lt(nkids, MAXKIDS);
	ck_assert_int_eq(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
	k->pid = fork();
	ck_assert_int_ge(k->pid, 0);
	if (k->pid == 0) {
		close(sv[0]);
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		kid_main(sv[1]);
	}
	close(sv[1]);
	k->sock = sv[0];
	ck_assert_int_eq(recv(k->sock, &h, sizeof(h), 0), (ssize_t)sizeof(h));
	ck_assert_int_eq(h.status, 0);
	k->ram = h.arg;
	k->model = malloc((size_t)NPAGES * PAGE);
	ck_assert_ptr_nonnull(k->model);
	memcpy(k->model, tmpl_view, (size_t)NPAGES * PAGE);
	nkids++;
	return k;
}

/* Send a command and wait for its answer; returns the answer's status. */
static int64_t kid_cmd(struct kid *k, void *msg, size_t len, void *reply, size_t rlen)
{
	static uint8_t buf[MSG_BYTES];
	ssize_t n;

	if (send(k->sock, msg, len, MSG_NOSIGNAL) != (ssize_t)len)
		return -EPIPE;
	n = recv(k->sock, buf, sizeof(buf), 0);
	if (n < (ssize_t)sizeof(struct hdr))
		return -EPIPE;
	if (reply)
		memcpy(reply, buf, (size_t)n < rlen ? (size_t)n : rlen);
	return ((struct hdr *)buf)->status;
}

static void kid_simple(struct kid *k, uint32_t op, int64_t *status)
{
	struct hdr h = { .op = op };
	int64_t s = kid_cmd(k, &h, sizeof(h), NULL, 0);

	if (status)
		*status = s;
	else
		ck_assert_int_eq(s, 0);
}

/* Write n pages of content at page. */
static void kid_write(struct kid *k, uint64_t page, const uint8_t *src, uint32_t n)
{
	static uint8_t msg[MSG_BYTES];
	struct hdr *h = (struct hdr *)msg;

	ck_assert_uint_le(n, MSG_PAGES);
	*h = (struct hdr){ .op = K_WRITE, .n = n, .page = page };
	memcpy(msg + sizeof(*h), src, (size_t)n * PAGE);
	ck_assert_int_eq(kid_cmd(k, msg, sizeof(*h) + (size_t)n * PAGE, NULL, 0), 0);
	memcpy(k->model + page * PAGE, src, (size_t)n * PAGE);
}

static void kid_write_seed(struct kid *k, uint64_t page, uint64_t seed)
{
	uint8_t p[PAGE];

	fill(p, seed);
	kid_write(k, page, p, 1);
}

/* Write one 8-byte word in place. */
static void kid_word(struct kid *k, uint64_t page, uint32_t word, uint64_t v)
{
	struct hdr h = { .op = K_WORD, .n = word, .page = page, .arg = v };

	ck_assert_int_eq(kid_cmd(k, &h, sizeof(h), NULL, 0), 0);
	memcpy(k->model + page * PAGE + word * 8, &v, 8);
}

/* Apply a batch in the child (the transport of the tests). */
static int kid_apply(void *ctx, struct sp_merge_req *reqs, size_t n)
{
	static uint8_t msg[MSG_BYTES];
	struct kid *k = ctx;
	struct hdr *h = (struct hdr *)msg;
	size_t len = sizeof(*h) + n * sizeof(*reqs);
	int64_t s;

	if (len > sizeof(msg))
		return -E2BIG;
	*h = (struct hdr){ .op = K_APPLY, .n = (uint32_t)n };
	memcpy(msg + sizeof(*h), reqs, n * sizeof(*reqs));
	s = kid_cmd(k, msg, len, msg, len);
	if (s)
		return (int)s;
	memcpy(reqs, msg + sizeof(*h), n * sizeof(*reqs));
	return 0;
}

/* The same transport in two halves (send now, answer later), as the
 * engine's merge_submit/merge_wait use it. */
static int kid_send(void *ctx, const struct sp_merge_req *reqs, size_t n)
{
	static uint8_t msg[MSG_BYTES];
	struct kid *k = ctx;
	struct hdr *h = (struct hdr *)msg;
	size_t len = sizeof(*h) + n * sizeof(*reqs);

	if (len > sizeof(msg))
		return -E2BIG;
	*h = (struct hdr){ .op = K_APPLY, .n = (uint32_t)n };
	memcpy(msg + sizeof(*h), reqs, n * sizeof(*reqs));
	return send(k->sock, msg, len, MSG_NOSIGNAL) == (ssize_t)len ? 0 : -EPIPE;
}

static int kid_recv(void *ctx, struct sp_merge_req *reqs, size_t n)
{
	static uint8_t msg[MSG_BYTES];
	struct kid *k = ctx;
	struct hdr *h = (struct hdr *)msg;
	size_t len = sizeof(*h) + n * sizeof(*reqs);

	if (recv(k->sock, msg, sizeof(msg), 0) != (ssize_t)len)
		return -EPIPE;
	if (h->status)
		return (int)h->status;
	memcpy(reqs, msg + sizeof(*h), n * sizeof(*reqs));
	return 0;
}

static void kid_read(const struct kid *k, uint64_t page, uint8_t *buf)
{
	char path[64];
	int fd;

	snprintf(path, sizeof(path), "/proc/%d/mem", (int)k->pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pread(fd, buf, PAGE, (off_t)(k->ram + page * PAGE)), PAGE);
	close(fd);
}

static void check_model(const struct kid *k)
{
	uint8_t buf[PAGE];

	for (uint64_t p = 0; p < NPAGES; p++) {
		kid_read(k, p, buf);
		ck_assert_msg(memcmp(buf, k->model + p * PAGE, PAGE) == 0,
			      "child %d page %llu differs from its model", (int)k->pid,
			      (unsigned long long)p);
	}
}

static uint64_t pagemap_entry(pid_t pid, uint64_t addr)
{
	char path[64];
	uint64_t e = 0;
	int fd;

	snprintf(path, sizeof(path), "/proc/%d/pagemap", (int)pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	ck_assert_int_ge(fd, 0);
	ck_assert_int_eq(pread(fd, &e, 8, (off_t)(addr / PAGE * 8)), 8);
	close(fd);
	return e;
}

#define PM_PRESENT (1ull << 63)
#define PM_FILE (1ull << 61)
#define PFN(e) ((e) & ((1ull << 55) - 1))

/* Frame number of a page of the child (touched first by the caller). */
static uint64_t kid_pfn(const struct kid *k, uint64_t page)
{
	uint64_t e = pagemap_entry(k->pid, k->ram + page * PAGE);

	ck_assert_msg(e & PM_PRESENT, "page %llu not present", (unsigned long long)page);
	ck_assert_uint_ne(PFN(e), 0);
	return PFN(e);
}

static int kid_private(const struct kid *k, uint64_t page)
{
	uint64_t e = pagemap_entry(k->pid, k->ram + page * PAGE);
	return (e & PM_PRESENT) && !(e & PM_FILE);
}

static uint64_t self_pfn(const volatile uint8_t *p)
{
	(void)p[0];
	return PFN(pagemap_entry(getpid(), (uint64_t)(uintptr_t)p));
}

static uint64_t tmpl_pfn(uint64_t page)
{
	return self_pfn(tmpl_view + page * PAGE);
}

static const uint8_t *frame_view;

static uint64_t frame_pfn(uint64_t frame)
{
	if (!frame_view) {
		frame_view = mmap(NULL, 1 << 20, PROT_READ, MAP_SHARED,
				  frame_fd_of(0, NULL), 0);
		ck_assert(frame_view != MAP_FAILED);
	}
	return self_pfn(frame_view + (frame & 0xffffffffull) * PAGE);
}

static uint64_t zero_pfn(void)
{
	static uint64_t z;

	if (!z) {
		volatile uint8_t *p = mmap(NULL, PAGE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS,
					   -1, 0);
		ck_assert(p != MAP_FAILED);
		z = self_pfn(p);
	}
	return z;
}

static int maps_count(pid_t pid)
{
	char path[64], line[512];
	FILE *f;
	int n = 0;

	snprintf(path, sizeof(path), "/proc/%d/maps", (int)pid);
	f = fopen(path, "re");
	ck_assert_ptr_nonnull(f);
	while (fgets(line, sizeof(line), f))
		n++;
	fclose(f);
	return n;
}

/* Allocate and fill n consecutive frames with seeds seed.., return first. */
/* n adjacent frames of domain 0 with content seed.. : written with
 * frame_write, which stages them (see frames_staged below) */
static uint64_t frames_staged(uint32_t n, uint64_t seed)
{
	uint8_t p[PAGE];
	uint64_t first = 0, f;

	for (uint32_t i = 0; i < n; i++) {
		ck_assert_int_eq(ops->frame_alloc(be, 0, i ? first + i : SP_MERGE_NO_HINT, &f), 0);
		if (i == 0)
			first = f;
		ck_assert_uint_eq(f, first + i);
		fill(p, seed + i);
		ck_assert_int_eq(ops->frame_write(be, f, p), 0);
	}
	return first;
}

/* The same, written out: the tests below hand them to a clone's applier
 * directly, not through the backend's merge op (which writes them out
 * itself) */
static uint64_t frames_new(uint32_t n, uint64_t seed)
{
	uint64_t first = frames_staged(n, seed);

	sp_merge_linux_frames_flush(be);
	return first;
}

static void req_set(struct sp_merge_req *r, uint64_t page, uint32_t kind, uint64_t target)
{
	*r = (struct sp_merge_req){ .page = page, .kind = kind, .target = target, .result = 99 };
}

/* ---- applier ------------------------------------------------------- */

/* Clones get the frame file read-only: a clone cannot change the frames
 * other clones map, nor (as another user) reopen the file writable; and
 * the applier refuses a writable descriptor. */
START_TEST(frame_fd_read_only)
{
	int fd = frame_fd_of(0, NULL), rw;
	uint8_t page[PAGE] = { 1 };
	struct sp_merge_clone *c = NULL;
	struct sp_error err = { 0 };
	char path[64];
	struct stat sb;
	uint8_t *ram;

	ck_assert_int_eq(fcntl(fd, F_GETFL) & O_ACCMODE, O_RDONLY);
	errno = 0;
	ck_assert_int_eq(pwrite(fd, page, PAGE, 0), -1);
	ck_assert_int_eq(errno, EBADF);
	ck_assert_int_eq(fstat(fd, &sb), 0);
	ck_assert_int_eq(sb.st_mode & 07777, 0400);
	snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
	if (geteuid() == 0) {
		pid_t pid = fork();
		int st = 0;

		ck_assert_int_ge(pid, 0);
		if (pid == 0) {
			int x;

			if (setresgid(65534, 65534, 65534) || setresuid(65534, 65534, 65534))
				_exit(2);
			x = open(path, O_RDWR);
			_exit(x < 0 && errno == EACCES ? 0 : 1);
		}
		ck_assert_int_eq(waitpid(pid, &st, 0), pid);
		ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0,
			      "an unprivileged clone reopened the frame file writable (status %d)", st);
	}
	/* a writable descriptor is refused by the applier */
	ram = mmap(NULL, (size_t)NPAGES * PAGE, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_NORESERVE, tmpl_fd, 0);
	ck_assert(ram != MAP_FAILED);
	rw = memfd_create("writable", MFD_CLOEXEC);
	ck_assert_int_ge(rw, 0);
	{
		struct sp_merge_clone_desc d = { .ram = ram, .npages = NPAGES, .tmpl_fd = tmpl_fd,
						 .frame_fd = rw };
		ck_assert_int_eq(sp_merge_clone_create(&d, &c, &err), -EINVAL);
		ck_assert_ptr_null(c);
		ck_assert_ptr_nonnull(strstr(err.msg, "read-only"));
		d.frame_fd = fd;
		ck_assert_int_eq(sp_merge_clone_create(&d, &c, &err), 0);
		sp_merge_clone_destroy(c);
	}
	close(rw);
	munmap(ram, (size_t)NPAGES * PAGE);
}
END_TEST

/* Frames of another domain live in another file: a clone, holding only
 * its own domain's, can neither read them through its descriptor nor be
 * made to map them (the applier refuses a frame of another slot). */
START_TEST(frame_files_per_domain)
{
	struct kid *k = kid_start();
	struct sp_merge_linux_stats st;
	struct sp_merge_req r[2];
	uint8_t p[PAGE], got[PAGE], zero[PAGE] = { 0 };
	uint32_t s0, s1;
	int fd0 = frame_fd_of(0, &s0), fd1 = frame_fd_of(1, &s1);
	uint64_t f1, f0;
	int maps = maps_count(k->pid);

	ck_assert_uint_ne(s0, s1);
	fill(p, 4242);
	ck_assert_int_eq(ops->frame_alloc(be, 1, SP_MERGE_NO_HINT, &f1), 0);
	ck_assert_uint_eq(f1 >> 32, s1);
	ck_assert_int_eq(ops->frame_write(be, f1, p), 0);
	f0 = frames_new(1, 4242);          /* the same bytes, in domain 0 */
	ck_assert_uint_eq(f0 >> 32, s0);
	/* domain 1's bytes are in its file only */
	ck_assert_int_eq(pread(fd1, got, PAGE, (off_t)((f1 & 0xffffffffull) * PAGE)), PAGE);
	ck_assert_mem_eq(got, p, PAGE);
	ck_assert_int_eq(pread(fd0, got, PAGE, (off_t)((f1 & 0xffffffffull) * PAGE)), PAGE);
	if ((f1 & 0xffffffffull) != (f0 & 0xffffffffull))
		ck_assert_mem_eq(got, zero, PAGE);
	/* a clone of domain 0 refuses domain 1's frame, takes its own */
	kid_write(k, 30, p, 1);
	kid_write(k, 31, p, 1);
	req_set(&r[0], 30, SP_MERGE_FRAME, f1);
	req_set(&r[1], 31, SP_MERGE_FRAME, f0);
	ck_assert_int_eq(kid_apply(k, r, 2), 0);
	ck_assert_int_eq(r[0].result, -EXDEV);
	ck_assert_int_eq(r[1].result, 0);
	ck_assert(kid_private(k, 30));
	kid_simple(k, K_TOUCH, NULL);
	ck_assert_uint_eq(kid_pfn(k, 31), frame_pfn(f0));
	ck_assert_int_le(maps_count(k->pid), maps + 2);
	check_model(k);
	sp_merge_linux_stats_get(be, &st);
	ck_assert_uint_eq(st.frame_files, 2);
}
END_TEST

START_TEST(template_own_offset_discard)
{
	struct kid *k = kid_start();
	struct sp_merge_req r[10];
	uint8_t junk[PAGE];
	int maps;

	/* write, then write the template's bytes back: private copies */
	for (unsigned p = 10; p < 20; p++) {
		fill(junk, 7);
		kid_write(k, p, junk, 1);
		kid_write(k, p, tmpl_view + p * PAGE, 1);
		ck_assert(kid_private(k, p));
	}
	maps = maps_count(k->pid);
	for (unsigned i = 0; i < 10; i++)
		req_set(&r[i], 10 + i, SP_MERGE_TEMPLATE, 10 + i);
	ck_assert_int_eq(kid_apply(k, r, 10), 0);
	for (unsigned i = 0; i < 10; i++)
		ck_assert_int_eq(r[i].result, 0);
	/* no mapping was created: the private copies were dropped */
	ck_assert_int_eq(maps_count(k->pid), maps);
	kid_simple(k, K_TOUCH, NULL);
	for (unsigned p = 10; p < 20; p++) {
		ck_assert(!kid_private(k, p));
		ck_assert_uint_eq(kid_pfn(k, p), tmpl_pfn(p));
	}
	check_model(k);
}
END_TEST

START_TEST(template_own_offset_after_remap)
{
	struct kid *k = kid_start();
	struct sp_merge_req r[1];
	uint64_t f = frames_new(1, 555);
	uint8_t p[PAGE];
	int maps = maps_count(k->pid);

	/* page 30 onto a frame */
	kid_write_seed(k, 30, 555);
	req_set(&r[0], 30, SP_MERGE_FRAME, f);
	ck_assert_int_eq(kid_apply(k, r, 1), 0);
	ck_assert_int_eq(r[0].result, 0);
	kid_simple(k, K_TOUCH, NULL);
	ck_assert_uint_eq(kid_pfn(k, 30), frame_pfn(f));
	/* written back to the template's bytes, then merged to its own
	 * template page: a DONTNEED would read the frame, so it must map */
	kid_write(k, 30, tmpl_view + 30 * PAGE, 1);
	req_set(&r[0], 30, SP_MERGE_TEMPLATE, 30);
	ck_assert_int_eq(kid_apply(k, r, 1), 0);
	ck_assert_int_eq(r[0].result, 0);
	kid_simple(k, K_TOUCH, NULL);
	ck_assert_uint_eq(kid_pfn(k, 30), tmpl_pfn(30));
	check_model(k);
	ck_assert_int_le(maps_count(k->pid), maps + 2);
	/* back in a template mapping at its own offset: DONTNEED again */
	fill(p, 1);
	kid_write(k, 30, p, 1);
	kid_write(k, 30, tmpl_view + 30 * PAGE, 1);
	ck_assert(kid_private(k, 30));
	req_set(&r[0], 30, SP_MERGE_TEMPLATE, 30);
	ck_assert_int_eq(kid_apply(k, r, 1), 0);
	ck_assert_int_eq(r[0].result, 0);
	kid_simple(k, K_TOUCH, NULL);
	ck_assert_uint_eq(kid_pfn(k, 30), tmpl_pfn(30));
	check_model(k);
}
END_TEST

/* RAM filled by read() (fan-out `copy`): a DONTNEED would zero the page */
START_TEST(anonymous_ram_maps_template)
{
	uint8_t *ram = mmap(NULL, (size_t)NPAGES * PAGE, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	struct sp_merge_clone_desc d = {
		.ram = ram, .npages = NPAGES, .tmpl_fd = tmpl_fd,
		.frame_fd = frame_fd_of(0, NULL), .ram_anon = 1,
	};
	struct sp_merge_clone *c;
	struct sp_merge_req r[4];

	ck_assert(ram != MAP_FAILED);
	memcpy(ram, tmpl_view, (size_t)NPAGES * PAGE);
	ck_assert_int_eq(sp_merge_clone_create(&d, &c, NULL), 0);
	for (unsigned i = 0; i < 4; i++)
		req_set(&r[i], 20 + i, SP_MERGE_TEMPLATE, 20 + i);
	ck_assert_int_eq(sp_merge_clone_apply(c, r, 4), 0);
	for (unsigned i = 0; i < 4; i++)
		ck_assert_int_eq(r[i].result, 0);
	ck_assert_mem_eq(ram + 20 * PAGE, tmpl_view + 20 * PAGE, 4 * PAGE);
	ck_assert_uint_eq(self_pfn(ram + 21 * PAGE), tmpl_pfn(21));
	sp_merge_clone_destroy(c);
	munmap(ram, (size_t)NPAGES * PAGE);
}
END_TEST

START_TEST(template_other_offset_run)
{
	struct kid *k = kid_start();
	struct sp_merge_req r[8];
	int maps = maps_count(k->pid);

	for (unsigned i = 0; i < 8; i++)
		kid_write(k, 40 + i, tmpl_view + (300 + i) * PAGE, 1);
	for (unsigned i = 0; i < 8; i++)
		req_set(&r[i], 40 + i, SP_MERGE_TEMPLATE, 300 + i);
	ck_assert_int_eq(kid_apply(k, r, 8), 0);
	for (unsigned i = 0; i < 8; i++)
		ck_assert_int_eq(r[i].result, 0);
	/* one mapping for the run: the RAM mapping is split around it */
	ck_assert_int_le(maps_count(k->pid), maps + 2);
	kid_simple(k, K_TOUCH, NULL);
	for (unsigned i = 0; i < 8; i++)
		ck_assert_uint_eq(kid_pfn(k, 40 + i), tmpl_pfn(300 + i));
	check_model(k);
}
END_TEST

START_TEST(frame_run_shared_by_two_children)
{
	struct kid *a = kid_start(), *b = kid_start();
	struct sp_merge_req r[64];
	uint64_t f = frames_new(64, 9000);
	uint8_t before[PAGE], after[PAGE];
	int maps_a = maps_count(a->pid), maps_b = maps_count(b->pid);

	for (unsigned i = 0; i < 64; i++) {
		kid_write_seed(a, 64 + i, 9000 + i);
		kid_write_seed(b, 64 + i, 9000 + i);
	}
	for (unsigned i = 0; i < 64; i++)
		req_set(&r[i], 64 + i, SP_MERGE_FRAME, f + i);
	ck_assert_int_eq(kid_apply(a, r, 64), 0);
	for (unsigned i = 0; i < 64; i++)
		ck_assert_int_eq(r[i].result, 0);
	ck_assert_int_eq(kid_apply(b, r, 64), 0);
	for (unsigned i = 0; i < 64; i++)
		ck_assert_int_eq(r[i].result, 0);
	/* 64 pages, one mapping each: at most two more lines (the mapping
	 * and the remainder of the split RAM mapping), not 128 */
	ck_assert_int_le(maps_count(a->pid), maps_a + 2);
	ck_assert_int_le(maps_count(b->pid), maps_b + 2);
	kid_simple(a, K_TOUCH, NULL);
	kid_simple(b, K_TOUCH, NULL);
	for (unsigned i = 0; i < 64; i++) {
		uint64_t pfn = frame_pfn(f + i);
		ck_assert_uint_eq(kid_pfn(a, 64 + i), pfn);
		ck_assert_uint_eq(kid_pfn(b, 64 + i), pfn);
	}
	check_model(a);
	check_model(b);

	/* a write after the merge is private to the writer */
	ck_assert_int_eq(pread(frame_fd_of(0, NULL), before, PAGE, (off_t)(f + 6) * PAGE),
			 PAGE);
	kid_word(a, 70, 3, 0x1122334455667788ull);
	ck_assert(kid_private(a, 70));
	ck_assert_uint_ne(kid_pfn(a, 70), frame_pfn(f + 6));
	ck_assert_uint_eq(kid_pfn(b, 70), frame_pfn(f + 6));
	ck_assert_int_eq(pread(frame_fd_of(0, NULL), after, PAGE, (off_t)(f + 6) * PAGE),
			 PAGE);
	ck_assert_mem_eq(before, after, PAGE);
	check_model(a);
	check_model(b);
}
END_TEST

START_TEST(zero_pages)
{
	struct kid *k = kid_start();
	struct sp_merge_req r[16];
	uint8_t z[PAGE] = { 0 };
	int maps = maps_count(k->pid);

	for (unsigned i = 0; i < 16; i++)
		kid_write(k, 150 + i, z, 1);
	for (unsigned i = 0; i < 16; i++)
		req_set(&r[i], 150 + i, SP_MERGE_ZERO, 0);
	ck_assert_int_eq(kid_apply(k, r, 16), 0);
	for (unsigned i = 0; i < 16; i++)
		ck_assert_int_eq(r[i].result, 0);
	ck_assert_int_le(maps_count(k->pid), maps + 2);
	kid_simple(k, K_TOUCH, NULL);
	for (unsigned i = 0; i < 16; i++)  /* the zero page: no memory */
		ck_assert_uint_eq(kid_pfn(k, 150 + i), zero_pfn());
	kid_word(k, 151, 0, 42);
	ck_assert_uint_ne(kid_pfn(k, 151), zero_pfn());
	ck_assert_uint_eq(kid_pfn(k, 150), zero_pfn());
	check_model(k);
}
END_TEST

START_TEST(stale_content_refused)
{
	struct kid *k = kid_start();
	struct sp_merge_req r[8];
	uint64_t f = frames_new(8, 4242);
	uint64_t pfn3;
	int maps;

	for (unsigned i = 0; i < 8; i++)
		kid_write_seed(k, 200 + i, 4242 + i);
	kid_word(k, 203, 17, 1); /* page 203 no longer equals its frame */
	pfn3 = kid_pfn(k, 203);
	maps = maps_count(k->pid);
	req_set(&r[0], 203, SP_MERGE_FRAME, f + 3);
	ck_assert_int_eq(kid_apply(k, r, 1), 0);
	ck_assert_int_eq(r[0].result, -EAGAIN);
	ck_assert_int_eq(maps_count(k->pid), maps);
	ck_assert(kid_private(k, 203));
	ck_assert_uint_eq(kid_pfn(k, 203), pfn3);
	/* in a run, the stale page splits it and the rest merges */
	for (unsigned i = 0; i < 8; i++)
		req_set(&r[i], 200 + i, SP_MERGE_FRAME, f + i);
	ck_assert_int_eq(kid_apply(k, r, 8), 0);
	for (unsigned i = 0; i < 8; i++)
		ck_assert_int_eq(r[i].result, i == 3 ? -EAGAIN : 0);
	ck_assert_uint_eq(kid_pfn(k, 203), pfn3);
	kid_simple(k, K_TOUCH, NULL);
	ck_assert_uint_eq(kid_pfn(k, 204), frame_pfn(f + 4));
	/* unsorted batches and bad targets */
	req_set(&r[0], 5, SP_MERGE_ZERO, 0);
	req_set(&r[1], 4, SP_MERGE_ZERO, 0);
	ck_assert_int_eq(kid_apply(k, r, 2), -EINVAL);
	req_set(&r[0], 5, SP_MERGE_TEMPLATE, NPAGES);
	req_set(&r[1], NPAGES, SP_MERGE_ZERO, 0);
	ck_assert_int_eq(kid_apply(k, r, 2), 0);
	ck_assert_int_eq(r[0].result, -EINVAL);
	ck_assert_int_eq(r[1].result, -EINVAL);
	check_model(k);
}
END_TEST

START_TEST(map_count_exhausted)
{
	struct kid *k = kid_start();
	struct sp_merge_req r[3];
	uint64_t f = frames_new(2, 777);
	int64_t splits;
	uint64_t pfn;
	uint8_t junk[PAGE];
	FILE *fp = fopen("/proc/sys/vm/max_map_count", "re");
	long limit = 0;

	ck_assert_ptr_nonnull(fp);
	ck_assert_int_eq(fscanf(fp, "%ld", &limit), 1);
	fclose(fp);
	if (limit > 500000)
		return; /* too many splits to use up cheaply */
	kid_write_seed(k, 100, 777);      /* isolated page: needs 2 more maps */
	kid_write_seed(k, 300, 778);
	fill(junk, 3);
	kid_write(k, 250, junk, 1);
	kid_write(k, 250, tmpl_view + 250 * PAGE, 1);
	pfn = kid_pfn(k, 100);
	kid_simple(k, K_FILL_MAPS, &splits);
	ck_assert_int_gt(splits, 1000);
	req_set(&r[0], 100, SP_MERGE_FRAME, f);
	req_set(&r[1], 250, SP_MERGE_TEMPLATE, 250);
	req_set(&r[2], 300, SP_MERGE_FRAME, f + 1);
	ck_assert_int_eq(kid_apply(k, r, 3), 0);
	ck_assert_int_eq(r[0].result, -ENOMEM);
	ck_assert_int_eq(r[1].result, 0);  /* a discard needs no mapping */
	ck_assert_int_eq(r[2].result, -ENOMEM);
	/* the old mapping is intact: same private page, same bytes */
	ck_assert(kid_private(k, 100));
	ck_assert_uint_eq(kid_pfn(k, 100), pfn);
	check_model(k);
	kid_simple(k, K_UNFILL, NULL);
	ck_assert_int_eq(kid_apply(k, r, 1), 0);
	ck_assert_int_eq(r[0].result, 0);
	kid_simple(k, K_TOUCH, NULL);
	ck_assert_uint_eq(kid_pfn(k, 100), frame_pfn(f));
	check_model(k);
}
END_TEST

START_TEST(map_count_raise_restore)
{
	struct sp_merge_linux_mapcount saved;
	FILE *fp;
	long cur = 0, now = 0;

	fp = fopen("/proc/sys/vm/max_map_count", "re");
	ck_assert_ptr_nonnull(fp);
	ck_assert_int_eq(fscanf(fp, "%ld", &cur), 1);
	fclose(fp);
	/* not lower: nothing to do, nothing to undo */
	ck_assert_int_eq(sp_merge_linux_raise_map_count((uint64_t)cur, &saved), 0);
	ck_assert_int_eq(saved.old_count, -1);
	ck_assert_int_eq(sp_merge_linux_restore_map_count(&saved), 0);
	/* raise by one (harmless to anything else running) and restore */
	ck_assert_int_eq(sp_merge_linux_raise_map_count((uint64_t)cur + 1, &saved), 0);
	ck_assert_int_eq(saved.old_count, cur);
	fp = fopen("/proc/sys/vm/max_map_count", "re");
	ck_assert_int_eq(fscanf(fp, "%ld", &now), 1);
	fclose(fp);
	ck_assert_int_eq(sp_merge_linux_restore_map_count(&saved), 0);
	ck_assert_int_eq(now, cur + 1);
	fp = fopen("/proc/sys/vm/max_map_count", "re");
	ck_assert_int_eq(fscanf(fp, "%ld", &now), 1);
	fclose(fp);
	ck_assert_int_eq(now, cur);
	ck_assert_int_eq(sp_merge_linux_raise_map_count(1ull << 40, &saved), -ERANGE);
}
END_TEST

/* ---- owner side ---------------------------------------------------- */

static struct sp_merge_linux_region *region_of(struct kid *k)
{
	struct sp_merge_linux_region_desc d = {
		.pid = k->pid, .ram_addr = k->ram, .npages = NPAGES, .tmpl = NULL,
		.apply = kid_apply, .transport_ctx = k,
	};
	struct sp_error err = { 0 };
	int rc = sp_merge_linux_region_add(be, &d, &k->region, &err);

	ck_assert_msg(rc == 0, "region_add: %s", err.msg);
	return k->region;
}

/* changed() until it has nothing more, into out; returns the count. */
static int changed_all(struct sp_merge_linux_region *r, uint64_t *out, size_t max, size_t cap)
{
	int total = 0;

	for (;;) {
		int n = ops->changed(be, r, out + total, cap);
		ck_assert_int_ge(n, 0);
		total += n;
		ck_assert_uint_le((size_t)total, max);
		if ((size_t)n < cap)
			return total;
	}
}

static void expect_changed(struct sp_merge_linux_region *r, const uint64_t *want, int n,
			   size_t cap)
{
	uint64_t got[NPAGES];
	int m = changed_all(r, got, NPAGES, cap);

	ck_assert_int_eq(m, n);
	for (int i = 0; i < n; i++)
		ck_assert_uint_eq(got[i], want[i]);
}

static void changed_exactly_once(unsigned flags)
{
	struct sp_merge_linux_opts o = { .flags = flags };
	struct kid *k;
	struct sp_merge_linux_region *r;
	uint64_t want[16] = { 3, 7 }, f;
	struct sp_merge_req q[2];
	uint8_t buf[PAGE];
	const void *out;

	setup_with(&o);
	k = kid_start();
	r = region_of(k);
	expect_changed(r, NULL, 0, 256);   /* nothing written yet */
	kid_write_seed(k, 3, 1);
	kid_write_seed(k, 7, 2);
	for (unsigned i = 0; i < 11; i++) {
		kid_write_seed(k, 100 + i, 9);
		want[2 + i] = 100 + i;
	}
	expect_changed(r, want, 13, 4);    /* in chunks of 4, ascending */
	expect_changed(r, NULL, 0, 256);   /* once */
	ck_assert_int_eq(ops->read_page(be, r, 7, buf, &out), 0);
	ck_assert_mem_eq(out, k->model + 7 * PAGE, PAGE);

	/* pages merged by merge() are not reported because of the merge
	 * (the frame only staged: merge writes it out first) */
	f = frames_staged(1, 9);
	req_set(&q[0], 100, SP_MERGE_FRAME, f);
	req_set(&q[1], 101, SP_MERGE_FRAME, f);
	ck_assert_int_eq(ops->merge(be, r, q, 2), 0);
	ck_assert_int_eq(q[0].result, 0);
	ck_assert_int_eq(q[1].result, 0);
	expect_changed(r, NULL, 0, 256);
	/* a merged page that is written is reported again */
	kid_word(k, 101, 0, 5);
	want[0] = 101;
	expect_changed(r, want, 1, 256);
	/* a refused merge is reported again (it changed after the read) */
	req_set(&q[0], 101, SP_MERGE_FRAME, f);
	ck_assert_int_eq(ops->merge(be, r, q, 1), 0);
	ck_assert_int_eq(q[0].result, -EAGAIN);
	expect_changed(r, want, 1, 256);
	/* limitation: a second write in place to a private page is unseen */
	kid_word(k, 3, 0, 5);
	expect_changed(r, NULL, 0, 256);
	check_model(k);
	sp_merge_linux_region_remove(be, r);
}

START_TEST(changed_scan_ioctl)
{
	changed_exactly_once(0);
}
END_TEST

START_TEST(changed_pagemap_read)
{
	changed_exactly_once(SP_MERGE_LINUX_PAGEMAP_READ | SP_MERGE_LINUX_NO_FAULT_GATE);
}
END_TEST

START_TEST(changed_revisit)
{
	struct sp_merge_linux_opts o = { .revisit_pages = 2, .revisit_ms = 1 };
	struct kid *k;
	struct sp_merge_linux_region *r;
	uint64_t want[4] = { 3, 7, 9 }, got[NPAGES];
	struct timespec ms = { 0, 2000000 };
	int n, seen3 = 0;

	setup_with(&o);
	k = kid_start();
	r = region_of(k);
	kid_write_seed(k, 3, 1);
	kid_write_seed(k, 7, 2);
	kid_write_seed(k, 9, 2);
	nanosleep(&ms, NULL);
	n = changed_all(r, got, NPAGES, 256);
	ck_assert_int_ge(n, 3); /* the writes, maybe a first revisit */
	for (int i = 0; i < 3; i++)
		ck_assert_uint_eq(got[i], want[i]);
	/* with nothing new, each revisit_ms two reported pages come back */
	for (int round = 0; round < 3; round++) {
		nanosleep(&ms, NULL);
		n = changed_all(r, got, NPAGES, 256);
		ck_assert_int_eq(n, 2);
		for (int i = 0; i < n; i++)
			seen3 += got[i] == 3;
	}
	ck_assert_int_ge(seen3, 1);
	sp_merge_linux_region_remove(be, r);
}
END_TEST

/* read_page serves the pages changed() just reported from one read-ahead
 * (process_vm_readv): each once; a second read, or a page not reported,
 * reads the clone's memory now. */
START_TEST(read_ahead)
{
	struct kid *k = kid_start();
	struct sp_merge_linux_region *r = region_of(k);
	uint64_t want[4] = { 3, 4, 5, 9 };
	uint8_t buf[PAGE], old[PAGE];
	const void *out;

	for (int i = 0; i < 4; i++)
		kid_write_seed(k, want[i], 10 + i);
	expect_changed(r, want, 4, 256);
	ck_assert_int_eq(ops->read_page(be, r, 3, buf, &out), 0);
	ck_assert_mem_eq(out, k->model + 3 * PAGE, PAGE);
	memcpy(old, k->model + 4 * PAGE, PAGE);
	kid_word(k, 4, 0, 77);    /* after the read-ahead */
	ck_assert_int_eq(ops->read_page(be, r, 4, buf, &out), 0);
	ck_assert(!memcmp(out, old, PAGE) || !memcmp(out, k->model + 4 * PAGE, PAGE));
	ck_assert_int_eq(ops->read_page(be, r, 4, buf, &out), 0);
	ck_assert_mem_eq(out, k->model + 4 * PAGE, PAGE);   /* second: fresh */
	ck_assert_int_eq(ops->read_page(be, r, 9, buf, &out), 0);
	ck_assert_mem_eq(out, k->model + 9 * PAGE, PAGE);
	ck_assert_int_eq(ops->read_page(be, r, 50, buf, &out), 0);
	ck_assert_mem_eq(out, k->model + 50 * PAGE, PAGE);  /* not reported */
	ck_assert_int_eq(ops->read_page(be, r, 5, buf, &out), 0);
	ck_assert_mem_eq(out, k->model + 5 * PAGE, PAGE);
	sp_merge_linux_region_remove(be, r);
}
END_TEST

START_TEST(dead_child_is_esrch)
{
	struct kid *k = kid_start();
	struct sp_merge_linux_region *r = region_of(k);
	struct sp_merge_req q[1];
	uint64_t pages[8];
	uint8_t buf[PAGE];
	const void *out;

	kid_write_seed(k, 5, 5);
	ck_assert_int_eq(ops->changed(be, r, pages, 8), 1);
	kill(k->pid, SIGKILL);
	/* a zombie's memory is gone already */
	for (int i = 0; i < 1000 && ops->changed(be, r, pages, 8) != -ESRCH; i++)
		usleep(1000);
	ck_assert_int_eq(ops->changed(be, r, pages, 8), -ESRCH);
	ck_assert_int_eq(ops->read_page(be, r, 5, buf, &out), -ESRCH);
	req_set(&q[0], 5, SP_MERGE_ZERO, 0);
	ck_assert_int_eq(ops->merge(be, r, q, 1), -ESRCH);
	ck_assert_int_eq(waitpid(k->pid, NULL, 0), k->pid);
	ck_assert_int_eq(ops->changed(be, r, pages, 8), -ESRCH);
	sp_merge_linux_region_remove(be, r);
	k->pid = 0;
}
END_TEST

START_TEST(frames_monotonic_and_returned)
{
	struct sp_merge_linux_stats st;
	uint64_t f, last[3] = { 0 }, got[256], n[3] = { 0 };
	uint32_t slot[3];
	uint8_t p[PAGE], q[PAGE];
	const void *out;

	for (uint32_t d = 0; d < 3; d++)
		(void)frame_fd_of(d, &slot[d]);
	for (int i = 0; i < 256; i++) {
		uint32_t d = (uint32_t)i % 3;

		ck_assert_int_eq(ops->frame_alloc(be, d, n[d] ? last[d] + 1 : SP_MERGE_NO_HINT,
						  &f), 0);
		/* each domain's file, its pages in order */
		ck_assert_uint_eq(f, (uint64_t)slot[d] << 32 | n[d]);
		n[d]++;
		fill(p, (uint64_t)i);
		ck_assert_int_eq(ops->frame_write(be, f, p), 0);
		memset(q, 0, PAGE);
		ck_assert_int_eq(ops->read_frame(be, f, q, &out), 0);
		ck_assert_mem_eq(out, p, PAGE);
		last[d] = got[i] = f;
	}
	sp_merge_linux_stats_get(be, &st);
	ck_assert_uint_eq(st.frames_live, 256);
	ck_assert_uint_eq(st.frame_files, 3);
	ck_assert_uint_ge(st.frame_file_bytes, 256 * PAGE);
	for (int i = 0; i < 256; i++)
		ops->frame_free(be, got[i]);
	sp_merge_linux_stats_get(be, &st);
	ck_assert_uint_eq(st.frames_live, 0);
	ck_assert_uint_eq(st.frames_retired, 256);
	ck_assert_uint_lt(st.frame_file_bytes, 16 * PAGE);  /* memory returned */
	/* freed numbers are never handed out again, whatever the hint */
	ck_assert_int_eq(ops->frame_alloc(be, 0, 3, &f), 0);
	ck_assert_uint_eq(f, (uint64_t)slot[0] << 32 | n[0]);
	ck_assert_int_eq(ops->frame_alloc(be, 0, 1000, &f), 0);
	ck_assert_uint_eq(f, (uint64_t)slot[0] << 32 | (n[0] + 1));
	/* numbers that name no frame are refused */
	ck_assert_int_eq(ops->read_frame(be, (uint64_t)7 << 32, p, &out), -EINVAL);
	ck_assert_int_eq(ops->frame_write(be, (uint64_t)slot[1] << 32 | n[1], p), -EINVAL);
}
END_TEST

/* Frames written one after the other into one file are staged and written
 * out in runs of up to 64, one pwrite each: when the run ends or fills, and
 * before a merge, read_frame, frame_free or an explicit flush. Until then
 * the file does not hold them. */
START_TEST(frames_staged_in_runs)
{
	struct sp_merge_linux_stats st;
	uint8_t p[PAGE], got[PAGE], zero[PAGE] = { 0 };
	int fd = frame_fd_of(0, NULL);
	uint64_t f = frames_staged(70, 777), g, pg = f & 0xffffffffull;
	const void *out;

	/* the 65th frame sent the first 64 out; the other 6 wait */
	for (uint64_t i = 0; i < 70; i++) {
		ck_assert_int_eq(pread(fd, got, PAGE, (off_t)((pg + i) * PAGE)), PAGE);
		fill(p, 777 + i);
		ck_assert_mem_eq(got, i < 64 ? p : zero, PAGE);
	}
	/* read_frame writes them out first */
	ck_assert_int_eq(ops->read_frame(be, f + 66, got, &out), 0);
	fill(p, 777 + 66);
	ck_assert_mem_eq(out, p, PAGE);
	for (uint64_t i = 64; i < 70; i++) {
		ck_assert_int_eq(pread(fd, got, PAGE, (off_t)((pg + i) * PAGE)), PAGE);
		fill(p, 777 + i);
		ck_assert_mem_eq(got, p, PAGE);
	}
	/* freeing a staged frame: the run is written out, then the freed
	 * frame's page punched out; the others keep their bytes */
	g = frames_staged(3, 900);
	ops->frame_free(be, g + 1);
	for (uint64_t i = 0; i < 3; i++) {
		ck_assert_int_eq(pread(fd, got, PAGE, (off_t)(((g & 0xffffffffull) + i) * PAGE)),
				 PAGE);
		fill(p, 900 + i);
		ck_assert_mem_eq(got, i == 1 ? zero : p, PAGE);
	}
	/* an explicit flush */
	g = frames_staged(2, 950);
	ck_assert_int_eq(pread(fd, got, PAGE, (off_t)((g & 0xffffffffull) * PAGE)), PAGE);
	ck_assert_mem_eq(got, zero, PAGE);
	sp_merge_linux_frames_flush(be);
	ck_assert_int_eq(pread(fd, got, PAGE, (off_t)((g & 0xffffffffull) * PAGE)), PAGE);
	fill(p, 950);
	ck_assert_mem_eq(got, p, PAGE);
	sp_merge_linux_stats_get(be, &st);
	ck_assert_uint_eq(st.frame_write_errors, 0);
}
END_TEST

START_TEST(frame_file_full)
{
	struct sp_merge_linux_opts o = { .frame_file_bytes = 4 * PAGE };
	uint64_t f;

	setup_with(&o);
	for (int i = 0; i < 4; i++)
		ck_assert_int_eq(ops->frame_alloc(be, 0, SP_MERGE_NO_HINT, &f), 0);
	ck_assert_int_eq(ops->frame_alloc(be, 0, SP_MERGE_NO_HINT, &f), -ENOSPC);
	ops->frame_free(be, 0);
	ck_assert_int_eq(ops->frame_alloc(be, 0, SP_MERGE_NO_HINT, &f), -ENOSPC);
}
END_TEST

START_TEST(template_reads)
{
	struct sp_merge_linux_tmpl *t, *bad;
	struct sp_error err = { 0 };
	uint8_t buf[PAGE];
	const void *out;

	ck_assert_int_eq(sp_merge_linux_template_add(be, tmpl_fd, 0, NPAGES, &t, &err), 0);
	for (uint64_t p = 0; p < NPAGES; p += 37) {
		ck_assert_int_eq(ops->read_template(be, t, p, buf, &out), 0);
		ck_assert_mem_eq(out, tmpl_view + p * PAGE, PAGE);
	}
	ck_assert_int_eq(ops->read_template(be, t, NPAGES, buf, &out), -EINVAL);
	ck_assert_int_eq(sp_merge_linux_template_add(be, tmpl_fd, 100, NPAGES, &bad, &err),
			 -EINVAL);
	ck_assert_ptr_null(bad);
	sp_merge_linux_template_remove(be, t);
}
END_TEST

/* ---- end to end with the core -------------------------------------- */

/* Loop 1: with the transport split in send and recv. */

START_TEST(engine_converges)
{
	struct sp_merge_linux_tmpl *lt;
	struct sp_merge_template *et;
	struct sp_merge_region *er[MAXKIDS];
	struct sp_merge *eng;
	struct sp_error err = { 0 };
	uint64_t *hashes = calloc(NPAGES, sizeof(uint64_t));
	uint8_t p[PAGE], z[PAGE] = { 0 };
	int64_t sharing = -1, v;
	int rc;

	ck_assert_ptr_nonnull(hashes);
	for (unsigned i = 0; i < NPAGES; i++)
		hashes[i] = XXH3_64bits(tmpl_view + (size_t)i * PAGE, PAGE);
	ck_assert_int_eq(sp_merge_linux_template_add(be, tmpl_fd, 0, NPAGES, &lt, &err), 0);
	rc = sp_merge_create(ops, be, &eng, &err);
	ck_assert_msg(rc == 0, "%s", err.msg);
	ck_assert_int_eq(sp_merge_ctl_set(eng, "merge.use_zero_pages", 1, &err), 0);
	struct sp_merge_template_desc td = { .handle = lt, .hashes = hashes, .npages = NPAGES };
	ck_assert_int_eq(sp_merge_template_add(eng, &td, &et, &err), 0);
	for (int c = 0; c < MAXKIDS; c++) {
		struct kid *k = kid_start();
		struct sp_merge_linux_region_desc ld = {
			.pid = k->pid, .ram_addr = k->ram, .npages = NPAGES, .tmpl = lt,
			.apply = kid_apply, .transport_ctx = k,
		};
		struct sp_merge_region_desc d = { .npages = NPAGES, .domain = 0, .tmpl = et };

		if (_i) {   /* the split transport: clones apply while it works */
			struct sp_merge_linux_region *bad;

			ld.send = kid_send;
			ck_assert_int_eq(sp_merge_linux_region_add(be, &ld, &bad, &err), -EINVAL);
			ld.recv = kid_recv;
		}

		ck_assert_int_eq(sp_merge_linux_region_add(be, &ld, &k->region, &err), 0);
		d.handle = k->region;
		ck_assert_int_eq(sp_merge_region_add(eng, &d, &er[c], &err), 0);
		/* the same 64 pages at the same place in every clone */
		for (unsigned i = 0; i < 64; i += MSG_PAGES) {
			uint8_t run[MSG_PAGES * PAGE];
			for (unsigned j = 0; j < MSG_PAGES; j++)
				fill(run + j * PAGE, 50000 + i + j);
			kid_write(k, i, run, MSG_PAGES);
		}
		/* written, then reverted to the template's bytes */
		for (unsigned i = 64; i < 80; i++) {
			kid_write_seed(k, i, 1);
			kid_write(k, i, tmpl_view + (size_t)i * PAGE, 1);
		}
		for (unsigned i = 80; i < 96; i++)           /* zeroed */
			kid_write(k, i, z, 1);
		for (unsigned i = 96; i < 112; i++)          /* unique */
			kid_write_seed(k, i, 70000 + (uint64_t)c * 100 + i);
		kid_write(k, 120, tmpl_view + 400 * PAGE, 1); /* another template page */
	}
	for (int pass = 0; pass < 6; pass++) {
		ck_assert_int_ge(sp_merge_pass(eng), 0);
		rc = sp_merge_check(eng, SP_MERGE_CHECK_CONTENT, &err);
		ck_assert_msg(rc == 0, "check: %s", err.msg);
		ck_assert_int_eq(sp_merge_ctl_get(eng, "stats.merge.pages_sharing", &v), 0);
		if (v == sharing)
			break;
		sharing = v;
	}
	for (int c = 0; c < MAXKIDS; c++) {
		struct kid *k = &kids[c];

		kid_simple(k, K_TOUCH, NULL);
		check_model(k);
		for (unsigned i = 0; i < 64; i++)
			ck_assert_uint_eq(kid_pfn(k, i), kid_pfn(&kids[0], i));
		for (unsigned i = 64; i < 80; i++)
			ck_assert_uint_eq(kid_pfn(k, i), tmpl_pfn(i));
		for (unsigned i = 80; i < 96; i++)
			ck_assert_uint_eq(kid_pfn(k, i), zero_pfn());
		for (unsigned i = 96; i < 112; i++)
			ck_assert(kid_private(k, i));
		ck_assert_uint_eq(kid_pfn(k, 120), tmpl_pfn(400));
		ck_assert(!kid_private(k, 0));
	}
	/* a write afterwards stays private; the engine sees it */
	kid_word(&kids[1], 10, 0, 0xdead);
	ck_assert_int_ge(sp_merge_pass(eng), 0);
	ck_assert_int_eq(sp_merge_check(eng, SP_MERGE_CHECK_CONTENT, &err), 0);
	for (int c = 0; c < MAXKIDS; c++) {
		kid_simple(&kids[c], K_TOUCH, NULL);
		check_model(&kids[c]);
		if (c != 1)
			ck_assert_uint_eq(kid_pfn(&kids[c], 10), kid_pfn(&kids[0], 10));
	}
	ck_assert(kid_private(&kids[1], 10));
	/* a clone dies: its region goes, the others keep their sharing */
	kill(kids[3].pid, SIGKILL);
	waitpid(kids[3].pid, NULL, 0);
	kids[3].pid = 0;
	sp_merge_region_remove(eng, er[3]);
	sp_merge_linux_region_remove(be, kids[3].region);
	ck_assert_int_ge(sp_merge_pass(eng), 0);
	ck_assert_int_eq(sp_merge_check(eng, SP_MERGE_CHECK_CONTENT, &err), 0);
	for (int c = 0; c < 3; c++)
		check_model(&kids[c]);
	fill(p, 50005);
	ck_assert_mem_eq(kids[2].model + 5 * PAGE, p, PAGE);
	for (int c = 0; c < 3; c++) {
		sp_merge_region_remove(eng, er[c]);
		sp_merge_linux_region_remove(be, kids[c].region);
	}
	sp_merge_destroy(eng);
	sp_merge_linux_template_remove(be, lt);
	free(hashes);
}
END_TEST

int main(void)
{
	Suite *s = suite_create("merge_linux");
	TCase *tc = tcase_create("pfn");
	bool root = geteuid() == 0;
	int rc;

	tcase_set_timeout(tc, 60);
	tcase_add_checked_fixture(tc, setup, NULL);
	tcase_add_test(tc, frame_fd_read_only);
	tcase_add_test(tc, frame_files_per_domain);
	tcase_add_test(tc, template_own_offset_discard);
	tcase_add_test(tc, template_own_offset_after_remap);
	tcase_add_test(tc, anonymous_ram_maps_template);
	tcase_add_test(tc, template_other_offset_run);
	tcase_add_test(tc, frame_run_shared_by_two_children);
	tcase_add_test(tc, zero_pages);
	tcase_add_test(tc, stale_content_refused);
	tcase_add_test(tc, map_count_exhausted);
	tcase_add_test(tc, map_count_raise_restore);
	tcase_add_test(tc, dead_child_is_esrch);
	tcase_add_test(tc, read_ahead);
	tcase_add_test(tc, frames_monotonic_and_returned);
	tcase_add_test(tc, frames_staged_in_runs);
	tcase_add_test(tc, template_reads);
	tcase_add_loop_test(tc, engine_converges, 0, 2);
	TCase *own = tcase_create("owner");
	tcase_set_timeout(own, 60);
	tcase_add_test(own, changed_scan_ioctl);
	tcase_add_test(own, changed_pagemap_read);
	tcase_add_test(own, changed_revisit);
	tcase_add_test(own, frame_file_full);
	if (root)
		suite_add_tcase(s, tc);
	suite_add_tcase(s, own);
	rc = sp_test_run(s);
	if (rc == 0 && !root)
		sp_test_require_root("frame numbers in /proc/PID/pagemap (the rest passed)");
	return rc;
}
