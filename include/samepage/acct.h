/* SPDX-License-Identifier: MIT */
/*
 * Honest memory accounting for a fan-out (see DESIGN.md, "Honest
 * accounting"). A run gets a memory cgroup of its own (cgroup v1 at
 * /sys/fs/cgroup/memory, or v2 where that is what the host has); every
 * clone process is born inside it, so the cgroup's counters hold exactly
 * what the run costs the host: the template's page cache once, every
 * clone's private pages, page tables, KVM's shadow/secondary page tables
 * and other kernel allocations charged to the run. PSS from
 * /proc/PID/smaps_rollup is the cross-check.
 */
#ifndef SAMEPAGE_ACCT_H
#define SAMEPAGE_ACCT_H

#include <stdint.h>
#include <sys/types.h>

#include "samepage/error.h"

struct sp_acct;   /* one run's memory cgroup (opaque) */

/* Counters at one instant. Fields are -1 where the source lacks them. */
struct sp_mem_sample {
	int64_t usage_bytes;         /* cgroup: everything charged */
	int64_t kmem_bytes;          /* cgroup: kernel allocations */
	int64_t anon_bytes;          /* cgroup: anonymous (private) memory */
	int64_t cache_bytes;         /* cgroup: page cache incl. shmem */
	int64_t shmem_bytes;         /* cgroup: shmem/tmpfs/memfd pages */
	int64_t mapped_file_bytes;   /* cgroup: mapped file pages */
	int64_t sec_pagetables_bytes;/* host-wide /proc/meminfo SecPageTables */
	int64_t pagetables_bytes;    /* host-wide /proc/meminfo PageTables */
};

/* Create a fresh memory cgroup named "samepage-<tag>-<pid>" and remember
 * the caller's current cgroup so sp_acct_close() can return to it.
 * Returns -EPERM/-ENOENT when cgroups cannot be used (not root, no memory
 * controller); the message says why. A second open in the same process
 * is named "samepage-<tag>-<pid>.<n>" (n = 2, 3, ...). */
int sp_acct_open(struct sp_acct **out, const char *tag, struct sp_error *err);

/* Move pid (0: the calling process) into the run's cgroup. Children
 * forked afterwards are born inside it. */
int sp_acct_attach(struct sp_acct *a, pid_t pid, struct sp_error *err);

/* Read the cgroup's counters (plus the host-wide page-table lines). */
int sp_acct_sample(struct sp_acct *a, struct sp_mem_sample *s,
		   struct sp_error *err);

/* Path of the cgroup directory, for logs. */
const char *sp_acct_path(const struct sp_acct *a);

/* Move the caller back to its original cgroup, then remove the run's
 * cgroup (retrying while exiting tasks drain). Safe with a == NULL. */
void sp_acct_close(struct sp_acct *a);

/* sp_acct_close() that says how it went: 0 once the run's cgroup is gone,
 * else -errno (-EBUSY: tasks did not drain within ~2 s) with err filled.
 * Frees a in every case; safe with a == NULL (returns 0). */
int sp_acct_release(struct sp_acct *a, struct sp_error *err);

/* Remove leftover "samepage-*" cgroups of runs whose process died without
 * closing (killed, or a test that failed mid-way): empty ones named with a
 * pid that no longer exists, in the caller's cgroup and the mount root.
 * *removed (may be NULL) counts them. 0 or -errno. */
int sp_acct_reap_stale(unsigned int *removed, struct sp_error *err);

/* One process's view: /proc/PID/smaps_rollup and VmPTE from status. */
struct sp_proc_mem {
	int64_t rss_bytes;
	int64_t pss_bytes;
	int64_t pss_anon_bytes;
	int64_t pss_file_bytes;
	int64_t pss_shmem_bytes;
	int64_t anon_bytes;          /* "Anonymous" */
	int64_t pte_bytes;           /* VmPTE: this process's page tables */
};
int sp_acct_proc(pid_t pid, struct sp_proc_mem *m, struct sp_error *err);

/* The density table's row, computed from samples taken before the
 * template was made (base), after it was made (tmpl) and after every
 * clone settled (end), plus the per-process sums. */
struct sp_density {
	uint32_t clones;
	uint64_t guest_bytes;        /* one clone's guest RAM */
	double naive_bytes;          /* clones * guest_bytes */
	double increase_bytes;       /* Δ(usage - cache + shmem), base..end */
	double template_bytes;       /* Δshmem base..tmpl (0 in copy mode) */
	double per_vm_bytes;         /* (increase - template) / clones */
	double ratio;                /* naive / increase */
	/* breakdown of increase - template */
	double private_anon_bytes;   /* Δanon */
	double pagetables_bytes;     /* Σ VmPTE of the clones */
	double kvm_pagetables_bytes; /* Δ SecPageTables (host-wide line) */
	double other_kernel_bytes;   /* Δkmem - the two above, >= 0 */
	/* cross-check */
	double pss_sum_bytes;        /* Σ PSS of clones (+ owner) */
};
/* Fills every field of d. A value that cannot be known (a needed sample
 * field is -1, clones is 0, the increase is not positive) is NAN; tmpl may
 * be NULL (no template step: template_bytes = 0). Missing SecPageTables
 * gives kvm_pagetables_bytes = NAN and is taken as 0 in other_kernel.
 * See docs/accounting.md. */
void sp_density_compute(struct sp_density *d, uint32_t clones,
			uint64_t guest_bytes, const struct sp_mem_sample *base,
			const struct sp_mem_sample *tmpl,
			const struct sp_mem_sample *end, double pte_sum_bytes,
			double pss_sum_bytes);

#endif
