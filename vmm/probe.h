/* SPDX-License-Identifier: MIT */
/*
 * Host side of the probe guest: issue commands, check results against the
 * model in probe_abi.h, take a snapshot, restore from a checkpoint.
 */
#ifndef SAMEPAGE_VMM_PROBE_H
#define SAMEPAGE_VMM_PROBE_H

#include <stdint.h>

#include "samepage/ckpt.h"
#include "samepage/error.h"
#include "vmm/probe_abi.h"
#include "vmm/vm.h"

struct sp_probe {
	struct sp_vm vm;
	int at_cmd;             /* stopped at the guest's GET_CMD exit */
};

struct sp_probe_res {
	uint64_t r[6];          /* rdi, rsi, rdx, rcx, r8, r9 at SP_EV_DONE */
};

/* Run until the guest asks for a command (no-op if it already has). */
int sp_probe_wait_cmd(struct sp_probe *p, struct sp_error *err);

/* Give the guest one command and run it to SP_EV_DONE. */
int sp_probe_call(struct sp_probe *p, uint64_t op, uint64_t a1, uint64_t a2,
		  uint64_t a3, struct sp_probe_res *res, struct sp_error *err);

/* Parse a workload spec: "read", "none", "write:10%", "same:5", ... into
 * kind and basis points. -EINVAL with a message if malformed. */
int sp_probe_parse_workload(const char *spec, uint64_t *kind, uint64_t *bp,
			    struct sp_error *err);
const char *sp_probe_kind_name(uint64_t kind);

/* "12.5", "12.5%" (0 to 100) -> basis points; -EINVAL otherwise. */
int sp_probe_parse_pct(const char *s, uint64_t *bp);

/* Read the config block the guest wrote at fill time. */
int sp_probe_config_read(const void *ram, uint64_t ram_bytes,
			 struct sp_probe_config *c, struct sp_error *err);

/* What a correct guest reports for SP_OP_WORKLOAD (sum and pages touched),
 * computed by the host from the model and from `ram` for system pages. */
void sp_probe_expect(const struct sp_probe_config *c, const void *ram,
		     uint64_t kind, uint64_t bp, uint64_t clone,
		     uint64_t *sum, uint64_t *touched);

/* Run workload (kind, bp) as clone `clone` and check the guest's report:
 * -EIO with a message on any mismatch. */
int sp_probe_workload(struct sp_probe *p, uint64_t kind, uint64_t bp,
		      uint64_t clone, struct sp_error *err);

/* Ask the guest to check every word of every data page against the model;
 * *bad_pages receives how many differ (0 when all is well). */
int sp_probe_verify(struct sp_probe *p, uint64_t kind, uint64_t bp,
		    uint64_t clone, uint64_t *bad_pages, struct sp_error *err);

/* Create a probe VM with fresh RAM, fill it (seed, zero_bp) and write a
 * checkpoint to path. */
struct sp_snapshot_opts {
	uint64_t ram_bytes;
	uint64_t seed;
	uint64_t zero_bp;
};
int sp_probe_snapshot(const char *path, const struct sp_snapshot_opts *o,
		      struct sp_error *err);

/* Restore a probe VM over `ram` (already holding the checkpoint's memory)
 * with the checkpoint's vCPU state, and run it to its first exit. */
int sp_probe_restore(struct sp_probe *p, const struct sp_ckpt *c, void *ram,
		     struct sp_error *err);
void sp_probe_destroy(struct sp_probe *p);

#endif
