/* SPDX-License-Identifier: MIT */
/*
 * `samepage fanout`: restore N clones from one checkpoint in a mode (copy,
 * cow, cow-huge), run a workload in each, and print the density table:
 * what N clones cost the host against what N private copies would.
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tools/cmd.h"
#include "vmm/clones.h"
#include "vmm/owner.h"
#include "vmm/probe.h"

#define MiB (1024.0 * 1024.0)

static void usage(FILE *f)
{
	fprintf(f,
		"usage: samepage fanout --ckpt FILE --clones N [--mode MODE] [--workload W]\n"
		"                       [--json] [--hold] [--verify] [--concurrency K]\n"
		"                       [--jobs J] [--settle-ms MS] [--quiet]\n"
		"\n"
		"Restore N clones of the checkpoint, each a VM in a process of its own, run\n"
		"workload W in every guest (the host checks each result against a model),\n"
		"let them settle, and print the density table: naive cost (N x guest RAM),\n"
		"the host-wide increase measured in the run's own memory cgroup (template\n"
		"counted once, private pages, page tables, KVM page tables, kernel\n"
		"allocations), per-VM overhead and ratio, cross-checked with PSS.\n"
		"\n"
		"  -c, --ckpt FILE       checkpoint (from 'samepage snapshot')\n"
		"  -n, --clones N        number of clones, 1..100000\n"
		"  -m, --mode MODE       copy (read() into private memory: the baseline),\n"
		"                        cow (MAP_PRIVATE of a sealed template; default),\n"
		"                        cow-huge (the same on a huge-page tmpfs)\n"
		"  -w, --workload W      none, read (default), write:P%%, same:P%%,\n"
		"                        scatter:P%%, zero:P%%, revert:P%%\n"
		"  -k, --concurrency K   restores in flight at once (default 1)\n"
		"  -j, --jobs J          workloads in flight at once (default 4)\n"
		"      --settle-ms MS    wait before measuring (default 500)\n"
		"      --verify          then have every guest check all its pages against\n"
		"                        its own model (isolation); fail if any differ\n"
		"      --json            print the result as one JSON object\n"
		"      --hold            after measuring, print one JSON line with \"ready\": true\n"
		"                        and each clone's pid and guest RAM address, keep the\n"
		"                        clones alive until SIGINT or SIGTERM, then tear down\n"
		"                        (the table then goes to stderr)\n"
		"      --merge           run the merge engine (a KSM equivalent) over the clones\n"
		"                        once their workloads are done; the table then shows\n"
		"                        merged pages, saving and time to converge\n"
		"      --domains K       merge domains, assigned round-robin: frames are shared\n"
		"                        only within a domain (default 1)\n"
		"      --merge-knob merge.NAME=VALUE\n"
		"                        set an engine knob before it starts (docs/knobs.md)\n"
		"      --ctl-socket PATH the merge owner's control socket for 'samepage ctl'\n"
		"                        (default " SP_CTL_SOCKET_DEFAULT ")\n"
		"      --ksm             clones mark their guest RAM MADV_MERGEABLE, so Linux\n"
		"                        KSM may merge it (the merge benchmark's baseline)\n"
		"  -q, --quiet           no progress lines on stderr\n"
		"  -h, --help            this text\n"
		"\n"
		"Exit status: 0 ok, 64 usage, 65 bad checkpoint, 69 no KVM, 70 a guest\n"
		"reported wrong memory contents, 71 other failure.\n");
}

static void on_signal(int sig)
{
	(void)sig;
	sp_fanout_interrupted = 1;
}

static void print_table(FILE *o, const struct sp_fanout *f)
{
	const struct sp_density *d = &f->density;
	char wl[32];

	if (f->o.kind == SP_WL_NONE || f->o.kind == SP_WL_READ)
		snprintf(wl, sizeof(wl), "%s", sp_probe_kind_name(f->o.kind));
	else
		snprintf(wl, sizeof(wl), "%s:%g%%", sp_probe_kind_name(f->o.kind), f->o.bp / 100.0);
	fprintf(o, "fan-out: %u clones of %s, mode %s, workload %s\n\n", d->clones,
		f->o.ckpt_path, sp_fanout_mode_name(f->o.mode), wl);
	fprintf(o, "%6s | %9s | %11s | %11s | %10s | %9s | %7s\n", "N", "guest", "naive",
		"increase", "template", "per-VM", "ratio");
	fprintf(o, "%6u | %5.0f MiB | %7.0f MiB | %7.1f MiB | %6.1f MiB | %5.2f MiB | %7.1f\n\n",
		d->clones, d->guest_bytes / MiB, d->naive_bytes / MiB, d->increase_bytes / MiB,
		d->template_bytes / MiB, d->per_vm_bytes / MiB, d->ratio);
	fprintf(o, "per-VM breakdown: private anon %.2f MiB, page tables %.2f MiB, "
		   "KVM page tables %.2f MiB, other kernel %.2f MiB\n",
		d->private_anon_bytes / d->clones / MiB, d->pagetables_bytes / d->clones / MiB,
		d->kvm_pagetables_bytes / d->clones / MiB, d->other_kernel_bytes / d->clones / MiB);
	fprintf(o, "cross-check: sum of clone PSS %.1f MiB (user memory only)\n",
		d->pss_sum_bytes / MiB);
	if (!f->acct)
		fprintf(o, "warning: no memory cgroup (%s): increase is not measured\n", f->acct_note);
	fprintf(o, "restore latency (restore call to the guest's first exit, concurrency %u): "
		   "p50 %.2f ms, p99 %.2f ms, max %.2f ms\n",
		f->o.concurrency, f->restore_p50_ms, f->restore_p99_ms, f->restore_max_ms);
	fprintf(o, "template build %.2f s; workloads %.2f s wall\n", f->setup_s, f->workload_wall_s);
	if (f->o.merge) {
		const int64_t *m = f->merge_stat;
		fprintf(o, "merge (%u domain%s): %lld pages merged onto %lld shared targets (%lld back to the template, "
			   "%lld onto the zero page), %lld unique; saving %.1f MiB\n",
			f->o.domains ? f->o.domains : 1, f->o.domains > 1 ? "s" : "",
			(long long)(m[0] + m[1]), (long long)m[3], (long long)m[2], (long long)m[1],
			(long long)m[4], (double)(m[0] + m[1]) * 4096 / MiB);
		fprintf(o, "merge: converged in %.2f s (95%% of the saving in %.2f s); CPU %.2f s in the "
			   "engine, %.2f s in the clones applying merges\n",
			f->merge_converge_s, f->merge_t95_s, f->merge_owner_cpu_s, f->merge_clones_cpu_s);
	}
}

static void print_json(FILE *o, const struct sp_fanout *f, int verified, uint32_t bad)
{
	const struct sp_density *d = &f->density;
	const struct sp_mem_sample *b = &f->s_base, *e = &f->s_end;

	fprintf(o, "{\"ckpt\":\"%s\",\"mode\":\"%s\",\"workload\":\"%s\",\"workload_pct\":%g,"
		   "\"clones\":%u,\"guest_bytes\":%llu,\"naive_bytes\":%.0f,\"increase_bytes\":%.0f,"
		   "\"template_bytes\":%.0f,\"per_vm_bytes\":%.0f,\"ratio\":%.3f,"
		   "\"breakdown\":{\"private_anon_bytes\":%.0f,\"pagetables_bytes\":%.0f,"
		   "\"kvm_pagetables_bytes\":%.0f,\"other_kernel_bytes\":%.0f},"
		   "\"pss_sum_bytes\":%.0f,\"accounting\":\"%s\","
		   "\"cgroup_delta\":{\"usage_bytes\":%lld,\"kmem_bytes\":%lld,\"anon_bytes\":%lld,"
		   "\"cache_bytes\":%lld,\"shmem_bytes\":%lld},"
		   "\"restore_ms\":{\"concurrency\":%u,\"p50\":%.3f,\"p99\":%.3f,\"max\":%.3f},"
		   "\"template_build_s\":%.3f,\"workload_wall_s\":%.3f",
		f->o.ckpt_path, sp_fanout_mode_name(f->o.mode), sp_probe_kind_name(f->o.kind),
		f->o.bp / 100.0, d->clones, (unsigned long long)d->guest_bytes, d->naive_bytes,
		d->increase_bytes, d->template_bytes, d->per_vm_bytes, d->ratio,
		d->private_anon_bytes, d->pagetables_bytes, d->kvm_pagetables_bytes,
		d->other_kernel_bytes, d->pss_sum_bytes, f->acct ? "memcg" : "none",
		(long long)(e->usage_bytes - b->usage_bytes), (long long)(e->kmem_bytes - b->kmem_bytes),
		(long long)(e->anon_bytes - b->anon_bytes), (long long)(e->cache_bytes - b->cache_bytes),
		(long long)(e->shmem_bytes - b->shmem_bytes), f->o.concurrency, f->restore_p50_ms,
		f->restore_p99_ms, f->restore_max_ms, f->setup_s, f->workload_wall_s);
	if (verified)
		fprintf(o, ",\"verified\":true,\"bad_clones\":%u", bad);
	if (f->o.merge) {
		const int64_t *m = f->merge_stat;
		fprintf(o, ",\"merge\":{\"domains\":%u,\"pages_sharing\":%lld,\"zero_pages\":%lld,"
			   "\"pages_template\":%lld,\"pages_shared\":%lld,\"pages_unshared\":%lld,"
			   "\"full_scans\":%lld,\"saving_bytes\":%lld,\"converge_s\":%.4f,\"t95_s\":%.4f,"
			   "\"engine_cpu_s\":%.3f,\"clones_cpu_s\":%.3f}",
			f->o.domains ? f->o.domains : 1, (long long)m[0], (long long)m[1], (long long)m[2],
			(long long)m[3], (long long)m[4], (long long)m[5], (long long)(m[0] + m[1]) * 4096,
			f->merge_converge_s, f->merge_t95_s, f->merge_owner_cpu_s, f->merge_clones_cpu_s);
	}
	fprintf(o, "}\n");
}

static void print_ready(FILE *o, const struct sp_fanout *f)
{
	fprintf(o, "{\"ready\":true,\"mode\":\"%s\",\"ram_bytes\":%llu,\"cgroup\":\"%s\",",
		sp_fanout_mode_name(f->o.mode), (unsigned long long)f->tmpl.mem_bytes,
		f->acct ? sp_acct_path(f->acct) : "");
	if (f->o.merge)
		fprintf(o, "\"owner_pid\":%d,\"ctl_socket\":\"%s\",", (int)f->owner_pid,
			f->o.ctl_path ? f->o.ctl_path : SP_CTL_SOCKET_DEFAULT);
	fprintf(o, "\"clones\":[");
	for (uint32_t i = 0; i < f->nclones; i++)
		fprintf(o, "%s{\"index\":%u,\"pid\":%d,\"ram_addr\":%llu,\"ram_bytes\":%llu}",
			i ? "," : "", i, (int)f->clone[i].pid,
			(unsigned long long)f->clone[i].ram_addr,
			(unsigned long long)f->tmpl.mem_bytes);
	fprintf(o, "]}\n");
	fflush(o);
}

int cmd_fanout(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "ckpt", required_argument, NULL, 'c' },
		{ "clones", required_argument, NULL, 'n' },
		{ "mode", required_argument, NULL, 'm' },
		{ "workload", required_argument, NULL, 'w' },
		{ "concurrency", required_argument, NULL, 'k' },
		{ "jobs", required_argument, NULL, 'j' },
		{ "settle-ms", required_argument, NULL, 'S' },
		{ "verify", no_argument, NULL, 'V' },
		{ "json", no_argument, NULL, 'J' },
		{ "hold", no_argument, NULL, 'H' },
		{ "quiet", no_argument, NULL, 'q' },
		{ "ksm", no_argument, NULL, 'K' },
		{ "merge", no_argument, NULL, 'M' },
		{ "domains", required_argument, NULL, 'D' },
		{ "merge-knob", required_argument, NULL, 'O' },
		{ "ctl-socket", required_argument, NULL, 'C' },
		{ "help", no_argument, NULL, 'h' },
		{ 0 },
	};
	struct sp_fanout_opts o = {
		.mode = SP_FANOUT_COW, .kind = SP_WL_READ, .concurrency = 1, .jobs = 4,
		.settle_ms = 500, .progress = 1,
	};
	struct sp_error err = { 0 };
	struct sp_fanout f;
	struct sigaction sa = { .sa_handler = on_signal };
	int json = 0, hold = 0, verify = 0, c, rc;
	unsigned long long v;
	uint32_t bad = 0;
	int have_n = 0;
	const char *knobs[16] = { 0 };
	size_t nknobs = 0;

	optind = 1;
	while ((c = getopt_long(argc, argv, "c:n:m:w:k:j:qh", opts, NULL)) != -1) {
		switch (c) {
		case 'c':
			o.ckpt_path = optarg;
			break;
		case 'n':
			if (tool_parse_u64(optarg, 1, 100000, &v)) {
				tool_err("--clones '%s': need an integer from 1 to 100000", optarg);
				return EX_USAGE;
			}
			o.clones = (uint32_t)v;
			have_n = 1;
			break;
		case 'm':
			if (sp_fanout_mode_parse(optarg, &o.mode)) {
				tool_err("--mode '%s': need copy, cow or cow-huge", optarg);
				return EX_USAGE;
			}
			break;
		case 'w':
			if (sp_probe_parse_workload(optarg, &o.kind, &o.bp, &err)) {
				tool_err("--workload: %s", err.msg);
				return EX_USAGE;
			}
			break;
		case 'k':
		case 'j':
			if (tool_parse_u64(optarg, 1, 10000, &v)) {
				tool_err("--%s '%s': need an integer from 1 to 10000",
					 c == 'k' ? "concurrency" : "jobs", optarg);
				return EX_USAGE;
			}
			*(c == 'k' ? &o.concurrency : &o.jobs) = (uint32_t)v;
			break;
		case 'S':
			if (tool_parse_u64(optarg, 0, 600000, &v)) {
				tool_err("--settle-ms '%s': need milliseconds from 0 to 600000", optarg);
				return EX_USAGE;
			}
			o.settle_ms = (uint32_t)v;
			break;
		case 'V':
			verify = 1;
			break;
		case 'J':
			json = 1;
			break;
		case 'H':
			hold = 1;
			break;
		case 'q':
			o.progress = 0;
			break;
		case 'K':
			o.ksm = 1;
			break;
		case 'M':
			o.merge = 1;
			break;
		case 'D':
			if (tool_parse_u64(optarg, 1, 100000, &v)) {
				tool_err("--domains '%s': need an integer from 1 to 100000", optarg);
				return EX_USAGE;
			}
			o.domains = (uint32_t)v;
			break;
		case 'O':
			if (nknobs == sizeof(knobs) / sizeof(knobs[0]) - 1 || !strchr(optarg, '=') ||
			    strncmp(optarg, "merge.", 6)) {
				tool_err("--merge-knob '%s': need merge.NAME=VALUE (at most 15)", optarg);
				return EX_USAGE;
			}
			knobs[nknobs++] = optarg;
			break;
		case 'C':
			o.ctl_path = optarg;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return EX_USAGE;
		}
	}
	if (optind != argc) {
		tool_err("fanout: unexpected argument '%s'", argv[optind]);
		return EX_USAGE;
	}
	o.knobs = knobs;
	if ((o.domains || nknobs || o.ctl_path) && !o.merge) {
		tool_err("fanout: --domains, --merge-knob and --ctl-socket need --merge");
		return EX_USAGE;
	}
	if (o.merge && o.ksm) {
		tool_err("fanout: --merge and --ksm are alternatives, not a pair");
		return EX_USAGE;
	}
	if (o.merge && o.mode == SP_FANOUT_COPY) {
		tool_err("fanout: --merge needs --mode cow or cow-huge (copy clones do not map the template)");
		return EX_USAGE;
	}
	if (!o.ckpt_path || !have_n) {
		tool_err("fanout: --ckpt FILE and --clones N are required (see --help)");
		return EX_USAGE;
	}
	if (access(o.ckpt_path, R_OK) != 0) {
		tool_err("%s: %s", o.ckpt_path, strerror(errno));
		return EX_NOINPUT;
	}
	rc = sp_vm_available();
	if (rc) {
		tool_err("cannot use /dev/kvm: %s", strerror(-rc));
		return EX_UNAVAILABLE;
	}
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	rc = sp_fanout_start(&f, &o, &err);
	if (rc) {
		tool_err("fanout: %s", err.msg[0] ? err.msg : sp_strerror(rc));
		return rc == -EBADMSG ? EX_DATAERR : rc == -EIO ? EX_SOFTWARE : EX_OSERR;
	}
	if (verify) {
		rc = sp_fanout_verify(&f, &bad, &err);
		if (rc) {
			tool_err("fanout: verify: %s", err.msg);
			sp_fanout_stop(&f);
			return EX_OSERR;
		}
	}
	if (json)
		print_json(hold ? stderr : stdout, &f, verify, bad);
	else
		print_table(hold ? stderr : stdout, &f);
	if (verify && bad) {
		tool_err("fanout: %u of %u clones found memory that is not their own", bad, o.clones);
		sp_fanout_stop(&f);
		return EX_SOFTWARE;
	}
	if (verify && !json)
		fprintf(hold ? stderr : stdout, "isolation: all %u clones read exactly their own model\n",
			o.clones);
	if (hold) {
		sigset_t block, old;

		sigemptyset(&block);
		sigaddset(&block, SIGINT);
		sigaddset(&block, SIGTERM);
		sigprocmask(SIG_BLOCK, &block, &old);
		print_ready(stdout, &f);
		while (!sp_fanout_interrupted)
			sigsuspend(&old);
		sigprocmask(SIG_SETMASK, &old, NULL);
	}
	sp_fanout_stop(&f);
	return 0;
}
