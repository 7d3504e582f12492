/*
 * store: content-addressed blob files. See store.h for the layout, the file format and the
 * thread rules. This file is the only user of zstd in the store path; SHA-256 comes from
 * OpenSSL's EVP interface (SHA extensions where the CPU has them).
 */
#include "store.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <zstd.h>
#include <zstd_errors.h>

#include "proto.h"

/* I/O unit: bytes read or written per syscall, and the sample that decides compression. */
#define CHUNK (128u << 10)
#define OUT_CAP ZSTD_COMPRESSBOUND(CHUNK)
/* zstd is kept only if the stored payload is at most this percentage of the raw one. */
#define ZSTD_KEEP_PCT 95u
/* Window limit for decoding: our writer never needs more than 2^21 at levels 1-3; a
 * corrupt or hostile frame asking for more is refused before zstd allocates it. */
#define ZSTD_WINDOW_LOG_MAX 23
/* Writer and reader contexts kept for reuse, so that hot paths do not allocate. */
#define SCRATCH_POOL_MAX 8u

static const uint8_t blob_magic[8] = { 'D', 'M', 'C', 'B', 'L', 'O', 'B', '\n' };

/* Buffers and codec contexts for one operation at a time; pooled in the store. */
struct scratch {
	struct scratch *next;
	EVP_MD_CTX *md;
	ZSTD_CCtx *cctx;
	ZSTD_DCtx *dctx;
	uint8_t in[CHUNK];
	uint8_t out[OUT_CAP];
};

struct pin {
	uint8_t digest[STORE_DIGEST_SIZE];
	uint32_t count;
};

struct store {
	char *dir;
	int root_fd, obj_fd, tmp_fd, quar_fd;
	struct store_options opt;

	/* Everything below is guarded by `lock`: counters, pins, the scratch pool, and the
	 * name-changing steps (publish, quarantine, remove) so that they see each other's
	 * results in one order. */
	pthread_mutex_t lock;
	struct store_stats st;
	struct pin *pins;
	size_t npins, pins_cap;
	struct scratch *pool;
	unsigned npool;
	uint64_t tmp_seq;
	uint64_t scan_failures, scan_quarantined; /* saved by store_scan_begin() */

	/* Serialises the steps that change names in tmp/ on hot paths (creating a temp,
	 * renaming it out; taken before `lock`). The kernel serialises them anyway on the
	 * directory's lock, but its waiters spin on the CPU while the holder allocates an
	 * inode, which can take milliseconds (ext4 without a journal skips recently deleted
	 * inodes one by one): a third of the daemon's CPU with many small blobs. Here they
	 * sleep. */
	pthread_mutex_t tmp_lock;
};

/* W_IMPORT: a whole blob file (header + stored payload), checked at commit */
enum writer_mode { W_SAMPLE, W_RAW, W_ZSTD, W_IMPORT };

struct store_writer {
	struct store *s;
	struct scratch *sc;
	int fd;
	int err;
	uint8_t kind;
	uint8_t mode;      /* enum writer_mode */
	uint8_t keep_pct;  /* zstd kept if the sample shrinks to this % or less */
	uint64_t expected; /* raw size, or STORE_SIZE_UNKNOWN */
	uint64_t raw_size;
	uint64_t stored_size; /* payload bytes written to fd after the header */
	size_t in_len;        /* raw bytes buffered in sc->in */
	size_t out_len;       /* zstd bytes buffered in sc->out */
	char tmp_name[64];
};

/* ---- small helpers ---- */

static void set_err(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;
	if (!err || errlen == 0)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

static void put_le16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
}

static void put_le64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static uint16_t get_le16(const uint8_t *p)
{
	return (uint16_t)(p[0] | (p[1] << 8));
}

static uint64_t get_le64(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 7; i >= 0; i--)
		v = (v << 8) | p[i];
	return v;
}

/* Disk-space errors become the protocol's cache-full code; the rest stay errno. */
static int map_space_errno(int e)
{
	if (e == ENOSPC || e == EDQUOT)
		return -DMC_E_CACHE_FULL;
	return -e;
}

static int write_all_at(int fd, const void *buf, size_t len, uint64_t off)
{
	const uint8_t *p = buf;
	while (len > 0) {
		ssize_t n = pwrite(fd, p, len, (off_t)off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return map_space_errno(errno);
		}
		if (n == 0)
			return -DMC_E_CACHE_FULL;
		p += n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

/* Reads exactly `len` bytes at `off`; a file shorter than that is corrupt. */
static int read_exact_at(int fd, void *buf, size_t len, uint64_t off)
{
	uint8_t *p = buf;
	while (len > 0) {
		ssize_t n = pread(fd, p, len, (off_t)off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return -DMC_E_INTEGRITY;
		p += n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void store_digest_hex(const uint8_t digest[STORE_DIGEST_SIZE], char out[STORE_HEX_SIZE + 1])
{
	static const char hex[] = "0123456789abcdef";
	for (unsigned i = 0; i < STORE_DIGEST_SIZE; i++) {
		out[2 * i] = hex[digest[i] >> 4];
		out[2 * i + 1] = hex[digest[i] & 15];
	}
	out[STORE_HEX_SIZE] = '\0';
}

static int hexval(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

int store_digest_parse(const char *hex, size_t len, uint8_t ret_digest[STORE_DIGEST_SIZE])
{
	uint8_t d[STORE_DIGEST_SIZE];
	if (!hex || len != STORE_HEX_SIZE)
		return -EINVAL;
	for (unsigned i = 0; i < STORE_DIGEST_SIZE; i++) {
		int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
		if (hi < 0 || lo < 0)
			return -EINVAL;
		d[i] = (uint8_t)(hi << 4 | lo);
	}
	memcpy(ret_digest, d, sizeof(d));
	return 0;
}

int store_digest_of(const void *buf, size_t len, uint8_t ret_digest[STORE_DIGEST_SIZE])
{
	unsigned int n = 0;
	if (EVP_Digest(buf, len, ret_digest, &n, EVP_sha256(), NULL) != 1 || n != STORE_DIGEST_SIZE)
		return -ENOMEM;
	return 0;
}

/* "ab": the objects/ subdirectory of digests starting with byte `b`. */
static void subdir_name(unsigned b, char out[3])
{
	static const char hex[] = "0123456789abcdef";
	out[0] = hex[(b >> 4) & 15];
	out[1] = hex[b & 15];
	out[2] = '\0';
}

/* "ab/abcdef..." relative to objects/. */
static void object_rel(const uint8_t digest[STORE_DIGEST_SIZE], char out[3 + STORE_HEX_SIZE + 1])
{
	store_digest_hex(digest, out + 3);
	out[0] = out[3];
	out[1] = out[4];
	out[2] = '/';
}

/* ---- header ---- */

static int header_check(const uint8_t *hdr, uint8_t ret_check[8])
{
	uint8_t d[STORE_DIGEST_SIZE];
	int r = store_digest_of(hdr, STORE_HEADER_SIZE - 8, d);
	if (r < 0)
		return r;
	memcpy(ret_check, d, 8);
	return 0;
}

void store_header_encode(const struct store_blob_info *info, uint8_t out[STORE_HEADER_SIZE])
{
	uint8_t check[8] = { 0 };
	memset(out, 0, STORE_HEADER_SIZE);
	memcpy(out, blob_magic, sizeof(blob_magic));
	put_le16(out + 8, STORE_FORMAT_VERSION);
	put_le16(out + 10, STORE_HEADER_SIZE);
	out[12] = info->kind;
	out[13] = info->comp;
	put_le64(out + 16, info->raw_size);
	put_le64(out + 24, info->stored_size);
	memcpy(out + 32, info->digest, STORE_DIGEST_SIZE);
	/* Only fails on out-of-memory inside OpenSSL; a zero check then fails every read,
	 * which turns the blob into a miss rather than a wrong answer. */
	(void)header_check(out, check);
	memcpy(out + STORE_HEADER_SIZE - 8, check, 8);
}

int store_header_decode(const uint8_t in[STORE_HEADER_SIZE], struct store_blob_info *ret_info)
{
	static const uint8_t zero[24] = { 0 };
	uint8_t check[8];
	struct store_blob_info info;

	if (memcmp(in, blob_magic, sizeof(blob_magic)) != 0 ||
	    get_le16(in + 8) != STORE_FORMAT_VERSION || get_le16(in + 10) != STORE_HEADER_SIZE ||
	    get_le16(in + 14) != 0 || memcmp(in + 64, zero, sizeof(zero)) != 0)
		return -DMC_E_INTEGRITY;
	if (header_check(in, check) < 0)
		return -ENOMEM;
	if (memcmp(check, in + STORE_HEADER_SIZE - 8, 8) != 0)
		return -DMC_E_INTEGRITY;

	memset(&info, 0, sizeof(info));
	info.kind = in[12];
	info.comp = in[13];
	info.raw_size = get_le64(in + 16);
	info.stored_size = get_le64(in + 24);
	memcpy(info.digest, in + 32, STORE_DIGEST_SIZE);
	if (info.kind < STORE_KIND_FIRST_ || info.kind > STORE_KIND_LAST_)
		return -DMC_E_INTEGRITY;
	if (info.comp != STORE_COMP_NONE && info.comp != STORE_COMP_ZSTD)
		return -DMC_E_INTEGRITY;
	if (info.raw_size > STORE_OBJECT_MAX_HARD || info.stored_size > STORE_OBJECT_MAX_HARD)
		return -DMC_E_INTEGRITY;
	if (info.comp == STORE_COMP_NONE && info.stored_size != info.raw_size)
		return -DMC_E_INTEGRITY;
	info.file_size = STORE_HEADER_SIZE + info.stored_size;
	*ret_info = info;
	return 0;
}

/* ---- scratch pool ---- */

static struct scratch *scratch_get(struct store *s)
{
	struct scratch *sc;

	pthread_mutex_lock(&s->lock);
	sc = s->pool;
	if (sc) {
		s->pool = sc->next;
		s->npool--;
	}
	pthread_mutex_unlock(&s->lock);
	if (sc)
		return sc;

	sc = calloc(1, sizeof(*sc));
	if (!sc)
		return NULL;
	sc->md = EVP_MD_CTX_new();
	sc->cctx = ZSTD_createCCtx();
	sc->dctx = ZSTD_createDCtx();
	if (!sc->md || !sc->cctx || !sc->dctx ||
	    ZSTD_isError(ZSTD_DCtx_setParameter(sc->dctx, ZSTD_d_windowLogMax,
						ZSTD_WINDOW_LOG_MAX))) {
		EVP_MD_CTX_free(sc->md);
		ZSTD_freeCCtx(sc->cctx);
		ZSTD_freeDCtx(sc->dctx);
		free(sc);
		return NULL;
	}
	return sc;
}

static void scratch_free(struct scratch *sc)
{
	EVP_MD_CTX_free(sc->md);
	ZSTD_freeCCtx(sc->cctx);
	ZSTD_freeDCtx(sc->dctx);
	free(sc);
}

static void scratch_put(struct store *s, struct scratch *sc)
{
	if (!sc)
		return;
	pthread_mutex_lock(&s->lock);
	if (s->npool < SCRATCH_POOL_MAX) {
		sc->next = s->pool;
		s->pool = sc;
		s->npool++;
		sc = NULL;
	}
	pthread_mutex_unlock(&s->lock);
	if (sc)
		scratch_free(sc);
}

/* ---- open / close ---- */

static int mkdir_open(int dirfd, const char *name, int *ret_fd)
{
	int fd;
	if (mkdirat(dirfd, name, 0700) < 0 && errno != EEXIST)
		return -errno;
	fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	*ret_fd = fd;
	return 0;
}

static int fsync_dirfd(int fd)
{
	return fsync(fd) < 0 ? -errno : 0;
}

int store_open(const char *dir, const struct store_options *opts, char *err, size_t errlen,
	       struct store **ret_store)
{
	struct store *s;
	int r;

	if (!dir || !*dir || !ret_store) {
		set_err(err, errlen, "no cache directory");
		return -EINVAL;
	}
	s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->root_fd = s->obj_fd = s->tmp_fd = s->quar_fd = -1;
	if (opts)
		s->opt = *opts;
	if (s->opt.max_object == 0)
		s->opt.max_object = STORE_OBJECT_MAX_DEFAULT;
	if (s->opt.max_object > STORE_OBJECT_MAX_HARD) {
		set_err(err, errlen, "max_object %" PRIu64 " exceeds %llu", s->opt.max_object,
			STORE_OBJECT_MAX_HARD);
		r = -EINVAL;
		goto fail_alloc;
	}
	if (s->opt.zstd_level == 0)
		s->opt.zstd_level = 1;
	if (s->opt.zstd_level < 1 || s->opt.zstd_level > 3) {
		set_err(err, errlen, "zstd level %d is outside 1..3", s->opt.zstd_level);
		r = -EINVAL;
		goto fail_alloc;
	}
	s->dir = strdup(dir);
	if (!s->dir) {
		r = -ENOMEM;
		goto fail_alloc;
	}
	r = pthread_mutex_init(&s->lock, NULL);
	if (r != 0) {
		r = -r;
		goto fail_dir;
	}
	r = pthread_mutex_init(&s->tmp_lock, NULL);
	if (r != 0) {
		pthread_mutex_destroy(&s->lock);
		r = -r;
		goto fail_dir;
	}

	if (mkdir(dir, 0700) < 0 && errno != EEXIST) {
		r = -errno;
		set_err(err, errlen, "cannot create the cache directory: %s", strerror(-r));
		goto fail_lock;
	}
	s->root_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (s->root_fd < 0) {
		r = -errno;
		set_err(err, errlen, "cannot open the cache directory: %s", strerror(-r));
		goto fail_lock;
	}
	if ((r = mkdir_open(s->root_fd, "objects", &s->obj_fd)) < 0 ||
	    (r = mkdir_open(s->root_fd, "tmp", &s->tmp_fd)) < 0 ||
	    (r = mkdir_open(s->root_fd, "quarantine", &s->quar_fd)) < 0) {
		set_err(err, errlen, "cannot create the store directories: %s", strerror(-r));
		goto fail_fds;
	}
	/* objects/ab/ subdirectories are created when their first blob is published. */
	if ((r = fsync_dirfd(s->obj_fd)) < 0 || (r = fsync_dirfd(s->root_fd)) < 0) {
		set_err(err, errlen, "cannot sync the cache directory: %s", strerror(-r));
		goto fail_fds;
	}
	*ret_store = s;
	return 0;

fail_fds:
	if (s->quar_fd >= 0)
		close(s->quar_fd);
	if (s->tmp_fd >= 0)
		close(s->tmp_fd);
	if (s->obj_fd >= 0)
		close(s->obj_fd);
	close(s->root_fd);
fail_lock:
	pthread_mutex_destroy(&s->tmp_lock);
	pthread_mutex_destroy(&s->lock);
fail_dir:
	free(s->dir);
fail_alloc:
	free(s);
	return r;
}

void store_close(struct store *s)
{
	if (!s)
		return;
	while (s->pool) {
		struct scratch *sc = s->pool;
		s->pool = sc->next;
		scratch_free(sc);
	}
	free(s->pins);
	close(s->quar_fd);
	close(s->tmp_fd);
	close(s->obj_fd);
	close(s->root_fd);
	pthread_mutex_destroy(&s->tmp_lock);
	pthread_mutex_destroy(&s->lock);
	free(s->dir);
	free(s);
}

const char *store_dir(const struct store *s)
{
	return s->dir;
}

void store_get_stats(struct store *s, struct store_stats *ret_stats)
{
	pthread_mutex_lock(&s->lock);
	*ret_stats = s->st;
	pthread_mutex_unlock(&s->lock);
}

#define STAT_ADD(s, field, n)                                                                      \
	do {                                                                                       \
		pthread_mutex_lock(&(s)->lock);                                                    \
		(s)->st.field += (n);                                                              \
		pthread_mutex_unlock(&(s)->lock);                                                  \
	} while (0)

/* ---- pins (lock held) ---- */

static struct pin *pin_find_locked(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE])
{
	for (size_t i = 0; i < s->npins; i++)
		if (memcmp(s->pins[i].digest, digest, STORE_DIGEST_SIZE) == 0)
			return &s->pins[i];
	return NULL;
}

static int pin_locked(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE])
{
	struct pin *p = pin_find_locked(s, digest);
	if (p) {
		if (p->count == UINT32_MAX)
			return -EOVERFLOW;
		p->count++;
		return 0;
	}
	if (s->npins == s->pins_cap) {
		size_t cap = s->pins_cap ? 2 * s->pins_cap : 16;
		struct pin *n = realloc(s->pins, cap * sizeof(*n));
		if (!n)
			return -ENOMEM;
		s->pins = n;
		s->pins_cap = cap;
	}
	memcpy(s->pins[s->npins].digest, digest, STORE_DIGEST_SIZE);
	s->pins[s->npins].count = 1;
	s->npins++;
	return 0;
}

int store_pin(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE])
{
	int r;
	pthread_mutex_lock(&s->lock);
	r = pin_locked(s, digest);
	pthread_mutex_unlock(&s->lock);
	return r;
}

void store_unpin(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE])
{
	pthread_mutex_lock(&s->lock);
	struct pin *p = pin_find_locked(s, digest);
	if (p && --p->count == 0)
		*p = s->pins[--s->npins];
	pthread_mutex_unlock(&s->lock);
}

bool store_is_pinned(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE])
{
	bool pinned;
	pthread_mutex_lock(&s->lock);
	pinned = pin_find_locked(s, digest) != NULL;
	pthread_mutex_unlock(&s->lock);
	return pinned;
}

/* ---- payload streaming (reads, verification, re-encoding) ---- */

typedef int (*sink_fn)(void *ctx, const uint8_t *p, size_t n);

/*
 * Streams the payload of the open blob `fd` described by `info` through `sink` (may be NULL),
 * hashing the raw bytes. Returns 0 when the payload decodes to exactly raw_size bytes whose
 * SHA-256 is info->digest; -DMC_E_INTEGRITY when it does not; -EIO or another errno on read
 * errors; the sink's own error.
 */
static int payload_stream(struct scratch *sc, int fd, const struct store_blob_info *info,
			  sink_fn sink, void *ctx)
{
	uint64_t off = STORE_HEADER_SIZE, left = info->stored_size, produced = 0;
	size_t zret = 1;
	uint8_t d[STORE_DIGEST_SIZE];
	unsigned int dn = 0;
	int r;

	if (EVP_DigestInit_ex(sc->md, EVP_sha256(), NULL) != 1)
		return -ENOMEM;
	if (info->comp == STORE_COMP_ZSTD &&
	    ZSTD_isError(ZSTD_DCtx_reset(sc->dctx, ZSTD_reset_session_only)))
		return -DMC_E_INTERNAL;

	while (left > 0) {
		size_t n = left < CHUNK ? (size_t)left : CHUNK;
		r = read_exact_at(fd, sc->in, n, off);
		if (r < 0)
			return r;
		off += n;
		left -= n;
		if (info->comp == STORE_COMP_NONE) {
			if (EVP_DigestUpdate(sc->md, sc->in, n) != 1)
				return -ENOMEM;
			if (sink && (r = sink(ctx, sc->in, n)) < 0)
				return r;
			produced += n;
			continue;
		}
		ZSTD_inBuffer zin = { sc->in, n, 0 };
		while (zin.pos < zin.size) {
			if (zret == 0) /* bytes after the end of the frame */
				return -DMC_E_INTEGRITY;
			ZSTD_outBuffer zout = { sc->out, sizeof(sc->out), 0 };
			zret = ZSTD_decompressStream(sc->dctx, &zout, &zin);
			if (ZSTD_isError(zret))
				return -DMC_E_INTEGRITY;
			if (zout.pos > info->raw_size - produced)
				return -DMC_E_INTEGRITY;
			if (zout.pos > 0) {
				if (EVP_DigestUpdate(sc->md, sc->out, zout.pos) != 1)
					return -ENOMEM;
				if (sink && (r = sink(ctx, sc->out, zout.pos)) < 0)
					return r;
				produced += zout.pos;
			}
		}
	}
	/* Drain what zstd still holds once all input is in. */
	while (info->comp == STORE_COMP_ZSTD && zret != 0) {
		ZSTD_inBuffer zin = { NULL, 0, 0 };
		ZSTD_outBuffer zout = { sc->out, sizeof(sc->out), 0 };
		zret = ZSTD_decompressStream(sc->dctx, &zout, &zin);
		if (ZSTD_isError(zret) || zout.pos == 0)
			return -DMC_E_INTEGRITY;
		if (zout.pos > info->raw_size - produced)
			return -DMC_E_INTEGRITY;
		if (EVP_DigestUpdate(sc->md, sc->out, zout.pos) != 1)
			return -ENOMEM;
		if (sink && (r = sink(ctx, sc->out, zout.pos)) < 0)
			return r;
		produced += zout.pos;
	}
	if (produced != info->raw_size)
		return -DMC_E_INTEGRITY;
	if (EVP_DigestFinal_ex(sc->md, d, &dn) != 1 || dn != STORE_DIGEST_SIZE)
		return -ENOMEM;
	if (memcmp(d, info->digest, STORE_DIGEST_SIZE) != 0)
		return -DMC_E_INTEGRITY;
	return 0;
}

/*
 * Moves the blob open as `fd` out of objects/, if the name still refers to that very file
 * (a fresh copy published meanwhile stays). Counts the failure either way. `accounted` is
 * the size the blob was counted with when its header still says so (0: unknown, then the
 * current size is taken: a file damaged to a smaller size leaves used_bytes too high until
 * the next scan, which errs on the side of evicting early).
 */
static void quarantine_fd(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE], int fd,
			  uint64_t accounted)
{
	char rel[3 + STORE_HEX_SIZE + 1];
	struct stat mine, cur;
	bool have = fstat(fd, &mine) == 0;

	object_rel(digest, rel);
	pthread_mutex_lock(&s->lock);
	s->st.integrity_failures++;
	if (have && fstatat(s->obj_fd, rel, &cur, AT_SYMLINK_NOFOLLOW) == 0 &&
	    cur.st_dev == mine.st_dev && cur.st_ino == mine.st_ino) {
		if (renameat(s->obj_fd, rel, s->quar_fd, rel + 3) < 0)
			(void)unlinkat(s->obj_fd, rel, 0);
		uint64_t sz = accounted ? accounted : (uint64_t)cur.st_size;
		s->st.quarantined++;
		s->st.used_bytes -= sz <= s->st.used_bytes ? sz : s->st.used_bytes;
		if (s->st.objects > 0)
			s->st.objects--;
	}
	pthread_mutex_unlock(&s->lock);
}

/* Opens blob `digest` and checks its header against the name and the file size. */
static int blob_open(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE], int *ret_fd,
		     struct store_blob_info *ret_info)
{
	char rel[3 + STORE_HEX_SIZE + 1];
	uint8_t hdr[STORE_HEADER_SIZE];
	struct store_blob_info info;
	struct stat st;
	uint64_t accounted = 0;
	int fd, r;

	object_rel(digest, rel);
	fd = openat(s->obj_fd, rel, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0)
		return errno == ELOOP ? -DMC_E_INTEGRITY : -errno;
	if (fstat(fd, &st) < 0) {
		r = -errno;
		goto fail;
	}
	if (!S_ISREG(st.st_mode) || (uint64_t)st.st_size < STORE_HEADER_SIZE) {
		r = -DMC_E_INTEGRITY;
		goto bad;
	}
	r = read_exact_at(fd, hdr, sizeof(hdr), 0);
	if (r == -EIO)
		goto bad;
	if (r < 0)
		goto bad_or_fail;
	r = store_header_decode(hdr, &info);
	if (r < 0)
		goto bad_or_fail;
	if (memcmp(info.digest, digest, STORE_DIGEST_SIZE) != 0) {
		r = -DMC_E_INTEGRITY;
		goto bad;
	}
	accounted = info.file_size;
	if (info.file_size != (uint64_t)st.st_size || info.raw_size > s->opt.max_object) {
		r = -DMC_E_INTEGRITY;
		goto bad;
	}
	info.mtime_ms = (int64_t)st.st_mtim.tv_sec * 1000 + st.st_mtim.tv_nsec / 1000000;
	*ret_fd = fd;
	*ret_info = info;
	return 0;

bad_or_fail:
	if (r != -DMC_E_INTEGRITY)
		goto fail;
bad:
	quarantine_fd(s, digest, fd, accounted);
fail:
	close(fd);
	return r;
}

int store_stat(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE],
	       struct store_blob_info *ret_info)
{
	struct store_blob_info info;
	int fd = -1, r = blob_open(s, digest, &fd, &info);
	if (r < 0)
		return r;
	close(fd);
	*ret_info = info;
	return 0;
}

struct buf_sink {
	uint8_t *buf;
	size_t cap, len;
};

static int on_buf_chunk(void *ctx, const uint8_t *p, size_t n)
{
	struct buf_sink *b = ctx;
	if (n > b->cap - b->len)
		return -DMC_E_INTEGRITY;
	memcpy(b->buf + b->len, p, n);
	b->len += n;
	return 0;
}

/* Verifies (and copies into `sink`) the blob open as `fd`; quarantines it on failure. */
static int blob_check(struct store *s, int fd, const struct store_blob_info *info, sink_fn sink,
		      void *ctx)
{
	struct scratch *sc = scratch_get(s);
	int r;
	if (!sc)
		return -ENOMEM;
	r = payload_stream(sc, fd, info, sink, ctx);
	scratch_put(s, sc);
	if (r == -DMC_E_INTEGRITY || r == -EIO)
		quarantine_fd(s, info->digest, fd, info->file_size);
	return r;
}

int store_read(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE], void *buf, size_t cap,
	       uint64_t *ret_size)
{
	struct store_blob_info info;
	struct buf_sink b = { buf, cap, 0 };
	int fd = -1, r;

	r = blob_open(s, digest, &fd, &info);
	if (r < 0)
		return r;
	if (info.raw_size > cap) {
		close(fd);
		*ret_size = info.raw_size;
		return -ENOBUFS;
	}
	r = blob_check(s, fd, &info, on_buf_chunk, &b);
	close(fd);
	if (r < 0)
		return r;
	pthread_mutex_lock(&s->lock);
	s->st.reads++;
	s->st.bytes_read += info.raw_size;
	pthread_mutex_unlock(&s->lock);
	*ret_size = info.raw_size;
	return 0;
}

int store_verify(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE],
		 struct store_blob_info *ret_info)
{
	struct store_blob_info info;
	int fd = -1, r;

	r = blob_open(s, digest, &fd, &info);
	if (r < 0)
		return r;
	r = blob_check(s, fd, &info, NULL, NULL);
	close(fd);
	if (r < 0)
		return r;
	if (ret_info)
		*ret_info = info;
	return 0;
}

/* ---- writing ---- */

/* Payloads that are already compressed: zstd would only cost time (ratio 1.000). */
static bool sniff_incompressible(const uint8_t *p, size_t n)
{
	static const uint8_t png[8] = { 0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n' };
	static const uint8_t jp2[12] = { 0, 0, 0, 0x0c, 'j', 'P', ' ', ' ', '\r', '\n', 0x87, '\n' };
	static const uint8_t j2k[4] = { 0xff, 0x4f, 0xff, 0x51 };
	static const uint8_t zst[4] = { 0x28, 0xb5, 0x2f, 0xfd };

	if (n >= 3 && p[0] == 0xff && p[1] == 0xd8 && p[2] == 0xff) /* JPEG */
		return true;
	if (n >= sizeof(png) && memcmp(p, png, sizeof(png)) == 0)
		return true;
	if (n >= sizeof(jp2) && memcmp(p, jp2, sizeof(jp2)) == 0)
		return true;
	if (n >= sizeof(j2k) && memcmp(p, j2k, sizeof(j2k)) == 0)
		return true;
	if (n >= sizeof(zst) && memcmp(p, zst, sizeof(zst)) == 0)
		return true;
	if (n >= 2 && p[0] == 0x1f && p[1] == 0x8b) /* gzip, .nii.gz */
		return true;
	return false;
}

static bool zstd_pays(uint64_t stored, uint64_t raw)
{
	return stored < raw && stored * 100 <= raw * ZSTD_KEEP_PCT;
}

static int zstd_error(size_t code)
{
	return ZSTD_getErrorCode(code) == ZSTD_error_memory_allocation ? -ENOMEM
								       : -DMC_E_INTERNAL;
}

static int flush_in(struct store_writer *w)
{
	int r;
	if (w->in_len == 0)
		return 0;
	r = write_all_at(w->fd, w->sc->in, w->in_len, STORE_HEADER_SIZE + w->stored_size);
	if (r < 0)
		return r;
	w->stored_size += w->in_len;
	w->in_len = 0;
	return 0;
}

static int flush_out(struct store_writer *w)
{
	int r;
	if (w->out_len == 0)
		return 0;
	r = write_all_at(w->fd, w->sc->out, w->out_len, STORE_HEADER_SIZE + w->stored_size);
	if (r < 0)
		return r;
	w->stored_size += w->out_len;
	w->out_len = 0;
	return 0;
}

static int zstd_feed(struct store_writer *w, const uint8_t *p, size_t n, ZSTD_EndDirective op)
{
	ZSTD_inBuffer zin = { p, n, 0 };
	for (;;) {
		ZSTD_outBuffer zout = { w->sc->out + w->out_len, sizeof(w->sc->out) - w->out_len, 0 };
		size_t rem = ZSTD_compressStream2(w->sc->cctx, &zout, &zin, op);
		int r;
		if (ZSTD_isError(rem))
			return zstd_error(rem);
		w->out_len += zout.pos;
		if (w->out_len == sizeof(w->sc->out) && (r = flush_out(w)) < 0)
			return r;
		if (op == ZSTD_e_end ? rem == 0 : zin.pos == zin.size)
			return 0;
	}
}

/*
 * Decides the encoding from the sample in sc->in. `final`: the sample is the whole payload,
 * so a one-shot frame is written and the decision is exact. Otherwise the sample predicts
 * the rest; commit checks the bet and re-encodes raw if it was lost.
 */
static int decide(struct store_writer *w, bool final)
{
	struct scratch *sc = w->sc;
	size_t csize;

	w->mode = W_RAW;
	if (w->in_len == 0 || sniff_incompressible(sc->in, w->in_len))
		return final ? flush_in(w) : 0;

	csize = ZSTD_compressCCtx(sc->cctx, sc->out, sizeof(sc->out), sc->in, w->in_len,
				  w->s->opt.zstd_level);
	if (ZSTD_isError(csize))
		return zstd_error(csize);
	if (!zstd_pays(csize, w->in_len) ||
	    (uint64_t)csize * 100 > (uint64_t)w->in_len * w->keep_pct)
		return final ? flush_in(w) : 0;

	w->mode = W_ZSTD;
	if (final) {
		w->out_len = csize;
		w->in_len = 0;
		return flush_out(w);
	}
	if (ZSTD_isError(ZSTD_CCtx_reset(sc->cctx, ZSTD_reset_session_and_parameters)) ||
	    ZSTD_isError(ZSTD_CCtx_setParameter(sc->cctx, ZSTD_c_compressionLevel,
						w->s->opt.zstd_level)))
		return -DMC_E_INTERNAL;
	if (w->expected != STORE_SIZE_UNKNOWN)
		(void)ZSTD_CCtx_setPledgedSrcSize(sc->cctx, w->expected);
	{
		size_t n = w->in_len;
		w->in_len = 0;
		return zstd_feed(w, sc->in, n, ZSTD_e_continue);
	}
}

static int open_temp(struct store *s, char name[64], int *ret_fd)
{
	for (int attempt = 0; attempt < 16; attempt++) {
		uint64_t seq;
		int fd;
		pthread_mutex_lock(&s->lock);
		seq = ++s->tmp_seq;
		pthread_mutex_unlock(&s->lock);
		snprintf(name, 64, "w.%ld.%" PRIu64 ".%" PRId64, (long)getpid(), seq, now_ms());
		pthread_mutex_lock(&s->tmp_lock);
		fd = openat(s->tmp_fd, name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
		int e = errno;
		pthread_mutex_unlock(&s->tmp_lock);
		errno = e;
		if (fd >= 0) {
			*ret_fd = fd;
			return 0;
		}
		if (errno != EEXIST)
			return map_space_errno(errno);
	}
	return -EEXIST;
}

int store_writer_open(struct store *s, enum store_kind kind, uint64_t expected_size,
		      struct store_writer **ret_w)
{
	struct store_writer *w;
	int r;

	if (kind < STORE_KIND_FIRST_ || kind > STORE_KIND_LAST_)
		return -EINVAL;
	if (expected_size != STORE_SIZE_UNKNOWN && expected_size > s->opt.max_object)
		return -DMC_E_LIMIT_EXCEEDED;
	w = calloc(1, sizeof(*w));
	if (!w)
		return -ENOMEM;
	w->s = s;
	w->kind = (uint8_t)kind;
	w->mode = W_SAMPLE;
	w->keep_pct = ZSTD_KEEP_PCT;
	w->expected = expected_size;
	w->fd = -1;
	w->sc = scratch_get(s);
	if (!w->sc) {
		r = -ENOMEM;
		goto fail;
	}
	if (EVP_DigestInit_ex(w->sc->md, EVP_sha256(), NULL) != 1) {
		r = -ENOMEM;
		goto fail;
	}
	r = open_temp(s, w->tmp_name, &w->fd);
	if (r < 0)
		goto fail;
	*ret_w = w;
	return 0;
fail:
	scratch_put(s, w->sc);
	free(w);
	if (r == -DMC_E_CACHE_FULL)
		STAT_ADD(s, cache_full, 1);
	return r;
}

int store_writer_write(struct store_writer *w, const void *buf, size_t len)
{
	const uint8_t *p = buf;
	uint64_t limit;
	int r = 0;

	if (w->err)
		return w->err;
	if (w->mode == W_IMPORT) {
		/* file bytes as they are: the header and the payload are checked at commit */
		if (len > STORE_HEADER_SIZE + STORE_OBJECT_MAX_HARD - w->stored_size ||
		    w->stored_size + len > STORE_HEADER_SIZE + 2 * w->s->opt.max_object + 4096) {
			r = -DMC_E_LIMIT_EXCEEDED;
			goto fail;
		}
		r = write_all_at(w->fd, p, len, w->stored_size);
		if (r < 0)
			goto fail;
		w->stored_size += len;
		return 0;
	}
	limit = w->expected != STORE_SIZE_UNKNOWN ? w->expected : w->s->opt.max_object;
	if (len > limit - w->raw_size) {
		r = -DMC_E_LIMIT_EXCEEDED;
		goto fail;
	}
	if (len == 0)
		return 0;
	if (EVP_DigestUpdate(w->sc->md, p, len) != 1) {
		r = -ENOMEM;
		goto fail;
	}
	w->raw_size += len;

	while (len > 0) {
		if (w->mode == W_RAW && w->in_len == 0 && len >= CHUNK) {
			/* nothing buffered and a large piece: straight from the caller's buffer */
			r = write_all_at(w->fd, p, len, STORE_HEADER_SIZE + w->stored_size);
			if (r < 0)
				goto fail;
			w->stored_size += len;
			break;
		}
		if (w->mode == W_ZSTD) {
			r = zstd_feed(w, p, len, ZSTD_e_continue);
			if (r < 0)
				goto fail;
			break;
		}
		size_t k = CHUNK - w->in_len;
		if (k > len)
			k = len;
		memcpy(w->sc->in + w->in_len, p, k);
		w->in_len += k;
		p += k;
		len -= k;
		if (w->in_len < CHUNK)
			break;
		r = w->mode == W_SAMPLE ? decide(w, false) : flush_in(w);
		if (r < 0)
			goto fail;
		if (w->mode == W_RAW && (r = flush_in(w)) < 0)
			goto fail;
	}
	return 0;
fail:
	w->err = r;
	if (r == -DMC_E_CACHE_FULL)
		STAT_ADD(w->s, cache_full, 1);
	return r;
}

int store_import_open(struct store *s, struct store_writer **ret_w)
{
	int r = store_writer_open(s, STORE_KIND_RAW, STORE_SIZE_UNKNOWN, ret_w);
	if (r == 0)
		(*ret_w)->mode = W_IMPORT;
	return r;
}

/* The imported file: its header decoded and matched against `expected`, its payload hashed. */
static int import_finish(struct store_writer *w, const uint8_t expected[STORE_DIGEST_SIZE],
			 struct store_blob_info *ret_info)
{
	uint8_t hdr[STORE_HEADER_SIZE];
	struct store_blob_info info;
	int r = w->err;

	if (r < 0)
		return r;
	if (w->stored_size < STORE_HEADER_SIZE)
		return -DMC_E_INTEGRITY;
	r = read_exact_at(w->fd, hdr, sizeof(hdr), 0);
	if (r < 0)
		return r;
	if (store_header_decode(hdr, &info) < 0 ||
	    memcmp(info.digest, expected, STORE_DIGEST_SIZE) != 0 ||
	    info.file_size != w->stored_size || info.raw_size > w->s->opt.max_object)
		return -DMC_E_INTEGRITY;
	r = payload_stream(w->sc, w->fd, &info, NULL, NULL);
	if (r < 0)
		return r;
	*ret_info = info;
	return 0;
}

int store_open_blob(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE], int *ret_fd,
		    struct store_blob_info *ret_info)
{
	return blob_open(s, digest, ret_fd, ret_info);
}

int store_writer_set_zstd_keep(struct store_writer *w, unsigned pct)
{
	if (w->mode != W_SAMPLE || w->raw_size != 0 || pct > 100)
		return -EINVAL;
	w->keep_pct = (uint8_t)pct;
	if (pct == 0)
		w->mode = W_RAW;
	return 0;
}

static void writer_free(struct store_writer *w)
{
	if (w->fd >= 0)
		close(w->fd);
	if (w->tmp_name[0])
		(void)unlinkat(w->s->tmp_fd, w->tmp_name, 0);
	scratch_put(w->s, w->sc);
	free(w);
}

void store_writer_abort(struct store_writer *w)
{
	if (w)
		writer_free(w);
}

struct fd_sink {
	int fd;
	uint64_t off;
};

static int on_fd_chunk(void *ctx, const uint8_t *p, size_t n)
{
	struct fd_sink *f = ctx;
	int r = write_all_at(f->fd, p, n, f->off);
	if (r == 0)
		f->off += n;
	return r;
}

/* The sample said zstd but the whole payload did not shrink: decode it into a raw temp. */
static int reencode_raw(struct store_writer *w, const struct store_blob_info *zinfo)
{
	char name[64];
	struct fd_sink f = { -1, STORE_HEADER_SIZE };
	int r = open_temp(w->s, name, &f.fd);
	if (r < 0)
		return r;
	r = payload_stream(w->sc, w->fd, zinfo, on_fd_chunk, &f);
	if (r < 0) {
		close(f.fd);
		(void)unlinkat(w->s->tmp_fd, name, 0);
		return r == -DMC_E_INTEGRITY ? -DMC_E_INTERNAL : r;
	}
	close(w->fd);
	(void)unlinkat(w->s->tmp_fd, w->tmp_name, 0);
	w->fd = f.fd;
	memcpy(w->tmp_name, name, sizeof(name));
	w->stored_size = w->raw_size;
	w->mode = W_RAW;
	return 0;
}

/* Checks an existing blob for dedup: 1 if it is complete and right, 0 if it is not there. */
static int existing_ok(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE], dev_t *ret_dev,
		       ino_t *ret_ino)
{
	struct store_blob_info info;
	struct stat st;
	int fd = -1, r = blob_open(s, digest, &fd, &info);
	if (r == -ENOENT || r == -DMC_E_INTEGRITY)
		return 0;
	if (r < 0)
		return r;
	r = blob_check(s, fd, &info, NULL, NULL);
	if (r == 0 && fstat(fd, &st) < 0)
		r = -errno;
	close(fd);
	if (r == -DMC_E_INTEGRITY || r == -EIO)
		return 0;
	if (r < 0)
		return r;
	*ret_dev = st.st_dev;
	*ret_ino = st.st_ino;
	return 1;
}

static int fsync_subdir(struct store *s, uint8_t first)
{
	char name[3];
	int fd, r = 0;
	subdir_name(first, name);
	fd = openat(s->obj_fd, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (fsync(fd) < 0)
		r = -errno;
	close(fd);
	return r;
}

/*
 * Creates objects/ab/ for digests starting with `first`, durably: the blob's own directory
 * sync does not cover the entry of its directory in objects/. Lock held (publishes are
 * serialised anyway). Returns 0, or -1 with errno set.
 */
static int make_subdir(struct store *s, uint8_t first)
{
	char name[3];
	subdir_name(first, name);
	if (mkdirat(s->obj_fd, name, 0700) < 0 && errno != EEXIST)
		return -1;
	return fsync(s->obj_fd);
}

/*
 * Renames the synced temp `tmp_name` into place (or drops it for dedup), syncs the
 * directory and pins the blob; tmp_name[0] becomes '\0' once the temp is gone.
 */
static int publish(struct store *s, char tmp_name[64], const struct store_blob_info *info)
{
	char rel[3 + STORE_HEX_SIZE + 1];
	struct stat cur;
	dev_t dev = 0;
	ino_t ino = 0;
	int have, r;

	object_rel(info->digest, rel);
	have = existing_ok(s, info->digest, &dev, &ino);
	if (have < 0)
		return have;

	pthread_mutex_lock(&s->tmp_lock);
	pthread_mutex_lock(&s->lock);
	bool exists = fstatat(s->obj_fd, rel, &cur, AT_SYMLINK_NOFOLLOW) == 0;
	if (have && exists && cur.st_dev == dev && cur.st_ino == ino) {
		r = pin_locked(s, info->digest);
		if (r == 0) {
			s->st.dedup_hits++;
			s->st.bytes_written += info->raw_size;
		}
		pthread_mutex_unlock(&s->lock);
		pthread_mutex_unlock(&s->tmp_lock);
		if (r < 0)
			return r;
		(void)unlinkat(s->tmp_fd, tmp_name, 0);
		tmp_name[0] = '\0';
		/* The copy we matched may have been renamed by a writer still syncing its
		 * directory: sync it ourselves before the caller acknowledges anything. */
		r = fsync_subdir(s, info->digest[0]);
		goto synced;
	}
	r = pin_locked(s, info->digest);
	if (r < 0) {
		pthread_mutex_unlock(&s->lock);
		pthread_mutex_unlock(&s->tmp_lock);
		return r;
	}
	r = renameat(s->tmp_fd, tmp_name, s->obj_fd, rel);
	if (r < 0 && errno == ENOENT && (r = make_subdir(s, info->digest[0])) == 0)
		r = renameat(s->tmp_fd, tmp_name, s->obj_fd, rel);
	if (r < 0) {
		r = map_space_errno(errno);
		struct pin *p = pin_find_locked(s, info->digest);
		if (p && --p->count == 0)
			*p = s->pins[--s->npins];
		pthread_mutex_unlock(&s->lock);
		pthread_mutex_unlock(&s->tmp_lock);
		return r;
	}
	tmp_name[0] = '\0';
	if (exists) {
		uint64_t old = (uint64_t)cur.st_size;
		s->st.used_bytes -= old <= s->st.used_bytes ? old : s->st.used_bytes;
	} else {
		s->st.objects++;
	}
	s->st.used_bytes += info->file_size;
	s->st.writes++;
	s->st.bytes_written += info->raw_size;
	if (info->comp == STORE_COMP_ZSTD)
		s->st.compressed++;
	pthread_mutex_unlock(&s->lock);
	pthread_mutex_unlock(&s->tmp_lock);
	r = fsync_subdir(s, info->digest[0]);

synced:
	if (r < 0) {
		/* The blob is complete (its data was synced before the rename) but its name may
		 * not survive a power cut: report the failure so nothing is acknowledged. */
		if (r == -EIO)
			STAT_ADD(s, fsync_failures, 1);
		store_unpin(s, info->digest);
		return map_space_errno(-r);
	}
	return 0;
}

/*
 * Ends the payload, checks size and digest and writes the header: the temp file is then
 * the complete blob, not yet synced. Counts a cache-full failure. Does not free `w`.
 */
static int writer_finish(struct store_writer *w, const uint8_t expected[STORE_DIGEST_SIZE],
			 struct store_blob_info *ret_info)
{
	struct store_blob_info info;
	uint8_t hdr[STORE_HEADER_SIZE];
	unsigned int dn = 0;
	int r = w->err;

	if (r < 0)
		return r; /* store_writer_write() counted it */
	/* Before zstd ends its frame: it would fail on a pledged size not reached. */
	if (w->expected != STORE_SIZE_UNKNOWN && w->raw_size != w->expected) {
		r = -DMC_E_INTEGRITY;
		goto out;
	}
	if (w->mode == W_SAMPLE)
		r = decide(w, true);
	else if (w->mode == W_RAW)
		r = flush_in(w);
	else if ((r = zstd_feed(w, NULL, 0, ZSTD_e_end)) == 0)
		r = flush_out(w);
	if (r < 0)
		goto out;

	memset(&info, 0, sizeof(info));
	if (EVP_DigestFinal_ex(w->sc->md, info.digest, &dn) != 1 || dn != STORE_DIGEST_SIZE) {
		r = -ENOMEM;
		goto out;
	}
	if (expected && memcmp(expected, info.digest, STORE_DIGEST_SIZE) != 0) {
		r = -DMC_E_INTEGRITY;
		goto out;
	}
	info.kind = w->kind;
	info.raw_size = w->raw_size;
	info.comp = w->mode == W_ZSTD ? STORE_COMP_ZSTD : STORE_COMP_NONE;
	info.stored_size = w->stored_size;
	if (info.comp == STORE_COMP_ZSTD && !zstd_pays(info.stored_size, info.raw_size)) {
		r = reencode_raw(w, &info);
		if (r < 0)
			goto out;
		info.comp = STORE_COMP_NONE;
		info.stored_size = info.raw_size;
	}
	info.file_size = STORE_HEADER_SIZE + info.stored_size;

	store_header_encode(&info, hdr);
	r = write_all_at(w->fd, hdr, sizeof(hdr), 0);
	if (r == 0)
		*ret_info = info;
out:
	if (r == -DMC_E_CACHE_FULL)
		STAT_ADD(w->s, cache_full, 1);
	return r;
}

/* fsync of a blob file, counted when it fails; never retried on the same fd (fsyncgate:
 * after a failed fsync the dirty pages may be dropped and a second one succeed on stale
 * data). */
static int sync_file(struct store *s, int fd)
{
	int r;
	if (fsync(fd) == 0)
		return 0;
	r = map_space_errno(errno);
	if (r == -EIO)
		STAT_ADD(s, fsync_failures, 1);
	if (r == -DMC_E_CACHE_FULL)
		STAT_ADD(s, cache_full, 1);
	return r;
}

int store_writer_commit(struct store_writer *w, const uint8_t expected[STORE_DIGEST_SIZE],
			struct store_blob_info *ret_info)
{
	struct store *s = w->s;
	struct store_blob_info info;
	int r;

	if (w->mode == W_IMPORT)
		r = expected ? import_finish(w, expected, &info) : -EINVAL;
	else
		r = writer_finish(w, expected, &info);
	if (r < 0)
		goto out;
	r = sync_file(s, w->fd);
	if (r < 0)
		goto out; /* close and unlink, never fsync again */
	close(w->fd);
	w->fd = -1;
	info.mtime_ms = now_ms();
	r = publish(s, w->tmp_name, &info);
	if (r == -DMC_E_CACHE_FULL)
		STAT_ADD(s, cache_full, 1);
	if (r == 0 && ret_info)
		*ret_info = info;
out:
	writer_free(w);
	return r;
}

int store_put(struct store *s, enum store_kind kind, const void *buf, size_t len,
	      const uint8_t expected[STORE_DIGEST_SIZE], struct store_blob_info *ret_info)
{
	struct store_writer *w;
	int r = store_writer_open(s, kind, len, &w);
	if (r < 0)
		return r;
	r = store_writer_write(w, buf, len);
	if (r < 0) {
		store_writer_abort(w);
		return r;
	}
	return store_writer_commit(w, expected, ret_info);
}

/* ---- scanning ---- */

/* Removes every entry of a flat directory; returns how many went. */
static uint64_t empty_dir(int dirfd)
{
	uint64_t n = 0;
	int fd = dup(dirfd);
	DIR *d;
	struct dirent *e;

	if (fd < 0)
		return 0;
	d = fdopendir(fd);
	if (!d) {
		close(fd);
		return 0;
	}
	rewinddir(d);
	while ((e = readdir(d)) != NULL) {
		if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
			continue;
		if (unlinkat(dirfd, e->d_name, 0) == 0 ||
		    (errno == EISDIR && unlinkat(dirfd, e->d_name, AT_REMOVEDIR) == 0))
			n++;
	}
	closedir(d);
	return n;
}

static int cmp_digest(const void *a, const void *b)
{
	return memcmp(a, b, STORE_DIGEST_SIZE);
}

/* Lists the blob names of objects/xx in order; other names are removed. */
static int list_subdir(struct store *s, unsigned b, uint8_t (**digests)[STORE_DIGEST_SIZE],
		       size_t *cap, size_t *ret_n, uint64_t *removed)
{
	char name[3];
	size_t n = 0;
	int fd, subfd;
	DIR *d;
	struct dirent *e;

	subdir_name(b, name);
	subfd = openat(s->obj_fd, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (subfd < 0) {
		if (errno != ENOENT)
			return -errno;
		*ret_n = 0; /* no blob with this first byte was ever published */
		return 0;
	}
	fd = dup(subfd);
	if (fd < 0) {
		close(subfd);
		return -errno;
	}
	d = fdopendir(fd);
	if (!d) {
		close(fd);
		close(subfd);
		return -ENOMEM;
	}
	while ((e = readdir(d)) != NULL) {
		uint8_t dg[STORE_DIGEST_SIZE];
		if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
			continue;
		if (store_digest_parse(e->d_name, strlen(e->d_name), dg) < 0 || dg[0] != b) {
			if (unlinkat(subfd, e->d_name, 0) == 0 ||
			    (errno == EISDIR && unlinkat(subfd, e->d_name, AT_REMOVEDIR) == 0))
				(*removed)++;
			continue;
		}
		if (n == *cap) {
			size_t ncap = *cap ? 2 * *cap : 256;
			void *p = realloc(*digests, ncap * STORE_DIGEST_SIZE);
			if (!p) {
				closedir(d);
				close(subfd);
				return -ENOMEM;
			}
			*digests = p;
			*cap = ncap;
		}
		memcpy((*digests)[n++], dg, STORE_DIGEST_SIZE);
	}
	closedir(d);
	close(subfd);
	if (n > 1)
		qsort(*digests, n, STORE_DIGEST_SIZE, cmp_digest);
	*ret_n = n;
	return 0;
}

int store_scan(struct store *s, store_blob_cb on_blob, void *ctx, uint64_t *ret_removed)
{
	uint8_t(*digests)[STORE_DIGEST_SIZE] = NULL;
	size_t cap = 0;
	uint64_t removed = 0, used = 0, objects = 0;
	int r = 0;

	uint64_t failures, quarantined;

	removed += empty_dir(s->tmp_fd);
	removed += empty_dir(s->quar_fd);
	pthread_mutex_lock(&s->lock);
	failures = s->st.integrity_failures;
	quarantined = s->st.quarantined;
	pthread_mutex_unlock(&s->lock);

	for (unsigned b = 0; b < 256 && r >= 0; b++) {
		size_t n = 0;
		r = list_subdir(s, b, &digests, &cap, &n, &removed);
		for (size_t i = 0; i < n && r >= 0; i++) {
			struct store_blob_info info;
			int fd = -1;
			int q = blob_open(s, digests[i], &fd, &info);
			if (q == -DMC_E_INTEGRITY || q == -EIO) {
				/* blob_open moved it to quarantine/, emptied below: at
				 * startup there is nothing to inspect it for. */
				removed++;
				continue;
			}
			if (q < 0) {
				r = q;
				break;
			}
			close(fd);
			used += info.file_size;
			objects++;
			if (on_blob)
				r = on_blob(ctx, &info);
		}
	}
	free(digests);
	empty_dir(s->quar_fd);

	pthread_mutex_lock(&s->lock);
	s->st.used_bytes = used;
	s->st.objects = objects;
	/* Removals at startup are repairs, reported in *ret_removed, not read failures. */
	s->st.integrity_failures = failures;
	s->st.quarantined = quarantined;
	pthread_mutex_unlock(&s->lock);
	if (ret_removed)
		*ret_removed = removed;
	return r < 0 ? r : 0;
}

/* ---- startup in parts: see store.h ---- */

int store_scan_begin(struct store *s, uint64_t *ret_removed)
{
	uint64_t n = empty_dir(s->tmp_fd) + empty_dir(s->quar_fd);
	pthread_mutex_lock(&s->lock);
	s->scan_failures = s->st.integrity_failures;
	s->scan_quarantined = s->st.quarantined;
	pthread_mutex_unlock(&s->lock);
	if (ret_removed)
		*ret_removed += n;
	return 0;
}

int store_scan_list(struct store *s, unsigned first, uint8_t (**digests)[STORE_DIGEST_SIZE],
		    size_t *cap, size_t *ret_n, uint64_t *ret_removed)
{
	uint64_t removed = 0;
	int r;
	if (first > 255)
		return -EINVAL;
	r = list_subdir(s, first, digests, cap, ret_n, &removed);
	if (ret_removed)
		*ret_removed += removed;
	return r;
}

int store_scan_known(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE], uint64_t raw_size,
		     uint64_t stored_size, uint64_t *ret_file_size)
{
	char rel[3 + STORE_HEX_SIZE + 1];
	struct stat st;
	object_rel(digest, rel);
	if (fstatat(s->obj_fd, rel, &st, AT_SYMLINK_NOFOLLOW) < 0)
		return -errno;
	if (!S_ISREG(st.st_mode) || raw_size > s->opt.max_object ||
	    stored_size > STORE_OBJECT_MAX_HARD ||
	    (uint64_t)st.st_size != STORE_HEADER_SIZE + stored_size)
		return 0;
	*ret_file_size = (uint64_t)st.st_size;
	return 1;
}

int store_scan_adopt(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE],
		     struct store_blob_info *ret_info)
{
	int fd = -1, r = blob_open(s, digest, &fd, ret_info);
	if (r == -EIO)
		r = -DMC_E_INTEGRITY; /* blob_open moved it to quarantine/ */
	if (r == 0)
		close(fd);
	return r;
}

void store_scan_end(struct store *s, uint64_t used_bytes, uint64_t objects)
{
	empty_dir(s->quar_fd);
	pthread_mutex_lock(&s->lock);
	s->st.used_bytes = used_bytes;
	s->st.objects = objects;
	/* Removals at startup are repairs, reported by the caller, not read failures. */
	s->st.integrity_failures = s->scan_failures;
	s->st.quarantined = s->scan_quarantined;
	pthread_mutex_unlock(&s->lock);
}

int store_verify_all(struct store *s, store_bad_cb on_bad, void *ctx, uint64_t *ret_ok,
		     uint64_t *ret_bad)
{
	uint8_t(*digests)[STORE_DIGEST_SIZE] = NULL;
	size_t cap = 0;
	uint64_t ok = 0, bad = 0, removed = 0;
	int r = 0;

	for (unsigned b = 0; b < 256 && r >= 0; b++) {
		size_t n = 0;
		r = list_subdir(s, b, &digests, &cap, &n, &removed);
		for (size_t i = 0; i < n && r >= 0; i++) {
			int q = store_verify(s, digests[i], NULL);
			if (q == 0) {
				ok++;
			} else if (q == -DMC_E_INTEGRITY || q == -EIO) {
				bad++;
				if (on_bad)
					on_bad(ctx, digests[i]);
			} else if (q != -ENOENT) { /* ENOENT: evicted meanwhile */
				r = q;
			}
		}
	}
	free(digests);
	if (ret_ok)
		*ret_ok = ok;
	if (ret_bad)
		*ret_bad = bad;
	return r < 0 ? r : 0;
}

/* ---- space ---- */

/* Worst case on disk for a raw payload: zstd is only kept when it is smaller. */
static uint64_t footprint(uint64_t raw_size)
{
	return STORE_HEADER_SIZE + raw_size;
}

static int free_bytes(struct store *s, uint64_t *ret)
{
	struct statvfs v;
	if (fstatvfs(s->root_fd, &v) < 0)
		return -errno;
	*ret = (uint64_t)v.f_bavail * (uint64_t)v.f_frsize;
	return 0;
}

/* Bytes to free before `fp` more fit (lock held). */
static uint64_t shortfall_locked(struct store *s, uint64_t fp, uint64_t fs_free)
{
	uint64_t need = 0;
	if (s->opt.max_size) {
		uint64_t want = s->st.used_bytes + s->st.reserved_bytes + fp;
		if (want > s->opt.max_size)
			need = want - s->opt.max_size;
	}
	if (s->opt.min_free) {
		/* Reserved bytes are mostly not written yet: they will come off fs_free. */
		uint64_t want = s->opt.min_free + s->st.reserved_bytes + fp;
		if (want > fs_free && want - fs_free > need)
			need = want - fs_free;
	}
	return need;
}

/* max_size and min_free change under the lock (store_set_limits()); read outside it, they
 * are loaded atomically. */
static uint64_t limit_load(const uint64_t *v)
{
	return __atomic_load_n(v, __ATOMIC_RELAXED);
}

void store_set_limits(struct store *s, uint64_t max_size, uint64_t min_free)
{
	pthread_mutex_lock(&s->lock);
	__atomic_store_n(&s->opt.max_size, max_size, __ATOMIC_RELAXED);
	__atomic_store_n(&s->opt.min_free, min_free, __ATOMIC_RELAXED);
	pthread_mutex_unlock(&s->lock);
}

int store_shortfall(struct store *s, uint64_t raw_size, uint64_t *ret_bytes)
{
	uint64_t fs_free = UINT64_MAX;
	int r;
	if (raw_size > STORE_OBJECT_MAX_HARD)
		return -DMC_E_LIMIT_EXCEEDED;
	if (limit_load(&s->opt.min_free) && (r = free_bytes(s, &fs_free)) < 0)
		return r;
	pthread_mutex_lock(&s->lock);
	*ret_bytes = shortfall_locked(s, footprint(raw_size), fs_free);
	pthread_mutex_unlock(&s->lock);
	return 0;
}

int store_reserve(struct store *s, uint64_t raw_size)
{
	uint64_t fs_free = UINT64_MAX, fp, max_size = limit_load(&s->opt.max_size);
	int r = 0;

	if (raw_size > s->opt.max_object)
		return -DMC_E_LIMIT_EXCEEDED;
	fp = footprint(raw_size);
	/* Larger than the whole cache: no eviction can help. */
	if (max_size && fp > max_size)
		return -DMC_E_LIMIT_EXCEEDED;
	if (limit_load(&s->opt.min_free) && (r = free_bytes(s, &fs_free)) < 0)
		return r;
	pthread_mutex_lock(&s->lock);
	if (shortfall_locked(s, fp, fs_free) > 0) {
		s->st.cache_full++;
		r = -DMC_E_CACHE_FULL;
	} else {
		s->st.reserved_bytes += fp;
	}
	pthread_mutex_unlock(&s->lock);
	return r;
}

void store_release(struct store *s, uint64_t raw_size)
{
	uint64_t fp = footprint(raw_size > STORE_OBJECT_MAX_HARD ? STORE_OBJECT_MAX_HARD : raw_size);
	pthread_mutex_lock(&s->lock);
	s->st.reserved_bytes -= fp <= s->st.reserved_bytes ? fp : s->st.reserved_bytes;
	pthread_mutex_unlock(&s->lock);
}

int store_remove(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE], uint64_t *ret_freed)
{
	char rel[3 + STORE_HEX_SIZE + 1];
	struct stat st;
	int r = 0;

	object_rel(digest, rel);
	pthread_mutex_lock(&s->lock);
	if (pin_find_locked(s, digest)) {
		r = -EBUSY;
	} else if (fstatat(s->obj_fd, rel, &st, AT_SYMLINK_NOFOLLOW) < 0 ||
		   unlinkat(s->obj_fd, rel, 0) < 0) {
		r = -errno;
	} else {
		uint64_t sz = (uint64_t)st.st_size;
		s->st.used_bytes -= sz <= s->st.used_bytes ? sz : s->st.used_bytes;
		if (s->st.objects > 0)
			s->st.objects--;
		s->st.removed++;
		if (ret_freed)
			*ret_freed = sz;
	}
	pthread_mutex_unlock(&s->lock);
	return r;
}

/* ---- checking a blob file that is not in the store (dmcache tier verify) ---- */

struct store_check {
	EVP_MD_CTX *md;
	ZSTD_DCtx *dctx;
	uint8_t hdr[STORE_HEADER_SIZE];
	size_t hdr_len;
	struct store_blob_info info;
	uint64_t stored, produced;
	size_t zret;
	int err; /* the first failure; later bytes are ignored */
	uint8_t out[OUT_CAP];
};

int store_check_new(struct store_check **ret)
{
	struct store_check *c = calloc(1, sizeof(*c));

	*ret = NULL;
	if (!c)
		return -ENOMEM;
	c->md = EVP_MD_CTX_new();
	c->dctx = ZSTD_createDCtx();
	if (!c->md || !c->dctx || EVP_DigestInit_ex(c->md, EVP_sha256(), NULL) != 1) {
		store_check_free(c);
		return -ENOMEM;
	}
	c->zret = 1;
	*ret = c;
	return 0;
}

void store_check_free(struct store_check *c)
{
	if (!c)
		return;
	EVP_MD_CTX_free(c->md);
	ZSTD_freeDCtx(c->dctx);
	free(c);
}

static int check_raw(struct store_check *c, const void *buf, size_t n)
{
	if (n > c->info.raw_size - c->produced)
		return -DMC_E_INTEGRITY;
	if (EVP_DigestUpdate(c->md, buf, n) != 1)
		return -ENOMEM;
	c->produced += n;
	return 0;
}

int store_check_feed(struct store_check *c, const void *buf, size_t len)
{
	const uint8_t *p = buf;

	while (len > 0 && !c->err) {
		if (c->hdr_len < STORE_HEADER_SIZE) {
			size_t n = STORE_HEADER_SIZE - c->hdr_len < len ? STORE_HEADER_SIZE - c->hdr_len
								       : len;
			memcpy(c->hdr + c->hdr_len, p, n);
			c->hdr_len += n;
			p += n;
			len -= n;
			if (c->hdr_len == STORE_HEADER_SIZE)
				c->err = store_header_decode(c->hdr, &c->info);
			continue;
		}
		if (len > c->info.stored_size - c->stored) {
			c->err = -DMC_E_INTEGRITY; /* longer than its header says */
			break;
		}
		c->stored += len;
		if (c->info.comp == STORE_COMP_NONE) {
			c->err = check_raw(c, p, len);
			break;
		}
		ZSTD_inBuffer zin = { p, len, 0 };
		while (zin.pos < zin.size && !c->err) {
			ZSTD_outBuffer zout = { c->out, sizeof(c->out), 0 };
			if (c->zret == 0) { /* bytes after the end of the frame */
				c->err = -DMC_E_INTEGRITY;
				break;
			}
			c->zret = ZSTD_decompressStream(c->dctx, &zout, &zin);
			if (ZSTD_isError(c->zret))
				c->err = -DMC_E_INTEGRITY;
			else if (zout.pos)
				c->err = check_raw(c, c->out, zout.pos);
		}
		break;
	}
	return c->err;
}

int store_check_finish(struct store_check *c, const uint8_t expected[STORE_DIGEST_SIZE],
		       struct store_blob_info *ret_info)
{
	uint8_t d[STORE_DIGEST_SIZE];
	unsigned int dn = 0;

	if (c->err)
		return c->err;
	if (c->hdr_len < STORE_HEADER_SIZE || c->stored != c->info.stored_size ||
	    memcmp(c->info.digest, expected, STORE_DIGEST_SIZE) != 0)
		return -DMC_E_INTEGRITY;
	while (c->info.comp == STORE_COMP_ZSTD && c->zret != 0) {
		ZSTD_inBuffer zin = { NULL, 0, 0 };
		ZSTD_outBuffer zout = { c->out, sizeof(c->out), 0 };
		c->zret = ZSTD_decompressStream(c->dctx, &zout, &zin);
		if (ZSTD_isError(c->zret) || zout.pos == 0)
			return -DMC_E_INTEGRITY;
		if (check_raw(c, c->out, zout.pos) < 0)
			return -DMC_E_INTEGRITY;
	}
	if (c->produced != c->info.raw_size ||
	    EVP_DigestFinal_ex(c->md, d, &dn) != 1 || dn != STORE_DIGEST_SIZE ||
	    memcmp(d, expected, STORE_DIGEST_SIZE) != 0)
		return -DMC_E_INTEGRITY;
	c->info.file_size = STORE_HEADER_SIZE + c->info.stored_size;
	if (ret_info)
		*ret_info = c->info;
	return 0;
}
