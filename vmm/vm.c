/* SPDX-License-Identifier: MIT */
/*
 * KVM plumbing for probe VMs (see vm.h). Kept small and explicit: every
 * ioctl's failure becomes one error line naming the ioctl.
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "vmm/probe_abi.h"
#include "vmm/vm.h"

extern const unsigned char sp_probe_image[], sp_probe_image_end[];

/* KVM_GET_SUPPORTED_CPUID answer, read once per process. */
static struct {
	struct kvm_cpuid2 head;
	struct kvm_cpuid_entry2 ent[256];
} cpuid;
static int have_cpuid;

int sp_vm_prepare(struct sp_error *err)
{
	int fd, rc = 0;

	if (have_cpuid)
		return 0;
	fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return sp_error_set(err, -errno, "open /dev/kvm: %s", strerror(errno));
	cpuid.head.nent = 256;
	if (ioctl(fd, KVM_GET_SUPPORTED_CPUID, &cpuid) < 0)
		rc = sp_error_set(err, -errno, "KVM_GET_SUPPORTED_CPUID: %s", strerror(errno));
	else
		have_cpuid = 1;
	close(fd);
	return rc;
}

int sp_vm_available(void)
{
	int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);

	if (fd < 0)
		return -errno;
	close(fd);
	return 0;
}

static int kerr(struct sp_error *err, const char *what)
{
	int e = errno ? errno : EIO;
	return sp_error_set(err, -e, "%s: %s", what, strerror(e));
}

int sp_vm_create(struct sp_vm *vm, void *ram, uint64_t ram_bytes,
		 struct sp_error *err)
{
	struct kvm_userspace_memory_region slot;
	int sz;

	memset(vm, 0, sizeof(*vm));
	vm->kvm_fd = vm->vm_fd = vm->vcpu_fd = -1;
	vm->ram = ram;
	vm->ram_bytes = ram_bytes;
	vm->kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (vm->kvm_fd < 0) {
		int e = errno;
		return sp_error_set(err, -e, "open /dev/kvm: %s", strerror(e));
	}
	vm->vm_fd = ioctl(vm->kvm_fd, KVM_CREATE_VM, 0);
	if (vm->vm_fd < 0)
		goto fail_create;
	slot = (struct kvm_userspace_memory_region){
		.slot = 0,
		.guest_phys_addr = 0,
		.memory_size = ram_bytes,
		.userspace_addr = (uint64_t)(uintptr_t)ram,
	};
	if (ioctl(vm->vm_fd, KVM_SET_USER_MEMORY_REGION, &slot) < 0) {
		kerr(err, "KVM_SET_USER_MEMORY_REGION");
		goto fail;
	}
	vm->vcpu_fd = ioctl(vm->vm_fd, KVM_CREATE_VCPU, 0);
	if (vm->vcpu_fd < 0) {
		kerr(err, "KVM_CREATE_VCPU");
		goto fail;
	}
	sz = ioctl(vm->kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (sz <= 0) {
		kerr(err, "KVM_GET_VCPU_MMAP_SIZE");
		goto fail;
	}
	vm->run_bytes = (size_t)sz;
	vm->run = mmap(NULL, vm->run_bytes, PROT_READ | PROT_WRITE, MAP_SHARED,
		       vm->vcpu_fd, 0);
	if (vm->run == MAP_FAILED) {
		vm->run = NULL;
		kerr(err, "mmap kvm_run");
		goto fail;
	}
	if (!have_cpuid) {
		cpuid.head.nent = 256;
		if (ioctl(vm->kvm_fd, KVM_GET_SUPPORTED_CPUID, &cpuid) < 0) {
			kerr(err, "KVM_GET_SUPPORTED_CPUID");
			goto fail;
		}
		have_cpuid = 1;
	}
	if (ioctl(vm->vcpu_fd, KVM_SET_CPUID2, &cpuid) < 0) {
		kerr(err, "KVM_SET_CPUID2");
		goto fail;
	}
	return 0;
fail_create:
	kerr(err, "KVM_CREATE_VM");
fail:
	{
		int rc = err && err->code ? err->code : -EIO;
		sp_vm_destroy(vm);
		return rc;
	}
}

void sp_vm_destroy(struct sp_vm *vm)
{
	if (vm->run)
		munmap(vm->run, vm->run_bytes);
	if (vm->vcpu_fd >= 0)
		close(vm->vcpu_fd);
	if (vm->vm_fd >= 0)
		close(vm->vm_fd);
	if (vm->kvm_fd >= 0)
		close(vm->kvm_fd);
	vm->run = NULL;
	vm->vcpu_fd = vm->vm_fd = vm->kvm_fd = -1;
}

int sp_vm_boot_probe(struct sp_vm *vm, struct sp_error *err)
{
	size_t img = (size_t)(sp_probe_image_end - sp_probe_image);
	uint64_t npd = (vm->ram_bytes + (1ull << 30) - 1) >> 30;
	uint64_t *pml4, *pdpt;
	struct kvm_sregs s;
	struct kvm_regs r;
	/* present, writable, user; accessed and dirty preset (kvm-facts E2:
	 * a clear D bit makes shadow paging build a second shadow page) */
	const uint64_t tbl = 0x7 | 0x20, big = 0x87 | 0x60;

	if (img > SP_PROBE_CODE_MAX)
		return sp_error_set(err, -E2BIG, "probe image is %zu bytes, max %llu",
				    img, (unsigned long long)SP_PROBE_CODE_MAX);
	if (vm->ram_bytes < SP_PROBE_MIN_RAM || vm->ram_bytes > SP_PROBE_MAX_RAM ||
	    vm->ram_bytes % (2ull << 20))
		return sp_error_set(err, -EINVAL,
				    "guest RAM must be a multiple of 2 MiB between 4 MiB and %llu GiB",
				    (unsigned long long)(SP_PROBE_MAX_RAM >> 30));
	memcpy(vm->ram + SP_PROBE_CODE_GPA, sp_probe_image, img);
	pml4 = (uint64_t *)(vm->ram + SP_PROBE_PT_GPA);
	pdpt = pml4 + 512;
	memset(pml4, 0, 2 * SP_PROBE_PAGE);
	pml4[0] = (SP_PROBE_PT_GPA + SP_PROBE_PAGE) | tbl;
	for (uint64_t i = 0; i < npd; i++) {
		uint64_t pd_gpa = SP_PROBE_PT_GPA + (2 + i) * SP_PROBE_PAGE;
		uint64_t *pd = (uint64_t *)(vm->ram + pd_gpa);
		pdpt[i] = pd_gpa | tbl;
		for (uint64_t j = 0; j < 512; j++) {
			uint64_t gpa = (i << 30) | (j << 21);
			pd[j] = gpa < vm->ram_bytes ? gpa | big : 0;
		}
	}

	if (ioctl(vm->vcpu_fd, KVM_GET_SREGS, &s) < 0)
		return kerr(err, "KVM_GET_SREGS");
	s.cs = (struct kvm_segment){ .base = 0, .limit = 0xffffffff, .selector = 0x33,
				     .type = 11, .present = 1, .dpl = 3, .s = 1,
				     .l = 1, .g = 1 };
	s.ds = (struct kvm_segment){ .base = 0, .limit = 0xffffffff, .selector = 0x2b,
				     .type = 3, .present = 1, .dpl = 3, .db = 1,
				     .s = 1, .g = 1 };
	s.es = s.fs = s.gs = s.ss = s.ds;
	s.cr3 = SP_PROBE_PT_GPA;
	s.cr4 = 0x20;          /* PAE */
	s.cr0 = 0x80050033;    /* PG WP NE ET MP PE */
	s.efer = 0x500;        /* LME LMA */
	if (ioctl(vm->vcpu_fd, KVM_SET_SREGS, &s) < 0)
		return kerr(err, "KVM_SET_SREGS");
	memset(&r, 0, sizeof(r));
	r.rip = SP_PROBE_CODE_GPA;
	r.rsp = SP_PROBE_STACK_TOP;
	r.rflags = 0x3202;     /* IF, IOPL=3: `out` is legal at CPL3 on any KVM */
	if (ioctl(vm->vcpu_fd, KVM_SET_REGS, &r) < 0)
		return kerr(err, "KVM_SET_REGS");
	return 0;
}

int sp_vm_save_vcpu(struct sp_vm *vm, struct sp_vcpu_x86 *st, struct sp_error *err)
{
	/* Complete the pending `out` so RIP points past it (KVM API: state is
	 * consistent only after re-entering KVM_RUN). */
	vm->run->immediate_exit = 1;
	if (ioctl(vm->vcpu_fd, KVM_RUN, 0) == 0 || errno != EINTR) {
		vm->run->immediate_exit = 0;
		return sp_error_set(err, -EIO, "KVM_RUN with immediate_exit did not return EINTR");
	}
	vm->run->immediate_exit = 0;
	memset(st, 0, sizeof(*st));
	st->version = SP_VCPU_X86_VERSION;
	st->bytes = sizeof(*st);
	if (ioctl(vm->vcpu_fd, KVM_GET_REGS, &st->regs) < 0)
		return kerr(err, "KVM_GET_REGS");
	if (ioctl(vm->vcpu_fd, KVM_GET_SREGS, &st->sregs) < 0)
		return kerr(err, "KVM_GET_SREGS");
	return 0;
}

int sp_vm_load_vcpu(struct sp_vm *vm, const struct sp_vcpu_x86 *st,
		    struct sp_error *err)
{
	if (st->version != SP_VCPU_X86_VERSION || st->bytes != sizeof(*st))
		return sp_error_set(err, -EBADMSG,
				    "vCPU state version %u / %u bytes, expected %u / %zu",
				    st->version, st->bytes, SP_VCPU_X86_VERSION, sizeof(*st));
	if (ioctl(vm->vcpu_fd, KVM_SET_SREGS, &st->sregs) < 0)
		return kerr(err, "KVM_SET_SREGS");
	if (ioctl(vm->vcpu_fd, KVM_SET_REGS, &st->regs) < 0)
		return kerr(err, "KVM_SET_REGS");
	return 0;
}

static const char *exit_name(uint32_t r)
{
	switch (r) {
	case KVM_EXIT_IO: return "io";
	case KVM_EXIT_HLT: return "hlt";
	case KVM_EXIT_MMIO: return "mmio";
	case KVM_EXIT_SHUTDOWN: return "shutdown (triple fault)";
	case KVM_EXIT_FAIL_ENTRY: return "fail_entry";
	case KVM_EXIT_INTERNAL_ERROR: return "internal_error";
	default: return "other";
	}
}

int sp_vm_run_to_event(struct sp_vm *vm, uint32_t *event, struct sp_error *err)
{
	for (;;) {
		struct kvm_run *run = vm->run;

		if (ioctl(vm->vcpu_fd, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return kerr(err, "KVM_RUN");
		}
		if (run->exit_reason == KVM_EXIT_IO && run->io.port == SP_PROBE_PORT &&
		    run->io.direction == KVM_EXIT_IO_OUT && run->io.size == 4) {
			memcpy(event, (uint8_t *)run + run->io.data_offset, 4);
			return 0;
		}
		if (run->exit_reason == KVM_EXIT_INTR)
			continue;
		{
			struct kvm_regs r;
			unsigned long long rip = 0;
			if (ioctl(vm->vcpu_fd, KVM_GET_REGS, &r) == 0)
				rip = r.rip;
			return sp_error_set(err, -EIO,
					    "guest stopped unexpectedly: exit %u (%s) at rip 0x%llx",
					    run->exit_reason, exit_name(run->exit_reason), rip);
		}
	}
}
