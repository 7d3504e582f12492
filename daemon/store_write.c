/*
 * store's writing (store.h): a writer streams a blob into a temporary file (raw or zstd,
 * decided on a sample), hashes it, and publishes it under its digest by the commit
 * protocol (file fsync, rename, directory fsync); imports of whole blob files, store_put().
 * Any thread, blocking (the threadpool); a writer belongs to one thread at a time
 * (store.h).
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

static int zstd_error(struct store_writer *w, size_t code)
{
	w->sc->suspect = true; /* see st_payload_stream() */
	return ZSTD_getErrorCode(code) == ZSTD_error_memory_allocation ? -ENOMEM
								       : -DMC_E_INTERNAL;
}

static int flush_in(struct store_writer *w)
{
	int r;
	if (w->in_len == 0)
		return 0;
	r = st_write_all_at(w->fd, w->sc->in, w->in_len, STORE_HEADER_SIZE + w->stored_size);
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
	r = st_write_all_at(w->fd, w->sc->out, w->out_len, STORE_HEADER_SIZE + w->stored_size);
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
			return zstd_error(w, rem);
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
		return zstd_error(w, csize);
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
		snprintf(name, 64, "w.%ld.%" PRIu64 ".%" PRId64, (long)getpid(), seq, st_now_ms());
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
			return st_map_space_errno(errno);
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
	w->sc = st_scratch_get(s);
	if (!w->sc) {
		r = -ENOMEM;
		goto fail;
	}
	if (EVP_DigestInit_ex(w->sc->md, store_sha256(), NULL) != 1) {
		w->sc->suspect = true;
		r = -ENOMEM;
		goto fail;
	}
	r = open_temp(s, w->tmp_name, &w->fd);
	if (r < 0)
		goto fail;
	*ret_w = w;
	return 0;
fail:
	st_scratch_put(s, w->sc);
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
		r = st_write_all_at(w->fd, p, len, w->stored_size);
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
		w->sc->suspect = true;
		r = -ENOMEM;
		goto fail;
	}
	w->raw_size += len;

	while (len > 0) {
		if (w->mode == W_RAW && w->in_len == 0 && len >= CHUNK) {
			/* nothing buffered and a large piece: straight from the caller's buffer */
			r = st_write_all_at(w->fd, p, len, STORE_HEADER_SIZE + w->stored_size);
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
	r = st_read_exact_at(w->fd, hdr, sizeof(hdr), 0);
	if (r < 0)
		return r;
	if (store_header_decode(hdr, &info) < 0 ||
	    memcmp(info.digest, expected, STORE_DIGEST_SIZE) != 0 ||
	    info.file_size != w->stored_size || info.raw_size > w->s->opt.max_object)
		return -DMC_E_INTEGRITY;
	r = st_payload_stream(w->sc, w->fd, &info, NULL, NULL);
	if (r < 0)
		return r;
	*ret_info = info;
	return 0;
}

int store_open_blob(struct store *s, const uint8_t digest[STORE_DIGEST_SIZE], int *ret_fd,
		    struct store_blob_info *ret_info)
{
	return st_blob_open(s, digest, ret_fd, ret_info);
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
	st_scratch_put(w->s, w->sc);
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
	int r = st_write_all_at(f->fd, p, n, f->off);
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
	r = st_payload_stream(w->sc, w->fd, zinfo, on_fd_chunk, &f);
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
	int fd = -1, r = st_blob_open(s, digest, &fd, &info);
	if (r == -ENOENT || r == -DMC_E_INTEGRITY)
		return 0;
	if (r < 0)
		return r;
	r = st_blob_check(s, fd, &info, NULL, NULL);
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
	st_subdir_name(first, name);
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
	st_subdir_name(first, name);
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

	st_object_rel(info->digest, rel);
	have = existing_ok(s, info->digest, &dev, &ino);
	if (have < 0)
		return have;

	pthread_mutex_lock(&s->tmp_lock);
	pthread_mutex_lock(&s->lock);
	bool exists = fstatat(s->obj_fd, rel, &cur, AT_SYMLINK_NOFOLLOW) == 0;
	if (have && exists && cur.st_dev == dev && cur.st_ino == ino) {
		r = st_pin_locked(s, info->digest);
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
	r = st_pin_locked(s, info->digest);
	if (r < 0) {
		pthread_mutex_unlock(&s->lock);
		pthread_mutex_unlock(&s->tmp_lock);
		return r;
	}
	r = renameat(s->tmp_fd, tmp_name, s->obj_fd, rel);
	if (r < 0 && errno == ENOENT && (r = make_subdir(s, info->digest[0])) == 0)
		r = renameat(s->tmp_fd, tmp_name, s->obj_fd, rel);
	if (r < 0) {
		r = st_map_space_errno(errno);
		struct pin *p = st_pin_find_locked(s, info->digest);
		if (p && --p->count == 0)
			*p = s->pins[--s->npins];
		pthread_mutex_unlock(&s->lock);
		pthread_mutex_unlock(&s->tmp_lock);
		return r;
	}
	tmp_name[0] = '\0';
	st_touch_locked(s, info->digest[0]);
	st_account_locked(s, info->digest[0],
			  (int64_t)info->file_size - (exists ? (int64_t)cur.st_size : 0),
			  exists ? 0 : 1);
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
		return st_map_space_errno(-r);
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
		w->sc->suspect = true;
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
	r = st_write_all_at(w->fd, hdr, sizeof(hdr), 0);
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
	r = st_map_space_errno(errno);
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
	info.mtime_ms = st_now_ms();
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

