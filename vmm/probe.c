/* SPDX-License-Identifier: MIT */
/*
 * Host side of the probe guest (see probe.h and probe_abi.h). The host
 * never trusts the guest's word: every result is recomputed from the model.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#include "vmm/probe.h"

static const char *const kind_names[SP_WL_KINDS] = {
	[SP_WL_NONE] = "none", [SP_WL_READ] = "read", [SP_WL_WRITE] = "write",
	[SP_WL_SAME] = "same", [SP_WL_SCATTER] = "scatter", [SP_WL_ZERO] = "zero",
	[SP_WL_REVERT] = "revert",
};

const char *sp_probe_kind_name(uint64_t kind)
{
	return kind < SP_WL_KINDS ? kind_names[kind] : "?";
}

int sp_probe_parse_workload(const char *spec, uint64_t *kind, uint64_t *bp,
			    struct sp_error *err)
{
	const char *colon = strchr(spec, ':');
	size_t n = colon ? (size_t)(colon - spec) : strlen(spec);
	uint64_t k;

	for (k = 0; k < SP_WL_KINDS; k++)
		if (strlen(kind_names[k]) == n && !strncmp(spec, kind_names[k], n))
			break;
	if (k == SP_WL_KINDS)
		return sp_error_set(err, -EINVAL,
				    "unknown workload '%s' (none, read, write:P%%, same:P%%, scatter:P%%, zero:P%%, revert:P%%)",
				    spec);
	*kind = k;
	*bp = 0;
	if (k == SP_WL_NONE || k == SP_WL_READ) {
		if (colon)
			return sp_error_set(err, -EINVAL, "workload '%.*s' takes no percentage",
					    (int)n, spec);
		return 0;
	}
	if (!colon || !colon[1])
		return sp_error_set(err, -EINVAL, "workload '%s' needs a percentage, e.g. %.*s:10%%",
				    spec, (int)n, spec);
	if (sp_probe_parse_pct(colon + 1, bp))
		return sp_error_set(err, -EINVAL, "bad percentage in workload '%s' (0 to 100)", spec);
	return 0;
}

int sp_probe_parse_pct(const char *s, uint64_t *bp)
{
	char *end;
	double pct;

	errno = 0;
	pct = strtod(s, &end);
	if (*end == '%')
		end++;
	if (errno || end == s || *end || !(pct >= 0 && pct <= 100))
		return -EINVAL;
	*bp = (uint64_t)(pct * 100 + 0.5);
	return 0;
}

int sp_probe_wait_cmd(struct sp_probe *p, struct sp_error *err)
{
	uint32_t ev;
	int rc;

	if (p->at_cmd)
		return 0;
	rc = sp_vm_run_to_event(&p->vm, &ev, err);
	if (rc)
		return rc;
	if (ev != SP_EV_GET_CMD)
		return sp_error_set(err, -EIO, "guest sent event 0x%x, expected GET_CMD", ev);
	p->at_cmd = 1;
	return 0;
}

int sp_probe_call(struct sp_probe *p, uint64_t op, uint64_t a1, uint64_t a2,
		  uint64_t a3, struct sp_probe_res *res, struct sp_error *err)
{
	struct kvm_regs r;
	uint32_t ev;
	int rc = sp_probe_wait_cmd(p, err);

	if (rc)
		return rc;
	if (ioctl(p->vm.vcpu_fd, KVM_GET_REGS, &r) < 0)
		return sp_error_set(err, -errno, "KVM_GET_REGS: %s", strerror(errno));
	r.rdi = op;
	r.rsi = a1;
	r.rdx = a2;
	r.rcx = a3;
	r.r8 = r.r9 = 0;
	if (ioctl(p->vm.vcpu_fd, KVM_SET_REGS, &r) < 0)
		return sp_error_set(err, -errno, "KVM_SET_REGS: %s", strerror(errno));
	p->at_cmd = 0;
	rc = sp_vm_run_to_event(&p->vm, &ev, err);
	if (rc)
		return rc;
	if (ev != SP_EV_DONE && !(op == SP_OP_SNAPSHOT && ev == SP_EV_SNAPSHOT))
		return sp_error_set(err, -EIO, "guest sent event 0x%x to command %llu", ev,
				    (unsigned long long)op);
	if (ioctl(p->vm.vcpu_fd, KVM_GET_REGS, &r) < 0)
		return sp_error_set(err, -errno, "KVM_GET_REGS: %s", strerror(errno));
	if (res) {
		res->r[0] = r.rdi; res->r[1] = r.rsi; res->r[2] = r.rdx;
		res->r[3] = r.rcx; res->r[4] = r.r8; res->r[5] = r.r9;
	}
	return 0;
}

int sp_probe_config_read(const void *ram, uint64_t ram_bytes,
			 struct sp_probe_config *c, struct sp_error *err)
{
	if (ram_bytes < SP_PROBE_MIN_RAM)
		return sp_error_set(err, -EBADMSG, "guest RAM too small for a probe guest");
	memcpy(c, (const uint8_t *)ram + SP_PROBE_CONFIG_GPA, sizeof(*c));
	if (c->magic != SP_PROBE_MAGIC)
		return sp_error_set(err, -EBADMSG,
				    "no probe guest config in this checkpoint (magic 0x%llx)",
				    (unsigned long long)c->magic);
	if (c->abi != SP_PROBE_ABI)
		return sp_error_set(err, -EBADMSG,
				    "the checkpoint's probe guest is version %llu, this samepage checks version %d: "
				    "make a new one with 'samepage snapshot'",
				    (unsigned long long)c->abi, SP_PROBE_ABI);
	if (c->ram_bytes != ram_bytes || c->pages != ram_bytes / SP_PROBE_PAGE ||
	    c->first_data_page != SP_PROBE_DATA_GPA / SP_PROBE_PAGE || c->zero_bp > 10000)
		return sp_error_set(err, -EBADMSG, "probe guest config is inconsistent with the checkpoint");
	return 0;
}

void sp_probe_expect(const struct sp_probe_config *c, const void *ram,
		     uint64_t kind, uint64_t bp, uint64_t clone,
		     uint64_t *sum, uint64_t *touched)
{
	struct sp_probe_scatter sc;
	uint64_t s = 0, t = 0;

	sp_probe_scatter_init(&sc, c, bp);
	switch (kind) {
	case SP_WL_READ:
		for (uint64_t pg = 0; pg < c->pages; pg++) {
			if (pg < c->first_data_page) {
				uint64_t w;
				memcpy(&w, (const uint8_t *)ram + pg * SP_PROBE_PAGE, 8);
				s += w;
			} else {
				struct sp_probe_pg m = sp_probe_tmpl_page(c, pg);
				s += sp_probe_pg_word(&m, 0);
			}
			t++;
		}
		break;
	case SP_WL_WRITE:
	case SP_WL_SAME:
	case SP_WL_ZERO:
	case SP_WL_REVERT:
		for (uint64_t pg = c->first_data_page; pg < c->pages; pg++) {
			if (!sp_probe_wl_sel(c, pg, bp))
				continue;
			struct sp_probe_pg m = sp_probe_model_page(c, &sc, kind, bp, clone, pg);
			s += sp_probe_pg_word(&m, 0);
			t++;
		}
		break;
	case SP_WL_SCATTER:
		for (uint64_t k = 0; k < sc.blocks; k++) {
			uint64_t pg = c->first_data_page + sp_probe_scatter_page(&sc, k, clone);
			struct sp_probe_pg m = sp_probe_model_page(c, &sc, kind, bp, clone, pg);
			s += sp_probe_pg_word(&m, 0);
			t++;
		}
		break;
	default:
		break;
	}
	*sum = s;
	*touched = t;
}

int sp_probe_workload(struct sp_probe *p, uint64_t kind, uint64_t bp,
		      uint64_t clone, struct sp_error *err)
{
	struct sp_probe_config c;
	struct sp_probe_res res;
	uint64_t sum, touched;
	int rc;

	if (kind == SP_WL_NONE)
		return sp_probe_wait_cmd(p, err);
	rc = sp_probe_config_read(p->vm.ram, p->vm.ram_bytes, &c, err);
	if (rc)
		return rc;
	rc = sp_probe_call(p, SP_OP_WORKLOAD, kind, bp, clone, &res, err);
	if (rc)
		return rc;
	sp_probe_expect(&c, p->vm.ram, kind, bp, clone, &sum, &touched);
	if (res.r[1] != 0)
		return sp_error_set(err, -EIO, "clone %llu: guest found %llu wrong words after %s",
				    (unsigned long long)clone, (unsigned long long)res.r[1],
				    sp_probe_kind_name(kind));
	if (res.r[0] != sum || res.r[2] != touched)
		return sp_error_set(err, -EIO,
				    "clone %llu: guest reported sum 0x%llx over %llu pages, model says 0x%llx over %llu",
				    (unsigned long long)clone, (unsigned long long)res.r[0],
				    (unsigned long long)res.r[2], (unsigned long long)sum,
				    (unsigned long long)touched);
	return sp_probe_wait_cmd(p, err);
}

int sp_probe_verify(struct sp_probe *p, uint64_t kind, uint64_t bp,
		    uint64_t clone, uint64_t *bad_pages, struct sp_error *err)
{
	struct sp_probe_config c;
	struct sp_probe_res res;
	int rc = sp_probe_config_read(p->vm.ram, p->vm.ram_bytes, &c, err);

	if (rc)
		return rc;
	rc = sp_probe_call(p, SP_OP_VERIFY, kind, bp, clone, &res, err);
	if (rc)
		return rc;
	if (res.r[0] != c.pages - c.first_data_page)
		return sp_error_set(err, -EIO, "guest verified %llu pages, expected %llu",
				    (unsigned long long)res.r[0],
				    (unsigned long long)(c.pages - c.first_data_page));
	*bad_pages = res.r[1];
	return sp_probe_wait_cmd(p, err);
}

int sp_probe_snapshot(const char *path, const struct sp_snapshot_opts *o,
		      struct sp_error *err)
{
	struct sp_probe p;
	struct sp_probe_res res;
	struct sp_probe_config c;
	struct sp_vcpu_x86 st;
	struct sp_ckpt_image img;
	uint64_t expect = 0;
	void *ram;
	int rc;

	ram = mmap(NULL, o->ram_bytes, PROT_READ | PROT_WRITE,
		   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (ram == MAP_FAILED)
		return sp_error_set(err, -errno, "mmap %llu bytes of guest RAM: %s",
				    (unsigned long long)o->ram_bytes, strerror(errno));
	memset(&p, 0, sizeof(p));
	rc = sp_vm_create(&p.vm, ram, o->ram_bytes, err);
	if (rc)
		goto out_unmap;
	rc = sp_vm_boot_probe(&p.vm, err);
	if (rc)
		goto out;
	rc = sp_probe_call(&p, SP_OP_FILL, o->ram_bytes, o->seed, o->zero_bp, &res, err);
	if (rc)
		goto out;
	rc = sp_probe_config_read(ram, o->ram_bytes, &c, err);
	if (rc)
		goto out;
	for (uint64_t pg = c.first_data_page; pg < c.pages; pg++) {
		struct sp_probe_pg m = sp_probe_tmpl_page(&c, pg);
		expect += sp_probe_pg_word(&m, 0) + sp_probe_pg_word(&m, SP_PROBE_WORDS - 1);
	}
	if (res.r[0] != expect) {
		rc = sp_error_set(err, -EIO, "guest fill checksum 0x%llx, model says 0x%llx",
				  (unsigned long long)res.r[0], (unsigned long long)expect);
		goto out;
	}
	rc = sp_probe_call(&p, SP_OP_SNAPSHOT, 0, 0, 0, NULL, err);
	if (rc)
		goto out;
	rc = sp_vm_save_vcpu(&p.vm, &st, err);
	if (rc)
		goto out;
	img = (struct sp_ckpt_image){
		.mem = ram,
		.mem_bytes = o->ram_bytes,
		.vcpu_arch = SP_CKPT_ARCH_X86_64,
		.vcpu = &st,
		.vcpu_bytes = sizeof(st),
	};
	rc = sp_ckpt_write(path, &img, err);
out:
	sp_vm_destroy(&p.vm);
out_unmap:
	munmap(ram, o->ram_bytes);
	return rc;
}

int sp_probe_restore(struct sp_probe *p, const struct sp_ckpt *c, void *ram,
		     struct sp_error *err)
{
	const struct sp_ckpt_info *in = sp_ckpt_info(c);
	int rc;

	if (in->vcpu_arch != SP_CKPT_ARCH_X86_64 || in->vcpu_bytes != sizeof(struct sp_vcpu_x86))
		return sp_error_set(err, -EBADMSG,
				    "checkpoint vCPU state is arch %u, %u bytes; this VMM needs x86-64, %zu bytes",
				    in->vcpu_arch, in->vcpu_bytes, sizeof(struct sp_vcpu_x86));
	memset(p, 0, sizeof(*p));
	rc = sp_vm_create(&p->vm, ram, in->mem_bytes, err);
	if (rc)
		return rc;
	rc = sp_vm_load_vcpu(&p->vm, sp_ckpt_vcpu(c), err);
	if (rc == 0)
		rc = sp_probe_wait_cmd(p, err);
	if (rc)
		sp_vm_destroy(&p->vm);
	return rc;
}

void sp_probe_destroy(struct sp_probe *p)
{
	sp_vm_destroy(&p->vm);
}
