/*
 * cache_clean: the clean-shutdown record's file: its format, writing it at a clean stop
 * and taking it at a start, and the fingerprints it holds. See cache_clean.h. Thread: the
 * one that owns the index (cache.h).
 *
 * Format (explicit little-endian, RECORD_SIZE bytes):
 *     0   8 magic "DMCSTOP\0"
 *     8   8 version RECORD_VERSION
 *    16   8 directories (CLEAN_DIRS)
 *    24  64 index.db: dev, ino, size, mode, mtime s, ns, ctime s, ns
 *    88 ... per objects/<b>/, b = 0..255: the same 8 fields, objects, bytes, state (88 each)
 *   end-32 SHA-256 of every byte before it
 */
#include "cache_clean.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "store.h"

#define RECORD_MAGIC "DMCSTOP"
#define RECORD_VERSION 1u
#define FP_WORDS 8u
#define DIR_WORDS (FP_WORDS + 3u)
#define RECORD_BODY (24u + 8u * FP_WORDS + CLEAN_DIRS * 8u * DIR_WORDS)
#define RECORD_SIZE (RECORD_BODY + STORE_DIGEST_SIZE)
#define RECORD_TMP CLEAN_RECORD_NAME ".tmp"
/* How long a stop waits for the file system's clock to pass the last change it records
 * (see settle_clock()); a file system with whole-second times needs up to one second. */
#define SETTLE_MAX_MS 2500

static void say(char *why, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void say(char *why, size_t n, const char *fmt, ...)
{
	va_list ap;
	if (!why || !n)
		return;
	va_start(ap, fmt);
	vsnprintf(why, n, fmt, ap);
	va_end(ap);
}

static void put64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get64(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 7; i >= 0; i--)
		v = v << 8 | p[i];
	return v;
}

static void fp_of(const struct stat *st, struct clean_fp *fp)
{
	fp->dev = (uint64_t)st->st_dev;
	fp->ino = (uint64_t)st->st_ino;
	fp->size = (uint64_t)st->st_size;
	fp->mode = (uint64_t)st->st_mode;
	fp->mtim_s = (int64_t)st->st_mtim.tv_sec;
	fp->mtim_ns = (int64_t)st->st_mtim.tv_nsec;
	fp->ctim_s = (int64_t)st->st_ctim.tv_sec;
	fp->ctim_ns = (int64_t)st->st_ctim.tv_nsec;
}

static bool fp_equal(const struct clean_fp *a, const struct clean_fp *b)
{
	return a->dev == b->dev && a->ino == b->ino && a->size == b->size && a->mode == b->mode &&
	       a->mtim_s == b->mtim_s && a->mtim_ns == b->mtim_ns && a->ctim_s == b->ctim_s &&
	       a->ctim_ns == b->ctim_ns;
}

static uint8_t *put_fp(uint8_t *p, const struct clean_fp *fp)
{
	const uint64_t w[FP_WORDS] = { fp->dev, fp->ino, fp->size, fp->mode,
				       (uint64_t)fp->mtim_s, (uint64_t)fp->mtim_ns,
				       (uint64_t)fp->ctim_s, (uint64_t)fp->ctim_ns };
	for (unsigned i = 0; i < FP_WORDS; i++, p += 8)
		put64(p, w[i]);
	return p;
}

static const uint8_t *get_fp(const uint8_t *p, struct clean_fp *fp)
{
	fp->dev = get64(p);
	fp->ino = get64(p + 8);
	fp->size = get64(p + 16);
	fp->mode = get64(p + 24);
	fp->mtim_s = (int64_t)get64(p + 32);
	fp->mtim_ns = (int64_t)get64(p + 40);
	fp->ctim_s = (int64_t)get64(p + 48);
	fp->ctim_ns = (int64_t)get64(p + 56);
	return p + 8 * FP_WORDS;
}

static void encode(const struct clean_record *rec, uint8_t out[RECORD_SIZE])
{
	uint8_t *p = out;
	memset(out, 0, RECORD_SIZE);
	memcpy(p, RECORD_MAGIC, sizeof(RECORD_MAGIC));
	put64(p + 8, RECORD_VERSION);
	put64(p + 16, CLEAN_DIRS);
	p = put_fp(p + 24, &rec->index);
	for (unsigned b = 0; b < CLEAN_DIRS; b++) {
		const struct clean_dir *d = &rec->dirs[b];
		p = put_fp(p, &d->fp);
		put64(p, d->objects);
		put64(p + 8, d->bytes);
		put64(p + 16, d->state);
		p += 24;
	}
	(void)store_digest_of(out, RECORD_BODY, out + RECORD_BODY);
}

static int decode(const uint8_t in[RECORD_SIZE], struct clean_record *rec, char *why,
		  size_t whylen)
{
	uint8_t sum[STORE_DIGEST_SIZE];
	const uint8_t *p = in;

	if (memcmp(in, RECORD_MAGIC, sizeof(RECORD_MAGIC)) != 0) {
		say(why, whylen, "the clean-shutdown record is not one");
		return 0;
	}
	if (get64(in + 8) != RECORD_VERSION || get64(in + 16) != CLEAN_DIRS) {
		say(why, whylen, "the clean-shutdown record has version %llu, not %u",
		    (unsigned long long)get64(in + 8), RECORD_VERSION);
		return 0;
	}
	if (store_digest_of(in, RECORD_BODY, sum) < 0 ||
	    memcmp(sum, in + RECORD_BODY, STORE_DIGEST_SIZE) != 0) {
		say(why, whylen, "the clean-shutdown record's checksum does not match");
		return 0;
	}
	p = get_fp(p + 24, &rec->index);
	for (unsigned b = 0; b < CLEAN_DIRS; b++) {
		struct clean_dir *d = &rec->dirs[b];
		p = get_fp(p, &d->fp);
		d->objects = get64(p);
		d->bytes = get64(p + 8);
		uint64_t state = get64(p + 16);
		p += 24;
		if (state > CLEAN_DIR_UNSETTLED) {
			say(why, whylen, "the clean-shutdown record names an unknown state");
			return 0;
		}
		d->state = (uint32_t)state;
	}
	return 1;
}

int clean_take(const char *dir, struct clean_record *rec, char *why, size_t whylen)
{
	uint8_t buf[RECORD_SIZE + 1];
	struct stat st;
	ssize_t n = 0;
	int root, fd, r = 0;

	memset(rec, 0, sizeof(*rec));
	root = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (root < 0) {
		say(why, whylen, "the cache directory cannot be opened: %s", strerror(errno));
		return 0;
	}
	(void)unlinkat(root, RECORD_TMP, 0); /* a stop that did not finish its record */
	fd = openat(root, CLEAN_RECORD_NAME, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
	if (fd < 0) {
		if (errno == ENOENT)
			say(why, whylen, "there is no clean-shutdown record (the last stop was not "
					 "clean, or this is the first start)");
		else
			say(why, whylen, "the clean-shutdown record cannot be opened: %s",
			    strerror(errno));
		if (errno == ENOENT) {
			close(root);
			return -ENOENT;
		}
		goto remove; /* a record we cannot read must not outlive this start */
	}
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
		say(why, whylen, "the clean-shutdown record is not a regular file");
	} else {
		size_t got = 0;
		while (got < sizeof(buf) && (n = read(fd, buf + got, sizeof(buf) - got)) > 0)
			got += (size_t)n;
		if (n < 0)
			say(why, whylen, "the clean-shutdown record cannot be read: %s",
			    strerror(errno));
		else if (got != RECORD_SIZE)
			say(why, whylen, "the clean-shutdown record has %zu bytes, not %u", got,
			    RECORD_SIZE);
		else
			r = decode(buf, rec, why, whylen);
	}
	close(fd);
remove:
	/* Gone, and durably so, before anything else is written: a crash from here on leaves
	 * no record, and the next start reconciles fully. */
	if (unlinkat(root, CLEAN_RECORD_NAME, 0) < 0 && errno != ENOENT) {
		say(why, whylen, "the clean-shutdown record cannot be removed: %s",
		    strerror(errno));
		r = 0;
	} else if (fsync(root) < 0) {
		say(why, whylen, "the cache directory cannot be synced: %s", strerror(errno));
		r = 0;
	}
	close(root);
	return r;
}

/* index.db-wal must be absent or empty: content in it would be pages newer than index.db. */
static int wal_empty(int root)
{
	struct stat st;
	if (fstatat(root, "index.db-wal", &st, AT_SYMLINK_NOFOLLOW) < 0)
		return errno == ENOENT ? 1 : 0;
	return S_ISREG(st.st_mode) && st.st_size == 0;
}

bool clean_index_matches(const char *dir, const struct clean_record *rec, char *why,
			 size_t whylen)
{
	struct clean_fp now;
	struct stat st;
	bool ok = false;
	int root = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

	if (root < 0) {
		say(why, whylen, "the cache directory cannot be opened: %s", strerror(errno));
		return false;
	}
	if (fstatat(root, "index.db", &st, AT_SYMLINK_NOFOLLOW) < 0 || !S_ISREG(st.st_mode)) {
		say(why, whylen, "index.db is missing");
	} else if (fp_of(&st, &now), !fp_equal(&now, &rec->index)) {
		say(why, whylen, "index.db changed after the clean stop");
	} else if (!wal_empty(root)) {
		say(why, whylen, "index.db-wal has content");
	} else {
		ok = true;
	}
	close(root);
	return ok;
}

static int open_objects(const char *dir)
{
	int root = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC), fd;
	if (root < 0)
		return -1;
	fd = openat(root, "objects", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	close(root);
	return fd;
}

static void dir_name(unsigned b, char out[3])
{
	static const char hex[] = "0123456789abcdef";
	out[0] = hex[b >> 4];
	out[1] = hex[b & 15];
	out[2] = '\0';
}

unsigned clean_dirs_unchanged(const char *dir, const struct clean_record *rec,
			      uint8_t skip[CLEAN_DIRS / 8])
{
	unsigned n = 0;
	int obj = open_objects(dir);

	memset(skip, 0, CLEAN_DIRS / 8);
	if (obj < 0)
		return 0;
	for (unsigned b = 0; b < CLEAN_DIRS; b++) {
		const struct clean_dir *d = &rec->dirs[b];
		struct stat st;
		struct clean_fp now;
		char name[3];
		bool same;

		dir_name(b, name);
		if (fstatat(obj, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
			same = errno == ENOENT && d->state == CLEAN_DIR_ABSENT;
		else
			same = d->state == CLEAN_DIR_SETTLED && S_ISDIR(st.st_mode) &&
			       (fp_of(&st, &now), fp_equal(&now, &d->fp));
		if (same) {
			skip[b / 8] |= (uint8_t)(1u << (b % 8));
			n++;
		}
	}
	close(obj);
	return n;
}

static int ts_cmp(int64_t as, int64_t ans, int64_t bs, int64_t bns)
{
	return as != bs ? (as < bs ? -1 : 1) : ans != bns ? (ans < bns ? -1 : 1) : 0;
}

static void fp_latest(const struct clean_fp *fp, int64_t *s, int64_t *ns)
{
	if (ts_cmp(fp->mtim_s, fp->mtim_ns, *s, *ns) > 0) {
		*s = fp->mtim_s;
		*ns = fp->mtim_ns;
	}
	if (ts_cmp(fp->ctim_s, fp->ctim_ns, *s, *ns) > 0) {
		*s = fp->ctim_s;
		*ns = fp->ctim_ns;
	}
}

/*
 * A change made after the record is written must change a fingerprint. File times come
 * from a coarse clock (a tick of a few milliseconds, a whole second on some file
 * systems): a file removed in the same tick as the stop's last change would leave its
 * directory's times as recorded. So the stop waits until the file system stamps `fd` (the
 * record's temp file) later than every time recorded; any later change is stamped later
 * still.
 */
static int settle_clock(int fd, const struct clean_record *rec)
{
	int64_t s = INT64_MIN, ns = 0;
	struct stat st;

	fp_latest(&rec->index, &s, &ns);
	for (unsigned b = 0; b < CLEAN_DIRS; b++)
		if (rec->dirs[b].state == CLEAN_DIR_SETTLED)
			fp_latest(&rec->dirs[b].fp, &s, &ns);
	for (int waited = 0; waited <= SETTLE_MAX_MS; waited += 2) {
		if (futimens(fd, NULL) < 0 || fstat(fd, &st) < 0)
			return -errno;
		if (ts_cmp(st.st_mtim.tv_sec, st.st_mtim.tv_nsec, s, ns) > 0 &&
		    ts_cmp(st.st_ctim.tv_sec, st.st_ctim.tv_nsec, s, ns) > 0)
			return 0;
		struct timespec t = { 0, 2 * 1000 * 1000 };
		nanosleep(&t, NULL);
	}
	return -ETIMEDOUT;
}

/* pwrite, as every write of the cache's files (the crash suite's kill points, C2) */
static int write_all(int fd, const uint8_t *p, size_t n)
{
	off_t off = 0;
	while (n > 0) {
		ssize_t w = pwrite(fd, p, n, off);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		p += w;
		off += w;
		n -= (size_t)w;
	}
	return 0;
}

int clean_write(const char *dir, struct clean_record *rec, char *why, size_t whylen)
{
	static uint8_t buf[RECORD_SIZE]; /* one stop per process: kept off the stack */
	struct stat st;
	int root, obj = -1, fd = -1, r = 0;

	root = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (root < 0) {
		r = -errno;
		say(why, whylen, "the cache directory cannot be opened: %s", strerror(-r));
		return r;
	}
	if (!wal_empty(root)) {
		say(why, whylen, "index.db-wal still has content after the index was closed");
		r = -EBUSY;
		goto out;
	}
	if (fstatat(root, "index.db", &st, AT_SYMLINK_NOFOLLOW) < 0 || !S_ISREG(st.st_mode)) {
		r = -ENOENT;
		say(why, whylen, "index.db is missing");
		goto out;
	}
	fp_of(&st, &rec->index);
	obj = openat(root, "objects", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (obj < 0) {
		r = -errno;
		say(why, whylen, "objects/ cannot be opened: %s", strerror(-r));
		goto out;
	}
	for (unsigned b = 0; b < CLEAN_DIRS; b++) {
		struct clean_dir *d = &rec->dirs[b];
		char name[3];
		dir_name(b, name);
		memset(&d->fp, 0, sizeof(d->fp));
		if (fstatat(obj, name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
			/* no directory: only right if no blob and no row was counted in it */
			if (errno != ENOENT || d->objects != 0)
				d->state = CLEAN_DIR_UNSETTLED;
			else if (d->state == CLEAN_DIR_SETTLED)
				d->state = CLEAN_DIR_ABSENT;
			continue;
		}
		if (!S_ISDIR(st.st_mode))
			d->state = CLEAN_DIR_UNSETTLED;
		else if (d->state == CLEAN_DIR_ABSENT)
			d->state = CLEAN_DIR_SETTLED; /* present and empty of blobs and rows */
		fp_of(&st, &d->fp);
	}
	fd = openat(root, RECORD_TMP, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (fd < 0) {
		r = -errno;
		say(why, whylen, "the record cannot be created: %s", strerror(-r));
		goto out;
	}
	if (fchmod(fd, 0600) < 0 || (r = settle_clock(fd, rec)) < 0) {
		r = r < 0 ? r : -errno;
		say(why, whylen, "%s",
		    r == -ETIMEDOUT ? "the file system's clock did not move past the last change"
				    : strerror(-r));
		goto out;
	}
	encode(rec, buf);
	if ((r = write_all(fd, buf, sizeof(buf))) < 0 || (fsync(fd) < 0 && (r = -errno)) ||
	    (renameat(root, RECORD_TMP, root, CLEAN_RECORD_NAME) < 0 && (r = -errno)) ||
	    (fsync(root) < 0 && (r = -errno))) {
		say(why, whylen, "the record cannot be written: %s", strerror(-r));
		goto out;
	}
out:
	if (fd >= 0) {
		close(fd);
		if (r < 0)
			(void)unlinkat(root, RECORD_TMP, 0);
	}
	if (r < 0)
		(void)unlinkat(root, CLEAN_RECORD_NAME, 0);
	if (obj >= 0)
		close(obj);
	close(root);
	return r;
}

/* ---- how the last daemon ended (cache_clean.h) ---- */

static int boot_id(char out[64])
{
	int fd = open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC);
	ssize_t n;
	if (fd < 0)
		return -errno;
	n = read(fd, out, 63);
	close(fd);
	if (n < 16)
		return -EIO;
	while (n > 0 && (out[n - 1] == '\n' || out[n - 1] == ' '))
		n--;
	out[n] = '\0';
	return 0;
}

int clean_killed_this_boot(const char *dir, char *why, size_t whylen)
{
	char id[64], buf[160], want[160];
	struct stat st;
	ssize_t n = 0;
	int root, fd, r = 0;

	root = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (root < 0)
		return 0;
	if (fstatat(root, CLEAN_FAULT_NAME, &st, AT_SYMLINK_NOFOLLOW) == 0) {
		say(why, whylen, "the last daemon died of a fatal signal");
	} else if (boot_id(id) < 0) {
		say(why, whylen, "this boot's id cannot be read");
	} else if (fstatat(root, "index.db", &st, AT_SYMLINK_NOFOLLOW) < 0 ||
		   !S_ISREG(st.st_mode)) {
		say(why, whylen, "index.db is missing");
	} else if ((fd = openat(root, CLEAN_STARTED_NAME,
				O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK)) < 0) {
		say(why, whylen, "no start of this boot is recorded");
	} else {
		n = read(fd, buf, sizeof(buf) - 1);
		close(fd);
		buf[n > 0 ? n : 0] = '\0';
		snprintf(want, sizeof(want), "%s %llu %llu\n", id, (unsigned long long)st.st_dev,
			 (unsigned long long)st.st_ino);
		if (strcmp(buf, want) != 0)
			say(why, whylen, "the last start was in another boot (a power loss or a "
					 "reboot) or on another index.db");
		else
			r = 1;
	}
	close(root);
	return r;
}

void clean_mark_started(const char *dir)
{
	char id[64], buf[160];
	struct stat st;
	int root, fd, len;

	root = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (root < 0)
		return;
	(void)unlinkat(root, CLEAN_FAULT_NAME, 0);
	if (boot_id(id) < 0 || fstatat(root, "index.db", &st, AT_SYMLINK_NOFOLLOW) < 0) {
		(void)unlinkat(root, CLEAN_STARTED_NAME, 0);
		close(root);
		return;
	}
	len = snprintf(buf, sizeof(buf), "%s %llu %llu\n", id, (unsigned long long)st.st_dev,
		       (unsigned long long)st.st_ino);
	/* not synced: lost with a power loss, whose next start must check anyway */
	fd = openat(root, CLEAN_STARTED_NAME ".tmp",
		    O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (fd >= 0) {
		bool ok = write_all(fd, (const uint8_t *)buf, (size_t)len) == 0;
		close(fd);
		if (!ok || renameat(root, CLEAN_STARTED_NAME ".tmp", root, CLEAN_STARTED_NAME) < 0)
			(void)unlinkat(root, CLEAN_STARTED_NAME ".tmp", 0);
	}
	close(root);
}
