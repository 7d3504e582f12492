/*
 * crashfs: an LD_PRELOAD shim that simulates a power cut for the files under one
 * directory (docs/reliability.md C3, after SQLite TH3's crash VFS). Tests only.
 *
 *   CRASHFS_ROOT=DIR   files whose path starts with DIR/ are tracked (required)
 *   CRASHFS_CUT=N      at the N-th tracked operation (1-based; 0 or unset: never) the
 *                      power is cut: see below, then the process kills itself (SIGKILL)
 *   CRASHFS_MODE=M     drop (every unsynced change lost) or tear (each unsynced write
 *                      kept, lost, or torn at 512-byte sectors, at random; each unsynced
 *                      name change kept or lost at random)
 *   CRASHFS_SEED=S     the random choices of tear
 *   CRASHFS_COUNT=FILE at exit (or at the cut), the number of tracked operations so far
 *                      is written there
 *
 * Tracked operations: write, pwrite, pwrite64, fsync, fdatasync, rename, renameat,
 * renameat2 on tracked files and directories, and the creation of a tracked file.
 *
 * What a cut models (the page cache lost; what reached the disk through fsync kept):
 *   - file data: every write since the file's last successful fsync/fdatasync is undone
 *     (its pre-image restored, newest first) and the file truncated to its size at that
 *     sync; in tear mode each write independently survives whole, is lost, or survives
 *     sector by sector (so later writes may survive where earlier ones did not:
 *     reordering);
 *   - names: a rename whose destination directory was not fsynced since is undone (as on
 *     ext4, where the rename is one journal transaction that fsync of the destination
 *     directory commits); a file created since its directory's last fsync is removed; in tear mode
 *     each at random.
 * What it does not model: unlink not made durable (the name would come back; for the
 * cache that means an evicted blob reappears, which reconciliation adopts), metadata
 * such as mtime, data written through mmap (the daemon maps no cache file: SQLite runs
 * with an exclusive lock, without -shm), torn writes inside a 512-byte sector, and file
 * systems that lose synced data. File data is tracked per inode; directories by inode.
 *
 * Threads: every tracked operation runs under one mutex (the shim serialises the cache's
 * I/O), so the cut sees a stable state and no thread writes after it.
 */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#define MAX_FDS 65536

struct undo {
	struct undo *prev; /* older */
	off_t off;
	size_t len;
	size_t old_len; /* bytes of pre-image that existed (the rest was beyond EOF) */
	unsigned char *old;
};

struct file {
	struct file *next;
	dev_t dev;
	ino_t ino;
	char *path;        /* current name */
	bool is_dir;
	bool has_sync;     /* synced_size is known */
	off_t synced_size; /* size at the last sync (or when first tracked) */
	struct undo *undo; /* newest first */
};

/* A name change not yet made durable by fsync of its directories. */
struct nameop {
	struct nameop *next;
	int kind;          /* 0 rename, 1 create */
	char *from, *to;   /* rename: from -> to; create: to */
	ino_t dir_to;
	dev_t dev;
};

static pthread_mutex_t mu = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;
static char *root;
static size_t root_len;
static long cut_at, ops;
static bool tear;
static uint64_t rng;
static const char *count_path;
static char *fd_path[MAX_FDS];
static struct file *files;
static struct nameop *nameops;

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off64_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_rename)(const char *, const char *);
static int (*real_renameat)(int, const char *, int, const char *);
static int (*real_renameat2)(int, const char *, int, const char *, unsigned);
static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);
static int (*real_openat64)(int, const char *, int, ...);
static int (*real_close)(int);

static uint64_t next_rand(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

__attribute__((constructor)) static void crashfs_init(void)
{
	const char *r = getenv("CRASHFS_ROOT"), *c = getenv("CRASHFS_CUT"),
		   *m = getenv("CRASHFS_MODE"), *s = getenv("CRASHFS_SEED");

	real_write = dlsym(RTLD_NEXT, "write");
	real_pwrite = dlsym(RTLD_NEXT, "pwrite");
	real_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
	real_fsync = dlsym(RTLD_NEXT, "fsync");
	real_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
	real_rename = dlsym(RTLD_NEXT, "rename");
	real_renameat = dlsym(RTLD_NEXT, "renameat");
	real_renameat2 = dlsym(RTLD_NEXT, "renameat2");
	real_open = dlsym(RTLD_NEXT, "open");
	real_open64 = dlsym(RTLD_NEXT, "open64");
	real_openat = dlsym(RTLD_NEXT, "openat");
	real_openat64 = dlsym(RTLD_NEXT, "openat64");
	real_close = dlsym(RTLD_NEXT, "close");
	if (r && *r) {
		char buf[PATH_MAX];
		root = strdup(realpath(r, buf) ? buf : r);
		root_len = root ? strlen(root) : 0;
	}
	cut_at = c ? atol(c) : 0;
	tear = m && strcmp(m, "tear") == 0;
	rng = (s ? strtoull(s, NULL, 10) : 1) * 0x9E3779B97F4A7C15ull + 1;
	count_path = getenv("CRASHFS_COUNT");
}

static void write_count(void)
{
	char buf[32];
	int fd, n;

	if (!count_path || ops == 0) /* forked workers touch no cache file */
		return;
	fd = real_open(count_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return;
	n = snprintf(buf, sizeof(buf), "%ld\n", ops);
	(void)!real_write(fd, buf, (size_t)n);
	real_close(fd);
}

__attribute__((destructor)) static void crashfs_fini(void)
{
	pthread_mutex_lock(&mu);
	write_count();
	pthread_mutex_unlock(&mu);
}

static bool under_root(const char *path)
{
	return root && path && strncmp(path, root, root_len) == 0 &&
	       (path[root_len] == '/' || path[root_len] == 0);
}

/* Absolute path of `name` relative to dirfd (AT_FDCWD or a directory fd); malloc'd. */
static char *abs_path(int dirfd, const char *name)
{
	char base[PATH_MAX], link[64], *out;
	ssize_t n;

	if (!name)
		return NULL;
	if (name[0] == '/')
		return strdup(name);
	if (dirfd == AT_FDCWD) {
		if (!getcwd(base, sizeof(base)))
			return NULL;
	} else {
		snprintf(link, sizeof(link), "/proc/self/fd/%d", dirfd);
		n = readlink(link, base, sizeof(base) - 1);
		if (n < 0)
			return NULL;
		base[n] = 0;
	}
	if (asprintf(&out, "%s/%s", base, name) < 0)
		return NULL;
	return out;
}

static struct file *file_of(int fd, bool create)
{
	struct stat st;
	struct file *f;

	if (fd < 0 || fd >= MAX_FDS || !fd_path[fd] || fstat(fd, &st) < 0)
		return NULL;
	for (f = files; f; f = f->next)
		if (f->dev == st.st_dev && f->ino == st.st_ino) {
			if (strcmp(f->path, fd_path[fd]) != 0) {
				free(f->path);
				f->path = strdup(fd_path[fd]);
			}
			return f;
		}
	if (!create)
		return NULL;
	f = calloc(1, sizeof(*f));
	if (!f)
		abort();
	f->dev = st.st_dev;
	f->ino = st.st_ino;
	f->path = strdup(fd_path[fd]);
	f->is_dir = S_ISDIR(st.st_mode);
	f->synced_size = st.st_size; /* what was there before we saw it: durable */
	f->has_sync = true;
	f->next = files;
	files = f;
	return f;
}

static void cut(void);

/* Counts a tracked operation; cuts the power when it is the chosen one. */
static void op(void)
{
	ops++;
	if (cut_at > 0 && ops == cut_at)
		cut();
}

static void record_write(int fd, size_t len, off_t off)
{
	struct file *f = file_of(fd, true);
	struct undo *u;
	ssize_t n;

	if (!f || len == 0)
		return;
	u = calloc(1, sizeof(*u));
	if (!u)
		abort();
	u->off = off;
	u->len = len;
	u->old = malloc(len);
	if (!u->old)
		abort();
	n = pread(fd, u->old, len, off);
	if (n < 0 && errno == EBADF) { /* opened write-only: read through another fd */
		char link[64];
		int rfd;
		snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
		rfd = real_open(link, O_RDONLY | O_CLOEXEC);
		if (rfd >= 0) {
			n = pread(rfd, u->old, len, off);
			real_close(rfd);
		}
	}
	u->old_len = n > 0 ? (size_t)n : 0;
	u->prev = f->undo;
	f->undo = u;
}

static void free_undo(struct file *f)
{
	while (f->undo) {
		struct undo *u = f->undo;
		f->undo = u->prev;
		free(u->old);
		free(u);
	}
}

static void synced(int fd)
{
	struct file *f = file_of(fd, true);
	struct stat st;

	if (!f)
		return;
	free_undo(f);
	if (fstat(fd, &st) == 0)
		f->synced_size = st.st_size;
	if (f->is_dir) {
		/* names in this directory are durable now */
		for (struct nameop **p = &nameops; *p;) {
			struct nameop *o = *p;
			if (o->dev == f->dev && o->dir_to == f->ino)
				o->dir_to = 0;
			if (o->dir_to == 0) {
				*p = o->next;
				free(o->from);
				free(o->to);
				free(o);
			} else {
				p = &o->next;
			}
		}
	}
}

static ino_t dir_ino(const char *path, dev_t *dev)
{
	char *d = strdup(path), *slash;
	struct stat st;
	ino_t ino = 0;

	if (!d)
		abort();
	slash = strrchr(d, '/');
	if (slash)
		*slash = 0;
	if (stat(slash && *d ? d : "/", &st) == 0) {
		ino = st.st_ino;
		*dev = st.st_dev;
	}
	free(d);
	return ino;
}

static void record_name(int kind, const char *from, const char *to)
{
	struct nameop *o = calloc(1, sizeof(*o));

	if (!o)
		abort();
	o->kind = kind;
	o->from = from ? strdup(from) : NULL;
	o->to = strdup(to);
	o->dir_to = dir_ino(to, &o->dev);
	o->next = nameops;
	nameops = o;
}

static void restore(const char *path, struct file *f)
{
	int fd = real_open(path, O_WRONLY | O_CLOEXEC);

	if (fd < 0)
		return;
	for (struct undo *u = f->undo; u; u = u->prev) {
		unsigned sectors = (unsigned)((u->len + 511) / 512);
		int choice = tear ? (int)(next_rand() % 3) : 0; /* 0 lost, 1 kept, 2 torn */
		if (choice == 1)
			continue;
		for (unsigned s = 0; s < sectors; s++) {
			size_t a = (size_t)s * 512, b = a + 512 < u->len ? a + 512 : u->len;
			if (choice == 2 && next_rand() % 2)
				continue; /* this sector reached the disk */
			if (a < u->old_len)
				(void)!real_pwrite(fd, u->old + a,
						   (b < u->old_len ? b : u->old_len) - a,
						   u->off + (off_t)a);
		}
	}
	if (f->has_sync && !tear)
		(void)!ftruncate(fd, f->synced_size);
	else if (f->has_sync) {
		struct stat st;
		/* a torn file keeps at most what its surviving writes reach */
		if (fstat(fd, &st) == 0 && st.st_size > f->synced_size && next_rand() % 2)
			(void)!ftruncate(fd, f->synced_size);
	}
	real_close(fd);
}

static void cut(void)
{
	/* data first, under the names the files have now, then the names */
	for (struct file *f = files; f; f = f->next)
		if (!f->is_dir && f->undo)
			restore(f->path, f);
	for (struct nameop *o = nameops; o; o = o->next) {
		if (tear && next_rand() % 2)
			continue;
		if (o->kind == 0)
			(void)real_rename(o->to, o->from);
		else
			(void)unlink(o->to);
	}
	write_count();
	kill(getpid(), SIGKILL);
	for (;;)
		pause();
}

static bool tracked_fd(int fd)
{
	return fd >= 0 && fd < MAX_FDS && fd_path[fd];
}

static void track_open(int fd, int dirfd, const char *name, int flags, bool existed)
{
	char *p;

	if (fd < 0 || fd >= MAX_FDS || !root)
		return;
	p = abs_path(dirfd, name);
	if (!p)
		return;
	if (!under_root(p)) {
		free(p);
		return;
	}
	pthread_mutex_lock(&mu);
	free(fd_path[fd]);
	fd_path[fd] = p;
	if ((flags & O_CREAT) && !existed) {
		struct file *f;
		op();
		f = file_of(fd, true);
		if (f) {
			f->synced_size = 0; /* a new file: nothing of it is durable */
			f->has_sync = true;
		}
		record_name(1, NULL, p);
	} else {
		(void)file_of(fd, true);
	}
	pthread_mutex_unlock(&mu);
}

static bool exists_at(int dirfd, const char *name)
{
	struct stat st;
	return fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0;
}

#define OPEN_MODE(flags, mode)                                                                   \
	do {                                                                                     \
		if ((flags) & (O_CREAT | __O_TMPFILE)) {                                       \
			va_list ap;                                                              \
			va_start(ap, flags);                                                     \
			mode = (mode_t)va_arg(ap, int);                                          \
			va_end(ap);                                                              \
		}                                                                                \
	} while (0)

int open(const char *path, int flags, ...)
{
	mode_t mode = 0;
	bool existed;
	int fd;

	OPEN_MODE(flags, mode);
	existed = (flags & O_CREAT) ? exists_at(AT_FDCWD, path) : true;
	fd = real_open(path, flags, mode);
	track_open(fd, AT_FDCWD, path, flags, existed);
	return fd;
}

int open64(const char *path, int flags, ...)
{
	mode_t mode = 0;
	bool existed;
	int fd;

	OPEN_MODE(flags, mode);
	existed = (flags & O_CREAT) ? exists_at(AT_FDCWD, path) : true;
	fd = real_open64(path, flags, mode);
	track_open(fd, AT_FDCWD, path, flags, existed);
	return fd;
}

int openat(int dirfd, const char *path, int flags, ...)
{
	mode_t mode = 0;
	bool existed;
	int fd;

	OPEN_MODE(flags, mode);
	existed = (flags & O_CREAT) ? exists_at(dirfd, path) : true;
	fd = real_openat(dirfd, path, flags, mode);
	track_open(fd, dirfd, path, flags, existed);
	return fd;
}

int openat64(int dirfd, const char *path, int flags, ...)
{
	mode_t mode = 0;
	bool existed;
	int fd;

	OPEN_MODE(flags, mode);
	existed = (flags & O_CREAT) ? exists_at(dirfd, path) : true;
	fd = real_openat64(dirfd, path, flags, mode);
	track_open(fd, dirfd, path, flags, existed);
	return fd;
}

int close(int fd)
{
	if (tracked_fd(fd)) {
		pthread_mutex_lock(&mu);
		free(fd_path[fd]);
		fd_path[fd] = NULL;
		pthread_mutex_unlock(&mu);
	}
	return real_close(fd);
}

ssize_t write(int fd, const void *buf, size_t len)
{
	ssize_t n;

	if (!tracked_fd(fd))
		return real_write(fd, buf, len);
	pthread_mutex_lock(&mu);
	op();
	record_write(fd, len, lseek(fd, 0, SEEK_CUR));
	n = real_write(fd, buf, len);
	pthread_mutex_unlock(&mu);
	return n;
}

ssize_t pwrite(int fd, const void *buf, size_t len, off_t off)
{
	ssize_t n;

	if (!tracked_fd(fd))
		return real_pwrite(fd, buf, len, off);
	pthread_mutex_lock(&mu);
	op();
	record_write(fd, len, off);
	n = real_pwrite(fd, buf, len, off);
	pthread_mutex_unlock(&mu);
	return n;
}

ssize_t pwrite64(int fd, const void *buf, size_t len, off64_t off)
{
	ssize_t n;

	if (!tracked_fd(fd))
		return real_pwrite64(fd, buf, len, off);
	pthread_mutex_lock(&mu);
	op();
	record_write(fd, len, (off_t)off);
	n = real_pwrite64(fd, buf, len, off);
	pthread_mutex_unlock(&mu);
	return n;
}

int fsync(int fd)
{
	int r;

	if (!tracked_fd(fd))
		return real_fsync(fd);
	pthread_mutex_lock(&mu);
	op();
	r = real_fsync(fd);
	if (r == 0)
		synced(fd);
	pthread_mutex_unlock(&mu);
	return r;
}

int fdatasync(int fd)
{
	int r;

	if (!tracked_fd(fd))
		return real_fdatasync(fd);
	pthread_mutex_lock(&mu);
	op();
	r = real_fdatasync(fd);
	if (r == 0)
		synced(fd);
	pthread_mutex_unlock(&mu);
	return r;
}

static int do_rename(int odir, const char *old, int ndir, const char *new, unsigned flags,
		     int which)
{
	char *from = abs_path(odir, old), *to = abs_path(ndir, new);
	int r;

	if (!under_root(from) && !under_root(to)) {
		free(from);
		free(to);
		return which == 0 ? real_rename(old, new)
		       : which == 1 ? real_renameat(odir, old, ndir, new)
				    : real_renameat2(odir, old, ndir, new, flags);
	}
	pthread_mutex_lock(&mu);
	op();
	r = which == 0 ? real_rename(old, new)
	    : which == 1 ? real_renameat(odir, old, ndir, new)
			 : real_renameat2(odir, old, ndir, new, flags);
	if (r == 0 && from && to) {
		record_name(0, from, to);
		for (struct file *f = files; f; f = f->next)
			if (strcmp(f->path, from) == 0) {
				free(f->path);
				f->path = strdup(to);
			}
	}
	pthread_mutex_unlock(&mu);
	free(from);
	free(to);
	return r;
}

int rename(const char *old, const char *new)
{
	return do_rename(AT_FDCWD, old, AT_FDCWD, new, 0, 0);
}

int renameat(int odir, const char *old, int ndir, const char *new)
{
	return do_rename(odir, old, ndir, new, 0, 1);
}

int renameat2(int odir, const char *old, int ndir, const char *new, unsigned flags)
{
	return do_rename(odir, old, ndir, new, flags, 2);
}
