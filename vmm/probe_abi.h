/* SPDX-License-Identifier: MIT */
/*
 * The probe guest's ABI and memory model, shared by the guest program
 * (vmm/guest/probe.c, freestanding, runs at CPL3 inside the VM) and the
 * host (vmm/probe.c). Everything here is static inline and uses no libc so
 * that both sides compile the very same definitions.
 *
 * Guest-physical layout (guest RAM is one slot at GPA 0):
 *
 *   0x00001000  probe code (loaded by the host before the first run)
 *   0x00010000  page tables: PML4, PDPT, PDs (identity map, 2 MiB pages)
 *   0x00030000  stack (grows down from SP_PROBE_STACK_TOP)
 *   0x00030000  config block (struct sp_probe_config)
 *   0x00031000  scratch page (the revert workload's saved copy)
 *   0x00200000  data pages: everything from here to the end of RAM
 *
 * Host <-> guest protocol: the guest executes `out %eax, $SP_PROBE_PORT`
 * with an event code in eax and arguments in rdi, rsi, rdx, rcx, r8, r9.
 * For SP_EV_GET_CMD the host answers by writing the command into those
 * registers before resuming (RIP untouched, so the guest continues where it
 * stopped); for SP_EV_DONE the registers carry the results.
 *
 * Page content model: every non-zero template word is
 * sp_probe_word(page, word, salt) with the low bit set, so pages are
 * distinct from each other and never zero unless chosen as zero pages.
 */
#ifndef SAMEPAGE_PROBE_ABI_H
#define SAMEPAGE_PROBE_ABI_H

#include <stdint.h>

#define SP_PROBE_PAGE 4096ull
#define SP_PROBE_WORDS (SP_PROBE_PAGE / 8)
#define SP_PROBE_CODE_GPA 0x1000ull
#define SP_PROBE_CODE_MAX (0x10000ull - 0x1000ull)
#define SP_PROBE_PT_GPA 0x10000ull        /* PML4; PDPT at +0x1000; PDs after */
#define SP_PROBE_MAX_PD 16                /* => at most 16 GiB of guest RAM */
#define SP_PROBE_STACK_TOP 0x30000ull
#define SP_PROBE_CONFIG_GPA 0x30000ull
#define SP_PROBE_SCRATCH_GPA 0x31000ull
#define SP_PROBE_DATA_GPA 0x200000ull
#define SP_PROBE_MIN_RAM (4ull << 20)
#define SP_PROBE_MAX_RAM ((uint64_t)SP_PROBE_MAX_PD << 30)
#define SP_PROBE_PORT 0x10

/* events (eax of the guest's out) */
#define SP_EV_GET_CMD 0x5350434dull   /* "SPCM": ask for the next command */
#define SP_EV_DONE 0x5350444full      /* "SPDO": command finished, results in regs */
#define SP_EV_SNAPSHOT 0x5350534eull  /* "SPSN": stopped for a snapshot */

/* commands (rdi of the answer to GET_CMD) */
enum sp_probe_op {
	SP_OP_FILL = 1,     /* rsi=ram_bytes rdx=seed rcx=zero_bp: fill template, -> checksum */
	SP_OP_SNAPSHOT = 2, /* out SP_EV_SNAPSHOT, then continue with GET_CMD */
	SP_OP_WORKLOAD = 3, /* rsi=kind rdx=bp rcx=clone: run a workload, -> sum, mismatches */
	SP_OP_VERIFY = 4,   /* rsi=kind rdx=bp rcx=clone: check every word of every data page */
	SP_OP_PING = 5,     /* -> rsi=config magic */
	SP_OP_READ_WORD = 6,/* rsi=gpa -> qword there */
};

/* workload kinds */
enum sp_probe_kind {
	SP_WL_NONE = 0,     /* touch nothing (restore-latency runs) */
	SP_WL_READ = 1,     /* read one word of every page */
	SP_WL_WRITE = 2,    /* P% of data pages get content unique to the clone */
	SP_WL_SAME = 3,     /* P% of data pages get content identical in all clones */
	SP_WL_SCATTER = 4,  /* identical blocks at clone-specific pages */
	SP_WL_ZERO = 5,     /* P% of data pages are zeroed */
	SP_WL_REVERT = 6,   /* P% written with unique data, then the original restored */
	SP_WL_KINDS = 7,
};

#define SP_PROBE_MAGIC 0x53414d4550414745ull /* "SAMEPAGE" */

/* Lives at SP_PROBE_CONFIG_GPA; written by SP_OP_FILL, so it is in every
 * checkpoint and every clone (and the host) can read it. */
struct sp_probe_config {
	uint64_t magic;
	uint64_t ram_bytes;
	uint64_t seed;
	uint64_t zero_bp;      /* zero pages, basis points of data pages */
	uint64_t first_data_page;
	uint64_t pages;        /* ram_bytes / 4096 */
	uint64_t abi;          /* SP_PROBE_ABI of the guest that wrote it */
};

/* Version of the guest program and its model. The program lives in the
 * checkpoint's memory, so a checkpoint made by another version runs that
 * version's workloads: the host refuses to check it against this model. */
#define SP_PROBE_ABI 2

/* salts keep the streams of the model apart */
#define SP_SALT_SEL_ZERO 0x7a65726f5a45524full
#define SP_SALT_SEL_WL 0x776f726b6c6f6164ull
#define SP_SALT_UNIQUE 0x756e697175653132ull
#define SP_SALT_SAME 0x73616d6573616d65ull
#define SP_SALT_SCATTER 0x7363617474657221ull

static inline uint64_t sp_probe_mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

static inline uint64_t sp_probe_word(uint64_t page, uint64_t word, uint64_t salt)
{
	return sp_probe_mix((page << 9 | word) ^ salt) | 1;
}

/* Is `page` chosen, at `bp` basis points (0..10000), under `salt`? */
static inline int sp_probe_sel(uint64_t page, uint64_t bp, uint64_t salt)
{
	return sp_probe_mix(page ^ salt) % 10000 < bp;
}

/* Greatest common divisor, for the scatter permutation. */
static inline uint64_t sp_probe_gcd(uint64_t a, uint64_t b)
{
	while (b) {
		uint64_t t = a % b;
		a = b;
		b = t;
	}
	return a;
}

/* Scatter: block k (0 <= k < blocks) of clone `clone` goes to data page
 * index (k * stride + clone * shift) mod D, a permutation of 0..D-1 for a
 * fixed clone, different for different clones. D < 2^22, so products of
 * two residues fit in 64 bits. */
struct sp_probe_scatter {
	uint64_t ndata, blocks, stride, shift, inv; /* inv: stride^-1 mod D */
};

static inline void sp_probe_scatter_init(struct sp_probe_scatter *s,
					 const struct sp_probe_config *c, uint64_t bp)
{
	uint64_t stride = 40503;
	int64_t t = 0, nt = 1, r, nr;

	s->ndata = c->pages - c->first_data_page;
	s->blocks = s->ndata * bp / 10000;
	while (sp_probe_gcd(stride, s->ndata) != 1)
		stride++;
	s->stride = stride % s->ndata;
	s->shift = 7919 % s->ndata;
	if (s->shift == 0)
		s->shift = 1;
	/* modular inverse of stride by the extended Euclidean algorithm */
	r = (int64_t)s->ndata;
	nr = (int64_t)s->stride;
	while (nr != 0) {
		int64_t q = r / nr, tmp;
		tmp = t - q * nt; t = nt; nt = tmp;
		tmp = r - q * nr; r = nr; nr = tmp;
	}
	if (t < 0)
		t += (int64_t)s->ndata;
	s->inv = (uint64_t)t;
}

/* Data page index of block k in clone `clone` (relative to first data). */
static inline uint64_t sp_probe_scatter_page(const struct sp_probe_scatter *s,
					     uint64_t k, uint64_t clone)
{
	uint64_t d = s->ndata;
	return (k * s->stride % d + (clone % d) * s->shift % d) % d;
}

/* Data-page index (relative to first_data_page) -> block k, or -1. */
static inline int64_t sp_probe_scatter_block(const struct sp_probe_scatter *s,
					     uint64_t rel, uint64_t clone)
{
	uint64_t d = s->ndata, off = (clone % d) * s->shift % d;
	uint64_t k = (rel + d - off) % d * s->inv % d;
	return k < s->blocks ? (int64_t)k : -1;
}

/* What a data page holds: all zero, or words sp_probe_word(src, j, salt). */
struct sp_probe_pg {
	uint64_t zero, src, salt;
};

static inline uint64_t sp_probe_pg_word(const struct sp_probe_pg *p, uint64_t word)
{
	return p->zero ? 0 : sp_probe_word(p->src, word, p->salt);
}

static inline struct sp_probe_pg sp_probe_tmpl_page(const struct sp_probe_config *c,
						    uint64_t page)
{
	struct sp_probe_pg p = { 0, page, c->seed };

	p.zero = (uint64_t)sp_probe_sel(page, c->zero_bp, c->seed ^ SP_SALT_SEL_ZERO);
	return p;
}

/* Salt of the unique content clone `clone` writes (write, revert). */
static inline uint64_t sp_probe_unique_salt(const struct sp_probe_config *c,
					    uint64_t clone)
{
	return c->seed ^ SP_SALT_UNIQUE ^ sp_probe_mix(clone + 1);
}

/* Workloads other than scatter write runs of this many adjacent pages
 * (256 KiB), chosen at random: software loads, heaps and freed buffers are
 * contiguous in real guests, and the merge benchmark's same:P% is defined
 * as "identical runs at the same addresses". scatter:P% stays one page at
 * a time, the hard case. */
#define SP_PROBE_RUN_PAGES 64

/* Is data page `page` one the workload (kind, bp) writes (not scatter)?
 * bp basis points of the runs are chosen, so bp of the pages on average. */
static inline int sp_probe_wl_sel(const struct sp_probe_config *c, uint64_t page,
				  uint64_t bp)
{
	return sp_probe_sel(page / SP_PROBE_RUN_PAGES, bp, c->seed ^ SP_SALT_SEL_WL);
}

/*
 * The model: what data page `page` of clone `clone` holds after workload
 * (kind, bp) ran on a fresh restore. System pages (below first_data_page)
 * are not modelled; callers only ask for data pages.
 */
static inline struct sp_probe_pg sp_probe_model_page(const struct sp_probe_config *c,
						     const struct sp_probe_scatter *sc,
						     uint64_t kind, uint64_t bp,
						     uint64_t clone, uint64_t page)
{
	struct sp_probe_pg p = sp_probe_tmpl_page(c, page);
	struct sp_probe_pg w = { 0, page, 0 };
	int64_t k;

	switch (kind) {
	case SP_WL_WRITE:
		if (sp_probe_wl_sel(c, page, bp)) {
			w.salt = sp_probe_unique_salt(c, clone);
			return w;
		}
		break;
	case SP_WL_SAME:
		if (sp_probe_wl_sel(c, page, bp)) {
			w.salt = c->seed ^ SP_SALT_SAME;
			return w;
		}
		break;
	case SP_WL_ZERO:
		if (sp_probe_wl_sel(c, page, bp)) {
			w.zero = 1;
			return w;
		}
		break;
	case SP_WL_SCATTER:
		k = sp_probe_scatter_block(sc, page - c->first_data_page, clone);
		if (k >= 0) {
			w.src = (uint64_t)k;
			w.salt = c->seed ^ SP_SALT_SCATTER;
			return w;
		}
		break;
	default:
		break;
	}
	return p;
}

#endif
