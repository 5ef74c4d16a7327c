/* SPDX-License-Identifier: MIT */
/*
 * The clone runner: restore N probe clones from one checkpoint, each in a
 * process of its own, run a workload in each, let them settle and measure
 * what the whole fan-out costs the host (samepage/acct.h).
 *
 * Clone processes are forked by the runner (the owner) and talk to it over
 * a socketpair each: the owner says RUN, VERIFY or EXIT; a clone answers
 * with its result. A clone whose owner goes away exits (EOF on its socket).
 */
#ifndef SAMEPAGE_VMM_CLONES_H
#define SAMEPAGE_VMM_CLONES_H

#include <signal.h>
#include <stdint.h>
#include <sys/types.h>

#include "samepage/acct.h"
#include "samepage/fanout.h"

struct sp_fanout_opts {
	const char *ckpt_path;
	enum sp_fanout_mode mode;
	uint32_t clones;
	uint64_t kind;          /* SP_WL_* */
	uint64_t bp;            /* workload percentage, basis points */
	uint32_t concurrency;   /* restores in flight (1 = one at a time) */
	uint32_t jobs;          /* workloads in flight */
	uint32_t settle_ms;     /* wait after the last workload, before measuring */
	int progress;           /* progress lines on stderr */
	int merge;              /* run the merge engine over the clones */
	uint32_t domains;       /* merge domains, assigned round-robin (>= 1) */
	const char *ctl_path;   /* the owner's control socket */
	const char *const *knobs; /* "merge.NAME=VALUE" settings, NULL-ended */
	int ksm;                /* clones opt their guest RAM in to Linux KSM
				   (MADV_MERGEABLE): the comparison baseline */
};

struct sp_clone {
	pid_t pid;
	int sock;               /* runner's end of the control socket */
	int msock;              /* runner's end of the merge socket (-1) */
	int mbell;              /* the merge socket's doorbell, an eventfd (-1) */
	uint64_t ram_addr;      /* guest RAM in the clone's address space */
	uint64_t restore_ns;    /* restore call to the guest's first exit */
	uint64_t workload_ns;
	int alive;
};

struct sp_fanout {
	struct sp_fanout_opts o;
	struct sp_template tmpl;
	struct sp_acct *acct;           /* NULL when cgroups are unusable */
	char acct_note[SP_ERRMSG_LEN];  /* why, then */
	struct sp_clone *clone;
	uint32_t nclones;               /* started so far */
	struct sp_mem_sample s_base, s_tmpl, s_end;
	struct sp_density density;
	double restore_p50_ms, restore_p99_ms, restore_max_ms;
	double workload_wall_s;         /* first RUN to last answer */
	double setup_s;                 /* template build */
	/* merge (o.merge) */
	pid_t owner_pid;
	double merge_converge_s;        /* owner start to the engine's converged flag */
	double merge_t95_s;             /* owner start to 95% of the final saving */
	double merge_owner_cpu_s;       /* owner process CPU until converged */
	double merge_clones_cpu_s;      /* clones' CPU while merging (applying batches) */
	int64_t merge_stat[6];          /* pages_sharing, zero_pages, pages_template,
					   pages_shared, pages_unshared, full_scans */
};

/* Run one clone's workload (kind, bp) again, or verify it against that
 * model: for tests that change one clone and check the others. */
int sp_fanout_run_one(struct sp_fanout *f, uint32_t idx, uint64_t kind, uint64_t bp,
		      struct sp_error *err);
int sp_fanout_verify_one(struct sp_fanout *f, uint32_t idx, uint64_t kind, uint64_t bp,
			 uint64_t *bad_pages, struct sp_error *err);

/* Set by a signal handler: waits give up with -EINTR and tear down. */
extern volatile sig_atomic_t sp_fanout_interrupted;

/* Build the template, restore every clone, run the workload, settle and
 * measure (f->density). On failure everything started is torn down. */
int sp_fanout_start(struct sp_fanout *f, const struct sp_fanout_opts *o,
		    struct sp_error *err);

/* Ask every clone's guest to check all its data pages against its own
 * model; *bad_clones receives how many found any difference. */
int sp_fanout_verify(struct sp_fanout *f, uint32_t *bad_clones, struct sp_error *err);

/* Re-measure (after something changed memory, e.g. a merge). */
int sp_fanout_measure(struct sp_fanout *f, struct sp_error *err);

/* Stop every clone, remove the template and the cgroup. */
void sp_fanout_stop(struct sp_fanout *f);

#endif
