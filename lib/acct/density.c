/* SPDX-License-Identifier: MIT */
/*
 * The density table's arithmetic (see acct.h and docs/accounting.md): turn
 * three memory samples of a fan-out run (before the template, after the
 * template, after every clone settled) into naive cost, host increase,
 * per-VM overhead, ratio and its breakdown. OS-neutral: it only subtracts
 * numbers some backend measured. A field a backend could not measure is
 * -1 in the sample; anything computed from it is NAN, never a made-up 0.
 */
#include <math.h>
#include <stddef.h>

#include "samepage/acct.h"

/* end - start, or NAN when either side is unknown. */
static double delta(int64_t start, int64_t end)
{
	if (start < 0 || end < 0)
		return NAN;
	return (double)end - (double)start;
}

/* What the run holds that the kernel cannot simply drop: everything
 * charged minus the page cache, plus back the shmem part of that cache
 * (shmem/memfd pages cannot be dropped, only swapped). */
static double held(const struct sp_mem_sample *s)
{
	if (s->usage_bytes < 0 || s->cache_bytes < 0 || s->shmem_bytes < 0)
		return NAN;
	return (double)s->usage_bytes - (double)s->cache_bytes +
	       (double)s->shmem_bytes;
}

void sp_density_compute(struct sp_density *d, uint32_t clones,
			uint64_t guest_bytes, const struct sp_mem_sample *base,
			const struct sp_mem_sample *tmpl,
			const struct sp_mem_sample *end, double pte_sum_bytes,
			double pss_sum_bytes)
{
	double kernel, known;

	if (d == NULL)
		return;
	d->clones = clones;
	d->guest_bytes = guest_bytes;
	d->naive_bytes = (double)clones * (double)guest_bytes;
	d->pagetables_bytes = pte_sum_bytes;
	d->pss_sum_bytes = pss_sum_bytes;
	if (base == NULL || end == NULL) {
		d->increase_bytes = d->template_bytes = d->per_vm_bytes = NAN;
		d->ratio = d->private_anon_bytes = NAN;
		d->kvm_pagetables_bytes = d->other_kernel_bytes = NAN;
		return;
	}

	d->increase_bytes = held(end) - held(base);
	d->template_bytes = tmpl == NULL ? 0.0 :
			    delta(base->shmem_bytes, tmpl->shmem_bytes);
	d->per_vm_bytes = clones == 0 ? NAN :
			  (d->increase_bytes - d->template_bytes) / clones;
	d->ratio = d->increase_bytes > 0 ? d->naive_bytes / d->increase_bytes : NAN;

	d->private_anon_bytes = delta(base->anon_bytes, end->anon_bytes);
	d->kvm_pagetables_bytes = delta(base->sec_pagetables_bytes,
					end->sec_pagetables_bytes);
	/* Both page-table kinds are charged to kmem (measured, see the doc);
	 * what kmem holds beyond them is "other". An unknown part counts 0
	 * here so that the rest of kmem is not lost from the breakdown. */
	kernel = delta(base->kmem_bytes, end->kmem_bytes);
	known = (isnan(pte_sum_bytes) ? 0.0 : pte_sum_bytes) +
		(isnan(d->kvm_pagetables_bytes) ? 0.0 : d->kvm_pagetables_bytes);
	if (isnan(kernel))
		d->other_kernel_bytes = NAN;
	else
		d->other_kernel_bytes = kernel - known > 0 ? kernel - known : 0.0;
}
