/*
 * Test shim (LD_PRELOAD into dmcached): every 5th pread/pwrite of a file under the cache's
 * objects/ or tmp/ moves at most half the bytes asked (at least one), as a kernel may
 * (docs/reliability.md D4, short reads and writes). Other files, SQLite's included, are left
 * alone. The number of shortened calls is written to $DMC_SHORT_IO_COUNT as it grows.
 * Built by tests/integration/test_faults_read.py; not part of the daemon.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

static atomic_ulong calls, shortened;

static int is_cache_file(int fd)
{
	char link[64], path[4096];
	ssize_t n;

	snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
	n = readlink(link, path, sizeof(path) - 1);
	if (n <= 0)
		return 0;
	path[n] = '\0';
	return strstr(path, "/cache/objects/") || strstr(path, "/cache/tmp/");
}

static size_t cut(int fd, size_t count)
{
	const char *out;
	unsigned long k;

	if (count < 2 || !is_cache_file(fd) || atomic_fetch_add(&calls, 1) % 5 != 4)
		return count;
	k = atomic_fetch_add(&shortened, 1) + 1;
	out = getenv("DMC_SHORT_IO_COUNT");
	if (out && (k & (k - 1)) == 0) { /* 1, 2, 4, 8, ...: cheap enough */
		int f = open(out, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
		if (f >= 0) {
			char b[32];
			int m = snprintf(b, sizeof(b), "%lu\n", k);
			if (write(f, b, (size_t)m) < 0) {
			}
			close(f);
		}
	}
	return count / 2;
}

ssize_t pread64(int fd, void *buf, size_t count, off_t off)
{
	static ssize_t (*real)(int, void *, size_t, off_t);
	if (!real)
		real = (ssize_t (*)(int, void *, size_t, off_t))dlsym(RTLD_NEXT, "pread64");
	return real(fd, buf, cut(fd, count), off);
}

ssize_t pread(int fd, void *buf, size_t count, off_t off)
{
	return pread64(fd, buf, count, off);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t off)
{
	static ssize_t (*real)(int, const void *, size_t, off_t);
	if (!real)
		real = (ssize_t (*)(int, const void *, size_t, off_t))dlsym(RTLD_NEXT, "pwrite64");
	return real(fd, buf, cut(fd, count), off);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t off)
{
	return pwrite64(fd, buf, count, off);
}
