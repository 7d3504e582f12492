/*
 * store's scanning and space (store.h): walking objects/ (store_scan(), the start's steps
 * and store_verify_all()), the space against max_size and min_free (reserve, release,
 * shortfall), removing a blob, and checking a blob file that is not in the store
 * (store_check_*, tier verify). Threads: store.h's rules (store_scan() while no writer
 * runs).
 */
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
#include "store.h"
#include "store_priv.h"

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

	st_subdir_name(b, name);
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

/* The accounting of every directory as a walk found it; those of `unsettled` (may be NULL)
 * start counting changes from zero (lock held). */
static void set_dirs_locked(struct store *s, const uint64_t used[256],
			    const uint64_t objects[256], const uint8_t unsettled[32])
{
	s->used_total = s->objects_total = 0;
	s->unsettled = 0;
	for (unsigned b = 0; b < 256; b++) {
		bool open = unsettled && (unsettled[b / 8] & (1u << (b % 8)));
		s->dir_used[b] = open ? 0 : (int64_t)used[b];
		s->dir_objects[b] = open ? 0 : (int64_t)objects[b];
		s->used_total += s->dir_used[b];
		s->objects_total += s->dir_objects[b];
		s->unsettled += open;
	}
	st_account_locked(s, 0, 0, 0); /* the totals into st */
}

int store_scan(struct store *s, store_blob_cb on_blob, void *ctx, uint64_t *ret_removed)
{
	uint8_t(*digests)[STORE_DIGEST_SIZE] = NULL;
	size_t cap = 0;
	uint64_t removed = 0, used = 0, objects = 0;
	uint64_t dir_used[256] = { 0 }, dir_objects[256] = { 0 };
	uint64_t failures, quarantined;
	int r = 0;

	removed += empty_dir(s->tmp_fd);
	removed += empty_dir(s->quar_fd);
	pthread_mutex_lock(&s->lock);
	failures = s->st.integrity_failures;
	quarantined = s->st.quarantined;
	pthread_mutex_unlock(&s->lock);

	for (unsigned b = 0; b < 256 && r >= 0; b++) {
		size_t n = 0;
		uint64_t used0 = used, objects0 = objects;
		r = list_subdir(s, b, &digests, &cap, &n, &removed);
		for (size_t i = 0; i < n && r >= 0; i++) {
			struct store_blob_info info;
			int fd = -1;
			int q = st_blob_open(s, digests[i], &fd, &info);
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
		dir_used[b] = used - used0;
		dir_objects[b] = objects - objects0;
	}
	free(digests);
	empty_dir(s->quar_fd);

	pthread_mutex_lock(&s->lock);
	set_dirs_locked(s, dir_used, dir_objects, NULL);
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
	st_object_rel(digest, rel);
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
	int fd = -1, r = st_blob_open(s, digest, &fd, ret_info);
	if (r == -EIO)
		r = -DMC_E_INTEGRITY; /* blob_open moved it to quarantine/ */
	if (r == 0)
		close(fd);
	return r;
}

void store_scan_end(struct store *s, const uint64_t dir_bytes[256],
		    const uint64_t dir_objects[256], const uint8_t unsettled[32])
{
	empty_dir(s->quar_fd);
	pthread_mutex_lock(&s->lock);
	set_dirs_locked(s, dir_bytes, dir_objects, unsettled);
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

uint64_t store_dir_gen(struct store *s, unsigned first)
{
	uint64_t g;
	pthread_mutex_lock(&s->lock);
	g = s->dir_gen[first & 255u];
	pthread_mutex_unlock(&s->lock);
	return g;
}

int store_dir_settle(struct store *s, unsigned first, uint64_t gen, uint64_t bytes,
		     uint64_t objects)
{
	int r = 0;
	first &= 255u;
	pthread_mutex_lock(&s->lock);
	if (s->dir_gen[first] == gen) {
		/* what the walk found replaces the changes counted since the start */
		st_account_locked(s, (uint8_t)first, (int64_t)bytes - s->dir_used[first],
				  (int64_t)objects - s->dir_objects[first]);
		r = 1;
	}
	pthread_mutex_unlock(&s->lock);
	return r;
}

void store_dir_settled(struct store *s)
{
	pthread_mutex_lock(&s->lock);
	if (s->unsettled > 0)
		s->unsettled--;
	pthread_mutex_unlock(&s->lock);
}

void store_touched(struct store *s, uint8_t ret[32])
{
	memset(ret, 0, 32);
	pthread_mutex_lock(&s->lock);
	for (unsigned b = 0; b < 256; b++)
		if (s->dir_gen[b])
			ret[b / 8] |= (uint8_t)(1u << (b % 8));
	pthread_mutex_unlock(&s->lock);
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
	/* While a background reconciliation has directories left, used_bytes is not the
	 * whole: max_size waits for its end (which evicts down to it); min_free, read from
	 * the file system, still holds. */
	if (s->opt.max_size && !s->unsettled) {
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

	st_object_rel(digest, rel);
	pthread_mutex_lock(&s->lock);
	if (st_pin_find_locked(s, digest)) {
		r = -EBUSY;
	} else if (fstatat(s->obj_fd, rel, &st, AT_SYMLINK_NOFOLLOW) < 0 ||
		   unlinkat(s->obj_fd, rel, 0) < 0) {
		r = -errno;
	} else {
		uint64_t sz = (uint64_t)st.st_size;
		st_touch_locked(s, digest[0]);
		st_account_locked(s, digest[0], -(int64_t)sz, -1);
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
	if (!c->md || !c->dctx || EVP_DigestInit_ex(c->md, store_sha256(), NULL) != 1) {
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

