/* SPDX-License-Identifier: MIT */
/*
 * Templates and clone RAM mappings on Linux (see samepage/fanout.h).
 */
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include "samepage/fanout.h"

#define HUGE_BYTES (2ull << 20)
#define COPY_CHUNK (2ull << 20)

static const char *const mode_names[] = { "copy", "cow", "cow-huge" };

const char *sp_fanout_mode_name(enum sp_fanout_mode m)
{
	return (unsigned)m < 3 ? mode_names[m] : "?";
}

int sp_fanout_mode_parse(const char *s, enum sp_fanout_mode *m)
{
	for (unsigned i = 0; i < 3; i++)
		if (!strcmp(s, mode_names[i])) {
			*m = (enum sp_fanout_mode)i;
			return 0;
		}
	return -EINVAL;
}

static int is_zero(const uint8_t *p)
{
	static const uint8_t zero[SP_PAGE_SIZE];
	return memcmp(p, zero, SP_PAGE_SIZE) == 0;
}

/* Copy the checkpoint's memory into fd (at offset 0), checking every page
 * against the hash index; zero pages stay holes. */
static int fill_template(struct sp_template *t, int fd, struct sp_error *err)
{
	const uint64_t *hashes = sp_ckpt_hashes(t->ckpt);
	const struct sp_ckpt_info *in = sp_ckpt_info(t->ckpt);
	int src = sp_ckpt_fd(t->ckpt);
	uint8_t *buf = malloc(COPY_CHUNK);
	int rc = 0;

	if (!buf)
		return sp_error_set(err, -ENOMEM, "out of memory");
	for (uint64_t off = 0; off < t->mem_bytes && rc == 0; off += COPY_CHUNK) {
		uint64_t n = t->mem_bytes - off < COPY_CHUNK ? t->mem_bytes - off : COPY_CHUNK;
		ssize_t got = pread(src, buf, n, (off_t)(in->mem_offset + off));

		if (got != (ssize_t)n) {
			rc = sp_error_set(err, got < 0 ? -errno : -EBADMSG,
					  "reading checkpoint memory at %llu: %s",
					  (unsigned long long)off,
					  got < 0 ? strerror(errno) : "short read");
			break;
		}
		for (uint64_t p = 0; p < n; p += SP_PAGE_SIZE) {
			uint64_t page = (off + p) / SP_PAGE_SIZE;
			if (sp_page_hash(buf + p) != hashes[page]) {
				rc = sp_error_set(err, -EBADMSG,
						  "checkpoint page %llu does not match its hash",
						  (unsigned long long)page);
				break;
			}
			if (is_zero(buf + p))
				continue;
			/* write runs of non-zero pages at once */
			uint64_t q = p + SP_PAGE_SIZE;
			while (q < n && !is_zero(buf + q) &&
			       sp_page_hash(buf + q) == hashes[(off + q) / SP_PAGE_SIZE])
				q += SP_PAGE_SIZE;
			if (pwrite(fd, buf + p, q - p, (off_t)(off + p)) != (ssize_t)(q - p)) {
				rc = sp_error_set(err, -errno, "writing template: %s", strerror(errno));
				break;
			}
			p = q - SP_PAGE_SIZE;
		}
	}
	/* the checkpoint's own page cache is not part of the fan-out */
	posix_fadvise(src, (off_t)in->mem_offset, (off_t)t->mem_bytes, POSIX_FADV_DONTNEED);
	free(buf);
	return rc;
}

static int open_cow(struct sp_template *t, struct sp_error *err)
{
	int fd = memfd_create("samepage-template", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	int rc;

	if (fd < 0)
		return sp_error_set(err, -errno, "memfd_create: %s", strerror(errno));
	if (ftruncate(fd, (off_t)t->mem_bytes) < 0) {
		rc = sp_error_set(err, -errno, "ftruncate template: %s", strerror(errno));
		goto fail;
	}
	rc = fill_template(t, fd, err);
	if (rc)
		goto fail;
	if (fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0) {
		rc = sp_error_set(err, -errno, "sealing template: %s", strerror(errno));
		goto fail;
	}
	t->fd = fd;
	t->fd_offset = 0;
	return 0;
fail:
	close(fd);
	return rc;
}

static int open_huge(struct sp_template *t, struct sp_error *err)
{
	char opts[128], file[PATH_MAX + 16];
	uint64_t size = (t->mem_bytes + HUGE_BYTES - 1) / HUGE_BYTES * HUGE_BYTES;
	int fd, rc;

	/* A mount namespace of our own: the tmpfs is invisible to the rest of
	 * the host and vanishes with the run even if it is killed. */
	if (unshare(CLONE_NEWNS) < 0)
		return sp_error_set(err, -errno,
				    "cow-huge needs a private mount namespace (root): unshare: %s",
				    strerror(errno));
	t->ns_private = 1;
	if (mount("none", "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
		return sp_error_set(err, -errno, "making mounts private: %s", strerror(errno));
	snprintf(t->mnt, sizeof(t->mnt), "/tmp/samepage-huge-XXXXXX");
	if (!mkdtemp(t->mnt)) {
		rc = sp_error_set(err, -errno, "mkdtemp %s: %s", t->mnt, strerror(errno));
		t->mnt[0] = '\0';
		return rc;
	}
	snprintf(opts, sizeof(opts), "huge=always,size=%llu,mode=0700",
		 (unsigned long long)size);
	if (mount("samepage-huge", t->mnt, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, opts) < 0)
		return sp_error_set(err, -errno, "mount tmpfs (%s) on %s: %s", opts, t->mnt,
				    strerror(errno));
	t->mounted = 1;
	snprintf(file, sizeof(file), "%s/template", t->mnt);
	fd = open(file, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0400);
	if (fd < 0)
		return sp_error_set(err, -errno, "create %s: %s", file, strerror(errno));
	if (ftruncate(fd, (off_t)size) < 0) {
		rc = sp_error_set(err, -errno, "ftruncate template: %s", strerror(errno));
		close(fd);
		return rc;
	}
	rc = fill_template(t, fd, err);
	close(fd);
	if (rc)
		return rc;
	/* read-only from here on: nobody can change the template under the
	 * clones (MAP_PRIVATE needs only read access) */
	if (mount(NULL, t->mnt, NULL, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
		  NULL) < 0)
		return sp_error_set(err, -errno, "remount %s read-only: %s", t->mnt, strerror(errno));
	t->fd = open(file, O_RDONLY | O_CLOEXEC);
	if (t->fd < 0)
		return sp_error_set(err, -errno, "open %s: %s", file, strerror(errno));
	t->fd_offset = 0;
	/* Nothing needs the path any more: detach the mount and remove the
	 * mount point now, so that even a run killed with SIGKILL leaves
	 * nothing behind. The open fd keeps the (read-only) file alive. */
	umount2(t->mnt, MNT_DETACH);
	t->mounted = 0;
	rmdir(t->mnt);
	t->mnt[0] = '\0';
	return 0;
}

int sp_template_open(struct sp_template *t, const char *path,
		     enum sp_fanout_mode mode, struct sp_error *err)
{
	int rc;

	memset(t, 0, sizeof(*t));
	t->fd = -1;
	t->mode = mode;
	rc = sp_ckpt_open(path, &t->ckpt, err);
	if (rc)
		return rc;
	t->mem_bytes = sp_ckpt_info(t->ckpt)->mem_bytes;
	switch (mode) {
	case SP_FANOUT_COPY:
		t->fd = sp_ckpt_fd(t->ckpt);
		t->fd_offset = sp_ckpt_info(t->ckpt)->mem_offset;
		rc = sp_ckpt_verify(t->ckpt, NULL, err);
		break;
	case SP_FANOUT_COW:
		rc = open_cow(t, err);
		break;
	case SP_FANOUT_COW_HUGE:
		rc = open_huge(t, err);
		break;
	default:
		rc = sp_error_set(err, -EINVAL, "unknown fan-out mode %d", (int)mode);
	}
	if (rc)
		sp_template_close(t);
	return rc;
}

int sp_template_map(const struct sp_template *t, void **ram, struct sp_error *err)
{
	uint8_t *p;

	switch (t->mode) {
	case SP_FANOUT_COPY: {
		p = mmap(NULL, t->mem_bytes, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (p == MAP_FAILED)
			break;
		for (uint64_t off = 0; off < t->mem_bytes;) {
			ssize_t n = pread(t->fd, p + off, t->mem_bytes - off,
					  (off_t)(t->fd_offset + off));
			if (n <= 0) {
				int e = n < 0 ? errno : EIO;
				munmap(p, t->mem_bytes);
				return sp_error_set(err, -e, "reading checkpoint memory: %s",
						    strerror(e));
			}
			off += (uint64_t)n;
		}
		*ram = p;
		return 0;
	}
	case SP_FANOUT_COW:
		p = mmap(NULL, t->mem_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE,
			 t->fd, (off_t)t->fd_offset);
		if (p == MAP_FAILED)
			break;
		*ram = p;
		return 0;
	case SP_FANOUT_COW_HUGE: {
		/* reserve 2 MiB more, then place the file at an aligned address */
		uint64_t len = t->mem_bytes + HUGE_BYTES;
		uint8_t *r = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
				  -1, 0);
		uintptr_t a;

		if (r == MAP_FAILED)
			break;
		a = ((uintptr_t)r + HUGE_BYTES - 1) & ~(uintptr_t)(HUGE_BYTES - 1);
		p = mmap((void *)a, t->mem_bytes, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE, t->fd, (off_t)t->fd_offset);
		if (p == MAP_FAILED) {
			int e = errno;
			munmap(r, len);
			return sp_error_set(err, -e, "mmap huge template: %s", strerror(e));
		}
		if ((uint8_t *)a > r)
			munmap(r, (size_t)((uint8_t *)a - r));
		if ((uint8_t *)a + t->mem_bytes < r + len)
			munmap((uint8_t *)a + t->mem_bytes,
			       (size_t)(r + len - ((uint8_t *)a + t->mem_bytes)));
		*ram = p;
		return 0;
	}
	}
	return sp_error_set(err, -errno, "mmap guest RAM (%s): %s", sp_fanout_mode_name(t->mode),
			    strerror(errno));
}

void sp_template_unmap(const struct sp_template *t, void *ram)
{
	if (ram)
		munmap(ram, t->mem_bytes);
}

void sp_template_close(struct sp_template *t)
{
	if (t->fd >= 0 && t->mode != SP_FANOUT_COPY)
		close(t->fd);
	t->fd = -1;
	if (t->mounted) {
		if (umount2(t->mnt, 0) < 0)
			umount2(t->mnt, MNT_DETACH);
		t->mounted = 0;
	}
	if (t->mnt[0]) {
		rmdir(t->mnt);
		t->mnt[0] = '\0';
	}
	if (t->ckpt) {
		sp_ckpt_close(t->ckpt);
		t->ckpt = NULL;
	}
}
