/* SPDX-License-Identifier: MIT */
/*
 * The floor under the merge engine's speed on this machine: what merging
 * costs the clones when nothing else is done, so that the engine's
 * measured time can be held against what any userspace engine that
 * verifies each page before mapping it could reach here.
 *
 * N child processes each make a clone: with --ckpt, a probe VM restored
 * from the checkpoint (guest RAM a MAP_PRIVATE mapping of the template, as
 * `samepage fanout --mode cow` makes it) whose guest reads every page and
 * then runs the workload, exactly as the fan-out's clones do; without it, a
 * plain process mapping a template memfd MAP_PRIVATE and writing the same
 * pages from the probe's model (vmm/probe_abi.h). `same` writes runs of 64
 * adjacent pages, the same bytes at the same offsets in every clone;
 * `scatter` writes the same set of pages at clone-specific offsets. The
 * parent writes the frame file beforehand (timed on its own: a pwrite per
 * 64 consecutive frames), laid out as well as it can be (see cand_at).
 * Then each clone applies a perfect batch, the merges an oracle would
 * propose: for each run of adjacent pages with adjacent frames, memcmp() of
 * every page with its frame through a read-only shared view of the frame
 * file (the comparison the engine's clones make before mapping), then one
 * mmap(MAP_FIXED | MAP_PRIVATE) of the frame file over the run.
 *
 * Two sets of clones are measured: *alone*, released one after the other
 * so that no clone's CPU time includes waiting on another's locks (their
 * CPU over the cores is a lower bound on the wall time), and *together*,
 * all released at once (the time 95% of the pages took, every mapped run
 * timestamped).
 *
 * What is left out, so that the figures are a floor: change detection,
 * lookups, messages, digests, and reading the frames out of a clone.
 *
 * Output: one JSON object on stdout (per-page costs, both sets' CPU and
 * times, the frames' cost). bench/merge.sh runs it with --ckpt for `same`
 * and `scatter`, alternating with the engine and ksmd, and the results go
 * into bench/results/merge-vs-ksm.{json,md}.
 *
 *   merge_floor --workload same|scatter [--ckpt FILE] [--clones 8] [--pct 10]
 */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <sysexits.h>
#include <time.h>
#include <unistd.h>

#include "samepage/fanout.h"
#include "vmm/probe.h"

#define PAGE ((uint64_t)4096)
#define RUN_PAGES 64u

struct cfg {
	int scatter;          /* 0: same, 1: scatter */
	unsigned clones;
	unsigned pct;
	uint64_t npages;      /* pages of one clone */
	uint64_t ncand;       /* written pages per clone */
	struct sp_probe_config probe;  /* the probe's model, as `samepage
					  snapshot --mem` makes it */
	struct sp_probe_scatter sc;
	uint64_t *same_pages; /* same: the written pages, ascending; frame i
				 holds same_pages[i] */
	uint32_t *frame_of;   /* scatter: the frame of content (block) k */
	const struct sp_template *tmpl; /* --ckpt: KVM clones of it; NULL:
					   plain processes */
};

static uint64_t kind_of(const struct cfg *g)
{
	return g->scatter ? SP_WL_SCATTER : SP_WL_SAME;
}

/* What page `page` of clone c holds after its workload: the probe's model. */
static void model_fill(const struct cfg *g, uint64_t page, unsigned c, uint8_t *dst)
{
	struct sp_probe_pg m = sp_probe_model_page(&g->probe, &g->sc, kind_of(g),
						   g->pct * 100, c, page);
	uint64_t *w = (uint64_t *)dst;

	for (uint64_t j = 0; j < PAGE / 8; j++)
		w[j] = sp_probe_pg_word(&m, j);
}

/* When a run was mapped, and how many pages it held: each child writes
 * its own slice of a shared array, so the parent can tell when 95% of all
 * pages were merged. */
struct mark {
	int64_t t_ns;         /* CLOCK_MONOTONIC */
	uint64_t pages;
};

/* What a child reports when done. */
struct report {
	int64_t cpu_ns;       /* its CPU time in the apply phase */
	int64_t t_end_ns;     /* CLOCK_MONOTONIC when it finished */
	int64_t cmp_ns;       /* of which comparing */
	uint64_t pages;       /* pages merged */
	uint64_t maps;        /* mmap calls */
	int err;              /* 0 or errno */
};

static int64_t mono_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static int64_t cpu_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
	return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Candidate k of clone c: its page and its frame, laid out as the probe
 * guest's workloads (vmm/probe_abi.h) lay them out for a 256 MiB checkpoint
 * made by `samepage snapshot` (seed 1): `same` writes the data pages that
 * sp_probe_wl_sel() picks (random runs of 64, the same in every clone);
 * `scatter` writes block k at sp_probe_scatter_page(k, clone). The frames
 * are laid out as well as they can be: in page order for `same`, and for
 * `scatter` in the order of clone 0's pages, so that blocks adjacent in one
 * clone (adjacent in every clone: the permutations differ by a shift) have
 * adjacent frames and map as one mapping. */
static void cand_at(const struct cfg *g, uint64_t k, unsigned c, uint64_t *page,
		    uint64_t *frame)
{
	if (!g->scatter) {
		*page = g->same_pages[k];
		*frame = k;
		return;
	}
	*page = g->probe.first_data_page + sp_probe_scatter_page(&g->sc, k, c);
	*frame = g->frame_of[k];
}

static int cmp_page(const void *a, const void *b)
{
	uint64_t x = ((const uint64_t *)a)[0], y = ((const uint64_t *)b)[0];

	return x < y ? -1 : x > y;
}

static int cmp_mark(const void *a, const void *b)
{
	const struct mark *x = a, *y = b;

	return x->t_ns < y->t_ns ? -1 : x->t_ns > y->t_ns;
}

/* One clone: build its RAM, say ready, wait for go, apply, report. A KVM
 * clone is a probe VM restored from the checkpoint whose guest read every
 * page and then ran the workload itself, as in `samepage fanout`; a plain
 * one maps the template and writes the workload's pages from the model. */
static void child(const struct cfg *g, unsigned c, int tmpl_fd, int frame_fd,
		  struct mark *marks, int ready_w, int go_r, int rep_w)
{
	struct report rep = { 0 };
	uint64_t (*cand)[2] = malloc(g->ncand * sizeof(*cand));
	uint8_t *ram = NULL, go;
	const uint8_t *view;
	volatile uint8_t sink = 0;
	struct sp_probe probe;
	struct sp_error err = { 0 };
	int64_t c0;
	int rc;

	view = mmap(NULL, g->ncand * PAGE, PROT_READ, MAP_SHARED, frame_fd, 0);
	if (!cand || view == MAP_FAILED) {
		rep.err = ENOMEM;
		goto out;
	}
	for (uint64_t k = 0; k < g->ncand; k++)
		cand_at(g, k, c, &cand[k][0], &cand[k][1]);
	if (g->tmpl) {
		rc = sp_template_map(g->tmpl, (void **)&ram, &err);
		if (rc == 0)
			rc = sp_probe_restore(&probe, g->tmpl->ckpt, ram, &err);
		if (rc == 0)
			rc = sp_probe_workload(&probe, SP_WL_READ, 0, c, &err);
		if (rc == 0)
			rc = sp_probe_workload(&probe, kind_of(g), g->pct * 100, c, &err);
		if (rc) {
			fprintf(stderr, "merge_floor: clone %u: %s\n", c, err.msg);
			rep.err = -rc;
			goto out;
		}
	} else {
		ram = mmap(NULL, g->npages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, tmpl_fd, 0);
		if (ram == MAP_FAILED) {
			rep.err = errno;
			goto out;
		}
		for (uint64_t p = 0; p < g->npages; p++)
			sink += ram[p * PAGE];
		for (uint64_t k = 0; k < g->ncand; k++)
			model_fill(g, cand[k][0], c, ram + cand[k][0] * PAGE);
	}
	/* requests arrive sorted by page, as the engine sends them */
	qsort(cand, g->ncand, sizeof(*cand), cmp_page);
	(void)sink;
	if (write(ready_w, "r", 1) != 1 || read(go_r, &go, 1) != 1)
		_exit(EX_OSERR);
	c0 = cpu_ns();
	for (uint64_t k = 0; k < g->ncand;) {
		uint64_t n = 1;
		int64_t t0 = cpu_ns();

		while (k + n < g->ncand &&
		       cand[k + n][0] == cand[k][0] + n && cand[k + n][1] == cand[k][1] + n)
			n++;
		for (uint64_t i = 0; i < n; i++)
			if (memcmp(ram + cand[k + i][0] * PAGE, view + cand[k + i][1] * PAGE, PAGE)) {
				rep.err = EBADMSG;
				goto out;
			}
		rep.cmp_ns += cpu_ns() - t0;
		if (mmap(ram + cand[k][0] * PAGE, n * PAGE, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE, frame_fd,
			 (off_t)(cand[k][1] * PAGE)) == MAP_FAILED) {
			rep.err = errno;
			goto out;
		}
		marks[rep.maps].t_ns = mono_ns();
		marks[rep.maps].pages = n;
		rep.maps++;
		rep.pages += n;
		k += n;
	}
	rep.cpu_ns = cpu_ns() - c0;
	rep.t_end_ns = mono_ns();
out:
	if (write(rep_w, &rep, sizeof(rep)) != (ssize_t)sizeof(rep))
		_exit(EX_OSERR);
	_exit(0);
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

/* The candidates and frames every clone shares (see cand_at). */
static int layout(struct cfg *g)
{
	uint64_t bp = g->pct * 100, n = 0;

	if (!g->scatter) {
		g->same_pages = malloc(g->npages * sizeof(*g->same_pages));
		if (!g->same_pages)
			return -1;
		for (uint64_t p = g->probe.first_data_page; p < g->npages; p++)
			if (sp_probe_wl_sel(&g->probe, p, bp))
				g->same_pages[n++] = p;
		g->ncand = n;
		return 0;
	}
	sp_probe_scatter_init(&g->sc, &g->probe, bp);
	g->ncand = g->sc.blocks;
	uint64_t (*pk)[2] = malloc(g->ncand * sizeof(*pk));
	g->frame_of = malloc(g->ncand * sizeof(*g->frame_of));
	if (!pk || !g->frame_of)
		return -1;
	for (uint64_t k = 0; k < g->ncand; k++) {
		pk[k][0] = sp_probe_scatter_page(&g->sc, k, 0);
		pk[k][1] = k;
	}
	qsort(pk, g->ncand, sizeof(*pk), cmp_u64);
	for (uint64_t i = 0; i < g->ncand; i++)
		g->frame_of[pk[i][1]] = (uint32_t)i;
	free(pk);
	return 0;
}

static uint64_t parse_bytes(const char *s)
{
	char *end;
	uint64_t v = strtoull(s, &end, 10);

	if (*end == 'M' || *end == 'm')
		v <<= 20, end++;
	else if (*end == 'G' || *end == 'g')
		v <<= 30, end++;
	return *end ? 0 : v;
}

/* A whole number up to 10^6, or 0 (refused by every caller) if not one. */
static unsigned long count(const char *s)
{
	char *end;
	unsigned long v = strtoul(s, &end, 10);

	return *s && !*end && v <= 1000000 ? v : 0;
}

static void usage(FILE *o)
{
	fprintf(o, "usage: merge_floor --workload same|scatter [--ckpt FILE] [--clones N] [--pct P]\n"
		   "                   [--mem BYTES]\n"
		   "  What merging costs the clones on this machine with nothing else to do (see\n"
		   "  the comment at the top of bench/merge_floor.c); one JSON object on stdout.\n"
		   "  --ckpt FILE  clones are probe VMs restored from this checkpoint (needs\n"
		   "               /dev/kvm; its size overrides --mem); without it, plain processes\n"
		   "  --clones N   clone processes (default 8)\n"
		   "  --pct P      percent of each clone's data pages written, 1..40 (default 10)\n"
		   "  --mem BYTES  clone RAM without --ckpt, e.g. 256M (default)\n");
}

/* One set of clones, measured. */
struct result {
	int64_t cpu_ns, cmp_ns;  /* sums over the clones, apply phase */
	int64_t wall_ns;         /* first go to last done */
	int64_t t95_ns;          /* first go to 95% of all pages merged */
	uint64_t pages, maps;
};

/* Fork the clones, let them set up, then release them: all at once
 * (together) or one after the other, each alone on the machine (serial,
 * so no clone's CPU time includes waiting on another's locks). */
static int run_set(const struct cfg *g, int tmpl_fd, int frame_fd, int serial,
		   struct result *res)
{
	int ready[2], go[2], rep[2], err = 0;
	struct mark *marks, *all;
	uint64_t nmarks = 0, sum = 0;
	size_t nm = (size_t)g->clones * g->ncand;
	int64_t t_go, t_end = 0;

	memset(res, 0, sizeof(*res));
	marks = mmap(NULL, nm * sizeof(*marks), PROT_READ | PROT_WRITE,
		     MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (marks == MAP_FAILED || pipe(ready) || pipe(go) || pipe(rep)) {
		fprintf(stderr, "merge_floor: %s\n", strerror(errno));
		return EX_OSERR;
	}
	for (unsigned c = 0; c < g->clones; c++) {
		pid_t pid = fork();
		if (pid < 0) {
			fprintf(stderr, "merge_floor: fork: %s\n", strerror(errno));
			return EX_OSERR;
		}
		if (pid == 0) {
			close(ready[0]);
			close(go[1]);
			close(rep[0]);
			child(g, c, tmpl_fd, frame_fd, marks + (size_t)c * g->ncand, ready[1],
			      go[0], rep[1]);
		}
	}
	close(ready[1]);
	close(go[0]);
	close(rep[1]);
	for (unsigned c = 0; c < g->clones; c++) {
		char r;
		if (read(ready[0], &r, 1) != 1) {
			fprintf(stderr, "merge_floor: a clone died while setting up\n");
			return EX_SOFTWARE;
		}
	}
	t_go = mono_ns();
	for (unsigned c = 0; c < g->clones; c++) {
		struct report r;

		/* together: every clone released before the first report */
		if (c == 0 || serial)
			for (unsigned k = 0; k < (serial ? 1u : g->clones); k++)
				if (write(go[1], "g", 1) != 1)
					return EX_OSERR;
		if (read(rep[0], &r, sizeof(r)) != (ssize_t)sizeof(r)) {
			fprintf(stderr, "merge_floor: a clone died while applying\n");
			return EX_SOFTWARE;
		}
		if (r.err)
			err = r.err;
		res->cpu_ns += r.cpu_ns;
		res->cmp_ns += r.cmp_ns;
		res->pages += r.pages;
		res->maps += r.maps;
		if (r.t_end_ns > t_end)
			t_end = r.t_end_ns;
	}
	while (wait(NULL) > 0)
		;
	close(ready[0]);
	close(go[1]);
	close(rep[0]);
	if (err) {
		fprintf(stderr, "merge_floor: a clone failed: %s\n", strerror(err));
		return EX_SOFTWARE;
	}
	res->wall_ns = t_end - t_go;
	/* every mapped run of every clone, in time order: when did the merged
	 * pages first reach 95% of the total? */
	all = malloc(res->maps * sizeof(*all));
	if (!all)
		return EX_OSERR;
	for (unsigned c = 0; c < g->clones; c++)
		for (uint64_t i = 0; i < g->ncand && marks[(size_t)c * g->ncand + i].pages; i++)
			all[nmarks++] = marks[(size_t)c * g->ncand + i];
	qsort(all, nmarks, sizeof(*all), cmp_mark);
	for (uint64_t i = 0; i < nmarks; i++) {
		sum += all[i].pages;
		if (20 * sum >= 19 * res->pages) {
			res->t95_ns = all[i].t_ns - t_go;
			break;
		}
	}
	free(all);
	munmap(marks, nm * sizeof(*marks));
	return 0;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "workload", required_argument, NULL, 'w' },
		{ "clones", required_argument, NULL, 'n' },
		{ "pct", required_argument, NULL, 'p' },
		{ "mem", required_argument, NULL, 'm' },
		{ "ckpt", required_argument, NULL, 'c' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	struct cfg g = { .scatter = -1, .clones = 8, .pct = 10, .npages = (256ull << 20) / PAGE };
	struct result alone, tog;
	struct sp_template tmpl = { .fd = -1 };
	struct sp_error err = { 0 };
	const char *ckpt = NULL;
	int tmpl_fd = -1, frame_fd, o, rc;
	uint8_t *buf, *frames;
	int64_t fw0, fw_ns, fw_calls = 0;
	double bound_s;
	long ncpu;

	while ((o = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
		switch (o) {
		case 'w':
			g.scatter = !strcmp(optarg, "same") ? 0 : !strcmp(optarg, "scatter") ? 1 : -2;
			break;
		case 'n':
			g.clones = (unsigned)count(optarg);
			break;
		case 'p':
			g.pct = (unsigned)count(optarg);
			break;
		case 'm':
			g.npages = parse_bytes(optarg) / PAGE;
			break;
		case 'c':
			ckpt = optarg;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return EX_USAGE;
		}
	}
	if (g.scatter < 0 || g.clones == 0 || g.clones > 256 || g.pct == 0 || g.pct > 40 ||
	    g.npages < 16 * RUN_PAGES) {
		fprintf(stderr, "merge_floor: need --workload same|scatter, 1..256 clones, "
				"--pct 1..40 and --mem of at least 4M\n");
		return EX_USAGE;
	}
	if (ckpt) {
		/* KVM clones of a probe checkpoint: its config is the model */
		void *ram;

		rc = sp_vm_prepare(&err);
		if (rc == 0)
			rc = sp_template_open(&tmpl, ckpt, SP_FANOUT_COW, &err);
		if (rc == 0 && (rc = sp_template_map(&tmpl, &ram, &err)) == 0) {
			rc = sp_probe_config_read(ram, tmpl.mem_bytes, &g.probe, &err);
			sp_template_unmap(&tmpl, ram);
		}
		if (rc) {
			fprintf(stderr, "merge_floor: %s\n", err.msg);
			return rc == -ENOENT || rc == -EACCES ? EX_NOINPUT : EX_DATAERR;
		}
		g.tmpl = &tmpl;
		g.npages = tmpl.mem_bytes / PAGE;
	} else {
		g.probe = (struct sp_probe_config){
			.magic = SP_PROBE_MAGIC, .ram_bytes = g.npages * PAGE, .seed = 1,
			.first_data_page = SP_PROBE_DATA_GPA / PAGE, .pages = g.npages,
			.abi = SP_PROBE_ABI,
		};
	}
	if (layout(&g) != 0) {
		fprintf(stderr, "merge_floor: out of memory\n");
		return EX_OSERR;
	}
	/* every isolated page costs two mappings */
	if (g.scatter && 2 * g.ncand + 1024 > 65530) {
		FILE *f = fopen("/proc/sys/vm/max_map_count", "r");
		long have = 0;
		if (!f || fscanf(f, "%ld", &have) != 1 || (uint64_t)have < 2 * g.ncand + 1024) {
			fprintf(stderr, "merge_floor: vm.max_map_count must be at least %" PRIu64
					" for %" PRIu64 " isolated pages (sysctl vm.max_map_count=%" PRIu64 ")\n",
				2 * g.ncand + 1024, g.ncand, 2 * g.ncand + 1024);
			if (f)
				fclose(f);
			return EX_CONFIG;
		}
		fclose(f);
	}
	frame_fd = memfd_create("floor-frames", 0);
	frames = malloc(g.ncand * PAGE);
	buf = malloc(RUN_PAGES * PAGE);
	if (frame_fd < 0 || !frames || !buf || ftruncate(frame_fd, (off_t)(g.ncand * PAGE))) {
		fprintf(stderr, "merge_floor: frames: %s\n", strerror(errno));
		return EX_OSERR;
	}
	if (!ckpt) {
		/* plain clones: a template of the probe model's own pages */
		tmpl_fd = memfd_create("floor-template", 0);
		if (tmpl_fd < 0 || ftruncate(tmpl_fd, (off_t)(g.npages * PAGE))) {
			fprintf(stderr, "merge_floor: template: %s\n", strerror(errno));
			return EX_OSERR;
		}
		for (uint64_t p = 0; p < g.npages; p += RUN_PAGES) {
			for (unsigned i = 0; i < RUN_PAGES; i++) {
				struct sp_probe_pg m = sp_probe_tmpl_page(&g.probe, p + i);
				for (uint64_t j = 0; j < PAGE / 8; j++)
					((uint64_t *)(buf + i * PAGE))[j] = sp_probe_pg_word(&m, j);
			}
			if (pwrite(tmpl_fd, buf, RUN_PAGES * PAGE, (off_t)(p * PAGE)) !=
			    (ssize_t)(RUN_PAGES * PAGE)) {
				fprintf(stderr, "merge_floor: template: %s\n", strerror(errno));
				return EX_OSERR;
			}
		}
	}
	/* Every frame's content, from clone 0's page that maps it (every
	 * clone holds every content), then the frames written one pwrite per
	 * 64 consecutive ones, as the engine's backend stages frames allocated
	 * one after the other: that part is timed. */
	for (uint64_t k = 0; k < g.ncand; k++) {
		uint64_t page, frame;

		cand_at(&g, k, 0, &page, &frame);
		model_fill(&g, page, 0, frames + frame * PAGE);
	}
	fw0 = cpu_ns();
	for (uint64_t k = 0; k < g.ncand;) {
		uint64_t n = g.ncand - k < RUN_PAGES ? g.ncand - k : RUN_PAGES;

		memcpy(buf, frames + k * PAGE, n * PAGE); /* the owner copies too */
		if (pwrite(frame_fd, buf, n * PAGE, (off_t)(k * PAGE)) != (ssize_t)(n * PAGE)) {
			fprintf(stderr, "merge_floor: frames: %s\n", strerror(errno));
			return EX_OSERR;
		}
		fw_calls++;
		k += n;
	}
	fw_ns = cpu_ns() - fw0;
	rc = run_set(&g, tmpl_fd, frame_fd, 1, &alone);
	if (rc == 0)
		rc = run_set(&g, tmpl_fd, frame_fd, 0, &tog);
	if (g.tmpl)
		sp_template_close(&tmpl);
	if (rc)
		return rc;
	ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	/* The bound: the clones' CPU with no contention, spread perfectly
	 * over every core; 95% of the pages at 95% of that time. */
	bound_s = alone.cpu_ns / 1e9 / (double)ncpu;
	printf("{\"workload\":\"%s\",\"kvm\":%s,\"clones\":%u,\"pct\":%u,\"guest_bytes\":%" PRIu64
	       ",\"cpus\":%ld,\"pages_merged\":%" PRIu64 ",\"mmap_calls\":%" PRIu64
	       ",\"alone_cpu_s\":%.4f,\"alone_compare_cpu_s\":%.4f,"
	       "\"compare_us_per_page\":%.3f,\"map_us_per_page\":%.3f,"
	       "\"bound_s\":%.4f,\"bound_t95_s\":%.4f,"
	       "\"together_wall_s\":%.4f,\"together_t95_s\":%.4f,\"together_cpu_s\":%.4f,"
	       "\"frames\":%" PRIu64 ",\"frame_writes\":%" PRId64 ",\"frame_cpu_s\":%.4f,"
	       "\"frame_us_per_page\":%.3f}\n",
	       g.scatter ? "scatter" : "same", g.tmpl ? "true" : "false", g.clones, g.pct,
	       g.npages * PAGE, ncpu,
	       alone.pages, alone.maps, alone.cpu_ns / 1e9, alone.cmp_ns / 1e9,
	       alone.cmp_ns / 1e3 / (double)alone.pages,
	       (alone.cpu_ns - alone.cmp_ns) / 1e3 / (double)alone.pages, bound_s, 0.95 * bound_s,
	       tog.wall_ns / 1e9, tog.t95_ns / 1e9, tog.cpu_ns / 1e9, g.ncand, fw_calls,
	       fw_ns / 1e9, fw_ns / 1e3 / (double)g.ncand);
	free(g.same_pages);
	free(g.frame_of);
	free(frames);
	free(buf);
	close(frame_fd);
	if (tmpl_fd >= 0)
		close(tmpl_fd);
	return 0;
}
