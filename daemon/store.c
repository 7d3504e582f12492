/*
 * store: content-addressed blob files. See store.h for the layout, the file format and the
 * thread rules. This file: the format (header, digests), the scratch pool, opening and
 * closing, pins, and reading and verifying blobs; store_write.c writes them, store_scan.c
 * scans the store and keeps its space. These are the only users of zstd in the store path;
 * SHA-256 comes from OpenSSL's EVP interface (SHA extensions where the CPU has them).
 */
#include "store.h"
#include "store_priv.h"

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

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <zstd.h>
#include <zstd_errors.h>

#include "proto.h"

static const uint8_t blob_magic[8] = { 'D', 'M', 'C', 'B', 'L', 'O', 'B', '\n' };


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
int st_map_space_errno(int e)
{
	if (e == ENOSPC || e == EDQUOT)
		return -DMC_E_CACHE_FULL;
	return -e;
}

int st_write_all_at(int fd, const void *buf, size_t len, uint64_t off)
{
	const uint8_t *p = buf;
	while (len > 0) {
		ssize_t n = pwrite(fd, p, len, (off_t)off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return st_map_space_errno(errno);
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
int st_read_exact_at(int fd, void *buf, size_t len, uint64_t off)
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

int64_t st_now_ms(void)
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

static EVP_MD *sha256_md; /* store_sha256(); written once by the first store_open() */

const EVP_MD *store_sha256(void)
{
	return sha256_md ? sha256_md : EVP_sha256();
}

int store_crypto_init(void)
{
	if (sha256_md)
		return 0;
	if (OPENSSL_init_crypto(0, NULL) != 1)
		return -ENOMEM;
	sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
	return sha256_md ? 0 : -ENOMEM;
}

int store_digest_of(const void *buf, size_t len, uint8_t ret_digest[STORE_DIGEST_SIZE])
{
	unsigned int n = 0;
	if (EVP_Digest(buf, len, ret_digest, &n, store_sha256(), NULL) != 1 ||
	    n != STORE_DIGEST_SIZE)
		return -ENOMEM;
	return 0;
}

/* "ab": the objects/ subdirectory of digests starting with byte `b`. */
void st_subdir_name(unsigned b, char out[3])
{
	static const char hex[] = "0123456789abcdef";
	out[0] = hex[(b >> 4) & 15];
	out[1] = hex[b & 15];
	out[2] = '\0';
}

/* "ab/abcdef..." relative to objects/. */
void st_object_rel(const uint8_t digest[STORE_DIGEST_SIZE], char out[3 + STORE_HEX_SIZE + 1])
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

struct scratch *st_scratch_get(struct store *s)
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

void st_scratch_put(struct store *s, struct scratch *sc)
{
	if (!sc)
		return;
	if (sc->suspect) {
		scratch_free(sc);
		return;
	}
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
	if (store_crypto_init() < 0) {
		set_err(err, errlen, "OpenSSL has no SHA-256 (out of memory, or no default provider)");
		return -ENOMEM;
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
	ret_stats->unsettled_dirs = s->unsettled;
	pthread_mutex_unlock(&s->lock);
}


/* ---- pins (lock held) ---- */

struct pin *st_pin_find_locked(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE])
{
	for (size_t i = 0; i < s->npins; i++)
		if (memcmp(s->pins[i].digest, digest, STORE_DIGEST_SIZE) == 0)
			return &s->pins[i];
	return NULL;
}

int st_pin_locked(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE])
{
	struct pin *p = st_pin_find_locked(s, digest);
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
	r = st_pin_locked(s, digest);
	pthread_mutex_unlock(&s->lock);
	return r;
}

void store_unpin(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE])
{
	pthread_mutex_lock(&s->lock);
	struct pin *p = st_pin_find_locked(s, digest);
	if (p && --p->count == 0)
		*p = s->pins[--s->npins];
	pthread_mutex_unlock(&s->lock);
}

bool store_is_pinned(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE])
{
	bool pinned;
	pthread_mutex_lock(&s->lock);
	pinned = st_pin_find_locked(s, digest) != NULL;
	pthread_mutex_unlock(&s->lock);
	return pinned;
}

/* ---- payload streaming (reads, verification, re-encoding) ---- */


/*
 * A zstd error while reading a blob: the blob's fault (-DMC_E_INTEGRITY, so it is
 * quarantined), unless zstd could not allocate its window: then the blob is not at fault
 * and must stay where it is (-ENOMEM).
 */
static int zstd_read_error(size_t code)
{
	return ZSTD_getErrorCode(code) == ZSTD_error_memory_allocation ? -ENOMEM
								       : -DMC_E_INTEGRITY;
}

static int payload_stream(struct scratch *sc, int fd, const struct store_blob_info *info,
			  sink_fn sink, void *ctx)
{
	uint64_t off = STORE_HEADER_SIZE, left = info->stored_size, produced = 0;
	size_t zret = 1;
	uint8_t d[STORE_DIGEST_SIZE];
	unsigned int dn = 0;
	int r;

	if (EVP_DigestInit_ex(sc->md, store_sha256(), NULL) != 1)
		return -ENOMEM;
	if (info->comp == STORE_COMP_ZSTD &&
	    ZSTD_isError(ZSTD_DCtx_reset(sc->dctx, ZSTD_reset_session_only)))
		return -DMC_E_INTERNAL;

	while (left > 0) {
		size_t n = left < CHUNK ? (size_t)left : CHUNK;
		r = st_read_exact_at(fd, sc->in, n, off);
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
				return zstd_read_error(zret);
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
		if (ZSTD_isError(zret))
			return zstd_read_error(zret);
		if (zout.pos == 0)
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
 * Streams the payload of the open blob `fd` described by `info` through `sink` (may be NULL),
 * hashing the raw bytes. Returns 0 when the payload decodes to exactly raw_size bytes whose
 * SHA-256 is info->digest; -DMC_E_INTEGRITY when it does not; -EIO or another errno on read
 * errors; the sink's own error. An allocation that failed inside OpenSSL or zstd may leave
 * their contexts half set up: the scratch is then marked so that it is freed, not pooled.
 */
int st_payload_stream(struct scratch *sc, int fd, const struct store_blob_info *info,
		      sink_fn sink, void *ctx)
{
	int r = payload_stream(sc, fd, info, sink, ctx);

	if (r == -ENOMEM || r == -DMC_E_INTERNAL)
		sc->suspect = true;
	return r;
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

	st_object_rel(digest, rel);
	pthread_mutex_lock(&s->lock);
	s->st.integrity_failures++;
	if (have && fstatat(s->obj_fd, rel, &cur, AT_SYMLINK_NOFOLLOW) == 0 &&
	    cur.st_dev == mine.st_dev && cur.st_ino == mine.st_ino) {
		if (renameat(s->obj_fd, rel, s->quar_fd, rel + 3) < 0)
			(void)unlinkat(s->obj_fd, rel, 0);
		uint64_t sz = accounted ? accounted : (uint64_t)cur.st_size;
		s->st.quarantined++;
		st_touch_locked(s, digest[0]);
		st_account_locked(s, digest[0], -(int64_t)sz, -1);
	}
	pthread_mutex_unlock(&s->lock);
}

/* Opens blob `digest` and checks its header against the name and the file size. */
int st_blob_open(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE], int *ret_fd,
		     struct store_blob_info *ret_info)
{
	char rel[3 + STORE_HEX_SIZE + 1];
	uint8_t hdr[STORE_HEADER_SIZE];
	struct store_blob_info info;
	struct stat st;
	uint64_t accounted = 0;
	int fd, r;

	st_object_rel(digest, rel);
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
	r = st_read_exact_at(fd, hdr, sizeof(hdr), 0);
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
	int fd = -1, r = st_blob_open(s, digest, &fd, &info);
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
int st_blob_check(struct store *s, int fd, const struct store_blob_info *info, sink_fn sink,
		      void *ctx)
{
	struct scratch *sc = st_scratch_get(s);
	int r;
	if (!sc)
		return -ENOMEM;
	r = st_payload_stream(sc, fd, info, sink, ctx);
	st_scratch_put(s, sc);
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

	r = st_blob_open(s, digest, &fd, &info);
	if (r < 0)
		return r;
	if (info.raw_size > cap) {
		close(fd);
		*ret_size = info.raw_size;
		return -ENOBUFS;
	}
	r = st_blob_check(s, fd, &info, on_buf_chunk, &b);
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

	r = st_blob_open(s, digest, &fd, &info);
	if (r < 0)
		return r;
	r = st_blob_check(s, fd, &info, NULL, NULL);
	close(fd);
	if (r < 0)
		return r;
	if (ret_info)
		*ret_info = info;
	return 0;
}
