/* SPDX-License-Identifier: MIT */
/* The probe guest's flat image, embedded into the VMM. */
	.section .rodata
	.balign 4096
	.globl sp_probe_image, sp_probe_image_end
sp_probe_image:
	.incbin PROBE_BIN
sp_probe_image_end:
	.section .note.GNU-stack,"",@progbits
