/* SPDX-License-Identifier: MIT */
/*
 * A minimal KVM virtual machine for probe guests: one vCPU in 64-bit mode at
 * CPL3 with the guest's own page tables (see DESIGN.md: on the PVM backend
 * only CPL3 code runs natively; the same setup runs on VMX/SVM KVM), and
 * one memory slot at GPA 0 that is the whole guest RAM. The caller owns the
 * RAM mapping, so it can come from anywhere: anonymous memory, a
 * MAP_PRIVATE template, a huge-page tmpfs file.
 */
#ifndef SAMEPAGE_VMM_VM_H
#define SAMEPAGE_VMM_VM_H

#include <stddef.h>
#include <stdint.h>
#include <linux/kvm.h>

#include "samepage/error.h"

struct sp_vm {
	int kvm_fd;
	int vm_fd;
	int vcpu_fd;
	struct kvm_run *run;
	size_t run_bytes;
	uint8_t *ram;           /* caller's mapping of guest RAM at GPA 0 */
	uint64_t ram_bytes;
};

/* Saved vCPU state: what a checkpoint's vCPU section holds (arch x86-64). */
#define SP_VCPU_X86_VERSION 1
struct sp_vcpu_x86 {
	uint32_t version;
	uint32_t bytes;         /* sizeof(struct sp_vcpu_x86) */
	struct kvm_regs regs;
	struct kvm_sregs sregs;
};

/* 0 if /dev/kvm can be opened, else -errno (e.g. -ENOENT, -EACCES). */
int sp_vm_available(void);

/* Read what KVM supports (CPUID) once, so that processes forked afterwards
 * restore without asking again. Optional. */
int sp_vm_prepare(struct sp_error *err);

/* Create the VM, its RAM slot and its vCPU (CPUID set, registers not). */
int sp_vm_create(struct sp_vm *vm, void *ram, uint64_t ram_bytes,
		 struct sp_error *err);
void sp_vm_destroy(struct sp_vm *vm);

/* First boot of the probe: copy the probe image and build identity page
 * tables into RAM, and point the vCPU at the probe's entry at CPL3. */
int sp_vm_boot_probe(struct sp_vm *vm, struct sp_error *err);

/* Save / load the vCPU state. sp_vm_save_vcpu first completes any pending
 * port I/O (KVM_RUN with immediate_exit) so the state is consistent. */
int sp_vm_save_vcpu(struct sp_vm *vm, struct sp_vcpu_x86 *st, struct sp_error *err);
int sp_vm_load_vcpu(struct sp_vm *vm, const struct sp_vcpu_x86 *st,
		    struct sp_error *err);

/* Run until the guest exits with `out` on the probe port. Returns 0 and
 * the event (eax) in *event; any other exit is an error naming it. */
int sp_vm_run_to_event(struct sp_vm *vm, uint32_t *event, struct sp_error *err);

#endif
