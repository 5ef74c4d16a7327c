/* SPDX-License-Identifier: MIT */
/*
 * The probe guest: a tiny freestanding x86-64 program that runs at CPL3
 * inside a samepage VM (see DESIGN.md: on the PVM backend only CPL3 code
 * runs natively). It loops forever: ask the host for a command, run it over
 * guest RAM, report the result. The host checks every result against the
 * same model (vmm/probe_abi.h), so a clone that sees another clone's data,
 * or stale template data, is caught.
 *
 * No data or bss: all state lives in the config block in guest RAM, so the
 * program image itself never changes after load.
 */
#include "vmm/probe_abi.h"

struct regs6 {
	uint64_t a0, a1, a2, a3, a4, a5;
};

/* One exit to the host: event in eax, arguments/results in six registers. */
static inline void hcall(uint64_t ev, struct regs6 *r)
{
	register uint64_t rdi __asm__("rdi") = r->a0;
	register uint64_t rsi __asm__("rsi") = r->a1;
	register uint64_t rdx __asm__("rdx") = r->a2;
	register uint64_t rcx __asm__("rcx") = r->a3;
	register uint64_t r8 __asm__("r8") = r->a4;
	register uint64_t r9 __asm__("r9") = r->a5;

	__asm__ volatile("outl %%eax, $0x10"
			 : "+r"(rdi), "+r"(rsi), "+r"(rdx), "+r"(rcx), "+r"(r8), "+r"(r9)
			 : "a"((uint32_t)ev)
			 : "memory");
	r->a0 = rdi; r->a1 = rsi; r->a2 = rdx; r->a3 = rcx; r->a4 = r8; r->a5 = r9;
}

#define CFG ((volatile struct sp_probe_config *)SP_PROBE_CONFIG_GPA)

static inline uint64_t *page_ptr(uint64_t page)
{
	return (uint64_t *)(page * SP_PROBE_PAGE);
}

static void cfg_load(struct sp_probe_config *c)
{
	c->magic = CFG->magic;
	c->ram_bytes = CFG->ram_bytes;
	c->seed = CFG->seed;
	c->zero_bp = CFG->zero_bp;
	c->first_data_page = CFG->first_data_page;
	c->pages = CFG->pages;
	c->abi = CFG->abi;
}

static void fill_page(uint64_t *p, const struct sp_probe_pg *pg)
{
	for (uint64_t j = 0; j < SP_PROBE_WORDS; j++)
		p[j] = sp_probe_pg_word(pg, j);
}

/* Number of words of page p that differ from pg. */
static uint64_t check_page(const uint64_t *p, const struct sp_probe_pg *pg)
{
	uint64_t bad = 0;

	for (uint64_t j = 0; j < SP_PROBE_WORDS; j++)
		bad += p[j] != sp_probe_pg_word(pg, j);
	return bad;
}

static void op_fill(struct regs6 *r)
{
	struct sp_probe_config c;
	uint64_t sum = 0;

	CFG->magic = SP_PROBE_MAGIC;
	CFG->ram_bytes = r->a1;
	CFG->seed = r->a2;
	CFG->zero_bp = r->a3;
	CFG->first_data_page = SP_PROBE_DATA_GPA / SP_PROBE_PAGE;
	CFG->pages = r->a1 / SP_PROBE_PAGE;
	CFG->abi = SP_PROBE_ABI;
	cfg_load(&c);
	for (uint64_t pg = c.first_data_page; pg < c.pages; pg++) {
		struct sp_probe_pg t = sp_probe_tmpl_page(&c, pg);
		uint64_t *p = page_ptr(pg);
		fill_page(p, &t);
		sum += p[0] + p[SP_PROBE_WORDS - 1];
	}
	r->a0 = sum;
	r->a1 = 0;
}

/* Run workload (kind, bp) as clone `clone`; verify the pages it wrote. */
static void op_workload(struct regs6 *r)
{
	struct sp_probe_config c;
	struct sp_probe_scatter sc;
	uint64_t kind = r->a1, bp = r->a2, clone = r->a3;
	uint64_t sum = 0, bad = 0, touched = 0;
	uint64_t *scratch = (uint64_t *)SP_PROBE_SCRATCH_GPA;

	cfg_load(&c);
	sp_probe_scatter_init(&sc, &c, bp);
	switch (kind) {
	case SP_WL_READ:
		for (uint64_t pg = 0; pg < c.pages; pg++) {
			uint64_t w = *(volatile uint64_t *)page_ptr(pg);
			sum += w;
			if (pg >= c.first_data_page) {
				struct sp_probe_pg t = sp_probe_tmpl_page(&c, pg);
				bad += w != sp_probe_pg_word(&t, 0);
			}
			touched++;
		}
		break;
	case SP_WL_WRITE:
	case SP_WL_SAME:
	case SP_WL_ZERO:
		for (uint64_t pg = c.first_data_page; pg < c.pages; pg++) {
			if (!sp_probe_wl_sel(&c, pg, bp))
				continue;
			struct sp_probe_pg m = sp_probe_model_page(&c, &sc, kind, bp, clone, pg);
			fill_page(page_ptr(pg), &m);
			bad += check_page(page_ptr(pg), &m);
			sum += page_ptr(pg)[0];
			touched++;
		}
		break;
	case SP_WL_SCATTER:
		for (uint64_t k = 0; k < sc.blocks; k++) {
			uint64_t pg = c.first_data_page + sp_probe_scatter_page(&sc, k, clone);
			struct sp_probe_pg m = sp_probe_model_page(&c, &sc, kind, bp, clone, pg);
			fill_page(page_ptr(pg), &m);
			bad += check_page(page_ptr(pg), &m);
			sum += page_ptr(pg)[0];
			touched++;
		}
		break;
	case SP_WL_REVERT:
		for (uint64_t pg = c.first_data_page; pg < c.pages; pg++) {
			if (!sp_probe_wl_sel(&c, pg, bp))
				continue;
			uint64_t *p = page_ptr(pg);
			struct sp_probe_pg u = { 0, pg, sp_probe_unique_salt(&c, clone) };
			for (uint64_t j = 0; j < SP_PROBE_WORDS; j++)
				scratch[j] = p[j];
			fill_page(p, &u);
			bad += check_page(p, &u);
			for (uint64_t j = 0; j < SP_PROBE_WORDS; j++)
				p[j] = scratch[j];
			struct sp_probe_pg t = sp_probe_tmpl_page(&c, pg);
			bad += check_page(p, &t);
			sum += p[0];
			touched++;
		}
		break;
	default:
		break;
	}
	r->a0 = sum;
	r->a1 = bad;
	r->a2 = touched;
}

/* Check every word of every data page against the model. */
static void op_verify(struct regs6 *r)
{
	struct sp_probe_config c;
	struct sp_probe_scatter sc;
	uint64_t kind = r->a1, bp = r->a2, clone = r->a3;
	uint64_t bad_pages = 0, first_bad = ~0ull;

	cfg_load(&c);
	sp_probe_scatter_init(&sc, &c, bp);
	for (uint64_t pg = c.first_data_page; pg < c.pages; pg++) {
		struct sp_probe_pg m = sp_probe_model_page(&c, &sc, kind, bp, clone, pg);
		if (check_page(page_ptr(pg), &m)) {
			if (bad_pages++ == 0)
				first_bad = pg;
		}
	}
	r->a0 = c.pages - c.first_data_page;
	r->a1 = bad_pages;
	r->a2 = first_bad;
}

__attribute__((section(".text.start"), noreturn)) void _start(void);
void _start(void)
{
	struct regs6 r;

	for (;;) {
		r.a0 = r.a1 = r.a2 = r.a3 = r.a4 = r.a5 = 0;
		hcall(SP_EV_GET_CMD, &r);
		switch (r.a0) {
		case SP_OP_FILL:
			op_fill(&r);
			break;
		case SP_OP_SNAPSHOT:
			hcall(SP_EV_SNAPSHOT, &r);
			/* a restored clone continues here: straight back to
			 * GET_CMD, so its first exit asks for a command */
			continue;
		case SP_OP_WORKLOAD:
			op_workload(&r);
			break;
		case SP_OP_VERIFY:
			op_verify(&r);
			break;
		case SP_OP_PING:
			r.a0 = 0;
			r.a1 = CFG->magic;
			break;
		case SP_OP_READ_WORD:
			r.a0 = *(volatile uint64_t *)r.a1;
			break;
		default:
			r.a0 = ~0ull;
			break;
		}
		hcall(SP_EV_DONE, &r);
	}
}
